"""Runs the Triton decode kernel under Triton's CPU interpreter (`TRITON_INTERPRET=1`, set by the caller before
Triton is imported) and prints one JSON line per case: what ran and its relative error against the fp32 result.

    TRITON_INTERPRET=1 python tests/scripts/triton_decode_cases.py kernel   # the kernel: configurations, shapes, rows
    TRITON_INTERPRET=1 python tests/scripts/triton_decode_cases.py swap     # a tiny Llama swapped onto it (fake timings)

`tests/test_triton_decode.py` runs both and asserts on the lines.
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


if __name__ == "__main__":
    {"kernel": kernel_cases, "swap": swap_case}[sys.argv[1]]()
