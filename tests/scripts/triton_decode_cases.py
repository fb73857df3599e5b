"""Runs the Triton decode kernel under Triton's CPU interpreter (`TRITON_INTERPRET=1`, set by the caller before
Triton is imported) and prints one JSON line per case: what ran and its relative error against the fp32 result.

    TRITON_INTERPRET=1 python tests/scripts/triton_decode_cases.py kernel   # the kernel: configurations, shapes, rows
    TRITON_INTERPRET=1 python tests/scripts/triton_decode_cases.py swap     # a tiny Llama swapped onto it (fake timings)
    TRITON_INTERPRET=1 python tests/scripts/triton_decode_cases.py fp8      # FP8 x 2:4: dtypes, bias, rows, split-K
    TRITON_INTERPRET=1 python tests/scripts/triton_decode_cases.py fp8_llama  # a tiny Llama on FP8 x 2:4 layers

`tests/test_triton_decode.py` runs the first two and `tests/test_triton_decode_fp8.py` the FP8 ones, and they assert on
the lines.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from hf_sparse.inference import triton_decode
from hf_sparse.masks import nm_mask

ROWS = (1, 3, 16, 17, 64)
SHAPES = ((48, 256), (32, 352), (40, 100))  # K a multiple of the 128 and 256 blocks; of none; not of 32 either


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def gemm(out_features: int, in_features: int, rows: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    w = w * nm_mask(w)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    return x, w, b


def run(config, x, w, b, **case) -> None:
    values, meta = triton_decode.compress(w)
    got = triton_decode.decode_linear(x, values, meta, b, config)
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    emit(**case, config=list(config), dtype=str(x.dtype), shape=list(w.shape), out_dtype=str(got.dtype),
         out_shape=list(got.shape), error=relative_error(got, expected))  # fmt: skip


def interpretable(config, dtype) -> bool:
    """Triton 3.7's interpreter computes `tl.dot` of bfloat16 tiles as integers (a 16x16 product of random values
    comes out near 1e10): the tensor-core configurations run bfloat16 on the GPU tests only."""
    return not (config.uses_dot and dtype == torch.bfloat16)


def kernel_cases() -> None:
    # every configuration, at rows it is timed at, on a K that is a multiple of its block and on one that is not
    for config in triton_decode.CONFIGS:
        rows = 3 if not config.uses_dot else config.block_m + 1
        for shape in SHAPES[:2]:
            run(config, *gemm(*shape, rows, torch.float16, True), part="config", rows=rows)
    # dtypes x bias x rows x shapes, in the default configuration of the rows and one without split-K
    for dtype in (torch.float16, torch.bfloat16):
        for bias in (True, False):
            for rows in ROWS:
                for shape in SHAPES:
                    one_slice = next(c for c in triton_decode.configs_for(rows) if c.split_k == 1 or c.uses_dot)
                    for config in {triton_decode.default_config(rows), one_slice}:
                        if interpretable(config, dtype):
                            x, w, b = gemm(*shape, rows, dtype, bias, seed=rows)
                            run(config, x, w, b, part="matrix", rows=rows, bias=bias)


def swap_case() -> None:
    """A tiny fp16 Llama swapped with fake timings in which the Triton decode kernel wins at 1-64 tokens: every
    projection runs on it, and the logits match the masked dense model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sparse import prune_, restore_dense_, swap_to_semi_structured_
    from hf_sparse.inference.kernels import TRITON_DECODE
    from hf_sparse.inference.kernels.base import Timing
    from hf_sparse.inference.triton_linear import TritonDecodeLinear
    from tests.test_autotune import FakeTimings

    TRITON_DECODE.unsupported_reason = lambda device, dtype, layer="": None  # the interpreter runs it on the CPU

    class Timings(FakeTimings):  # dense 1.2 ms; the decode kernel 0.7 ms at 1-64 tokens, in a real configuration
        def measure(self, request):
            if request.kernel == "triton_decode":
                return Timing(0.7, tuple(triton_decode.default_config(request.tokens)), request.tokens, 5)
            return super().measure(request)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).half().eval()
    prune_(model)
    ids = {rows: torch.randint(0, 128, (1, rows)) for rows in (1, 16)}
    with torch.no_grad():
        expected = {rows: model(input_ids=i).logits for rows, i in ids.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = swap_to_semi_structured_(model, token_counts=[1, 16], autotune=Timings(cache_path=False),
                                      eager_graphs=False)  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, TritonDecodeLinear)]
    with torch.no_grad():
        errors = {rows: relative_error(model(input_ids=i).logits, expected[rows]) for rows, i in ids.items()}
        # the kernel as the custom op torch.compile traces (aot_eager: no C++ compiler needed)
        x = torch.randn(3, layers[1].in_features, dtype=torch.float16)
        compiled_equal = torch.equal(torch.compile(layers[1], backend="aot_eager", fullgraph=True)(x), layers[1](x))
    after = model.state_dict()
    emit(
        compiled_equal=compiled_equal,
        part="swap",
        statuses=sorted({r.status for r in report}),
        plans=sorted({p for r in report for p in r.plans.values()}),
        layers=len(layers),
        fused=sum(not m.emits_state for m in layers),
        errors=errors,
        state_identical=list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state),
        restored=len(restore_dense_(model)),
    )


def fp8_cases() -> None:
    """FP8 x 2:4 against the fp32 product of the dequantized weight: dtypes x bias x rows x K a multiple of the blocks
    or not, in the rows' default configuration (split-K) and one without split-K."""
    for dtype in (torch.float16, torch.bfloat16):
        for bias in (True, False):
            for rows in ROWS:
                for shape in (SHAPES[0], SHAPES[2]):
                    one_slice = next(c for c in triton_decode.configs_for(rows) if c.split_k == 1 or c.uses_dot)
                    for config in {triton_decode.default_config(rows), one_slice}:
                        if not interpretable(config, dtype):
                            continue
                        x, w, b = gemm(*shape, rows, dtype, bias, seed=rows)
                        values, meta, scale = triton_decode.compress_fp8(w)
                        got = triton_decode.decode_linear(x, values, meta, b, config, scale)
                        dequantized = triton_decode.dequantize(values, meta, scale, shape[1])
                        expected = F.linear(x.float(), dequantized, None if b is None else b.float())
                        emit(part="fp8", config=list(config), dtype=str(dtype), shape=list(shape), rows=rows,
                             bias=bias, out_dtype=str(got.dtype), out_shape=list(got.shape),
                             error=relative_error(got, expected))  # fmt: skip


def fp8_llama_case() -> None:
    """A tiny fp16 Llama whose 2:4 projections are replaced by FP8 `TritonDecodeLinear` layers, against the masked
    model with the same per-row fake-quantized weights (and against the masked model without quantization)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sparse import prune_
    from hf_sparse.inference.quantization import quantize_weight
    from hf_sparse.inference.triton_linear import TritonDecodeLinear

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).half().eval()
    prune_(model)
    fake = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]  # 2:4
    ids = {rows: torch.randint(0, 128, (1, rows)) for rows in (1, 16)}
    with torch.no_grad():
        masked = {rows: model(input_ids=i).logits for rows, i in ids.items()}  # before the replacement
    for name in names:
        parent, child = name.rsplit(".", 1)
        linear = model.get_submodule(name)
        model.get_submodule(parent).register_module(child, TritonDecodeLinear.from_linear(linear, fp8=True, name=name))
        values, scales = quantize_weight(linear.weight)
        with torch.no_grad():
            fake.get_submodule(name).weight.copy_(values.float() * scales[:, None])
    with torch.no_grad():
        got = {rows: model(input_ids=i).logits for rows, i in ids.items()}
        errors = {rows: relative_error(got[rows], fake(input_ids=i).logits) for rows, i in ids.items()}
        unquantized = {rows: relative_error(got[rows], masked[rows]) for rows in ids}
        layer = model.get_submodule(names[0])
        x = torch.randn(3, layer.in_features, dtype=torch.float16)
        compiled_equal = torch.equal(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))
    emit(part="fp8_llama", layers=len(names), errors=errors, unquantized=unquantized, compiled_equal=compiled_equal,
         reprs=sorted({m.extra_repr().split("weights=")[1] for m in model.modules()
                       if isinstance(m, TritonDecodeLinear)}))  # fmt: skip


if __name__ == "__main__":
    modes = {"kernel": kernel_cases, "swap": swap_case, "fp8": fp8_cases, "fp8_llama": fp8_llama_case}
    modes[sys.argv[1]]()
