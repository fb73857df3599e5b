"""FP8 x 2:4 on the Triton decode kernel (weight-only: e4m3 values with a float32 scale per output feature, fp16/bf16
activations): the quantized layout and the layer's bytes, casts and errors (CPU), the kernel and a tiny Llama under
Triton's CPU interpreter (a child process, as in `test_triton_decode.py`), and the kernel and its layer on a GPU of
compute capability 8.9 or newer (`needs_triton_gpu` and `needs_fp8_gpu`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_sparse.inference import triton_decode
from hf_sparse.inference.quantization import E4M3, quantize_weight
from hf_sparse.inference.triton_linear import TritonDecodeLinear
from tests.conftest import needs_fp8_gpu, needs_triton_gpu
from tests.test_triton_decode import (
    check_every_configuration,
    check_in_graphs_and_compiled,
    check_interpreted,
    interpreted,
    two_four,
)


def fake_quantized(weight: torch.Tensor) -> torch.Tensor:
    """The per-row fake-quantized weight, in float32: e4m3 values times their row's scale."""
    values, scales = quantize_weight(weight)
    return values.float() * scales[:, None]


# -- the layout (CPU) --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_quantized_layout_dequantizes_to_the_fake_quantized_2_4_weight_exactly(dtype):
    weight = two_four(24, 160, dtype=dtype, seed=2) * 3  # 160: the last metadata word is partly padding
    weight[0, :8] = torch.tensor([0, 0, 0, 5.0, 0, 0, 0, 0])  # groups of fewer than 2 nonzeros
    weight[1] = 0  # a zero row: scale clamped, values exact zeros
    values, meta, scale = triton_decode.compress_fp8(weight)
    assert values.dtype == E4M3 and values.shape == (24, 80) and values.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (24,)
    assert torch.equal(meta, triton_decode.compress(weight)[1])  # the same positions as the fp16/bf16 layout
    # the scale is the row's largest kept value / 448
    assert torch.equal(scale[2:], weight[2:].abs().amax(dim=1).float() / 448)
    dequantized = triton_decode.dequantize(values, meta, scale, 160)
    assert torch.equal(dequantized, fake_quantized(weight))
    assert torch.equal(dequantized[1], torch.zeros(160))
    assert not torch.equal(dequantized, weight.float())  # the values were quantized, not kept
    e4m3 = triton_decode.decompress(values, meta, 160)
    assert e4m3.dtype == E4M3 and torch.equal(e4m3.float(), quantize_weight(weight)[0].float())


def test_the_kernel_refuses_values_and_scales_that_do_not_go_together():
    w = two_four(32, 64)
    x = torch.zeros(2, 64, dtype=torch.float16)
    values, meta, scale = triton_decode.compress_fp8(w)
    half_values, _ = triton_decode.compress(w)
    config = triton_decode.CONFIGS[0]
    with pytest.raises(ValueError, match="values are torch.float16 but a scale was given.*float8_e4m3fn"):
        triton_decode.decode_linear(x, half_values, meta, None, config, scale)
    with pytest.raises(ValueError, match="values are float8_e4m3fn but no scale.*compress_fp8"):
        triton_decode.decode_linear(x, values, meta, None, config)
    with pytest.raises(ValueError, match=r"scale is torch.float32 of shape \(31,\).*shape \(32,\)"):
        triton_decode.decode_linear(x, values, meta, None, config, scale[:31])
    with pytest.raises(ValueError, match=r"scale is torch.float16 of shape \(32,\)"):
        triton_decode.decode_linear(x, values, meta, None, config, scale.half())
    with pytest.raises(ValueError, match="inputs are torch.float32.*float16 or bfloat16 activations"):
        triton_decode.decode_linear(x.float(), values, meta, None, config, scale)


# -- the layer without a kernel run (CPU) ------------------------------------------------------------------------------


def test_the_fp8_layer_holds_5_16_of_the_fp16_bytes_names_itself_and_emits_its_dequantized_weight():
    linear = nn.Linear(128, 64).half()
    with torch.no_grad():
        linear.weight.copy_(two_four(64, 128, seed=4))
    layer = TritonDecodeLinear.from_linear(linear, fp8=True, name="model.layers.0.mlp.down_proj")
    assert layer.values.dtype == E4M3 and layer.scale.dtype == torch.float32 and layer.dtype == torch.float16
    # 0.625 bytes a weight (e4m3 values 0.5, positions 0.125) = 0.3125x fp16 dense, plus 4 bytes a row's scale
    assert layer.weight_bytes == 64 * 128 * 5 // 8 + 4 * 64
    assert (layer.weight_bytes - 4 * 64) / (64 * 128 * 2) == 0.3125
    assert "weights=e4m3 compressed 2:4 (Triton decode, per-output-feature scales)" in repr(layer)
    expected = fake_quantized(linear.weight).half()
    assert torch.equal(layer.weight, expected)
    state = nn.Sequential(layer).state_dict()
    assert list(state) == ["0.weight", "0.bias"] and torch.equal(state["0.weight"], expected)
    with pytest.raises(RuntimeError, match="down_proj: .*NVIDIA GPU.*on cpu"):
        layer(torch.zeros(2, 128, dtype=torch.float16))
    dense = TritonDecodeLinear.from_linear(linear, fp8=True, keep_dense=True)
    assert torch.equal(dense.weight, expected)  # a dense copy is of the dequantized weight: both runs agree


def test_the_fp8_layer_casts_its_activations_not_its_e4m3_weight_and_refuses_float32():
    layer = TritonDecodeLinear(two_four(64, 128), torch.randn(64, dtype=torch.float16), fp8=True, name="up_proj")
    values, scale = layer.values.view(torch.uint8).clone(), layer.scale.clone()
    layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.values.dtype == E4M3 and torch.equal(layer.values.view(torch.uint8), values)
    assert torch.equal(layer.scale, scale)
    with pytest.raises(TypeError, match="up_proj: .*float16 or bfloat16.*float32"):
        layer.float()
    assert layer.dtype == torch.bfloat16 and layer.values.dtype == E4M3 and layer.scale.dtype == torch.float32


def test_the_fp8_layer_refuses_what_is_not_2_4_naming_itself_and_requantizes_only_the_rows_it_replaces():
    bad = two_four(64, 128)
    bad[5, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate_proj: the weight is not 2:4"):
        TritonDecodeLinear(bad, None, fp8=True, name="model.layers.1.mlp.gate_proj")
    with pytest.raises(TypeError, match="gate_proj: .*float16 or bfloat16 weights, not float32"):
        TritonDecodeLinear(two_four(64, 128).float(), None, fp8=True, name="gate_proj")
    w = two_four(64, 128)
    layer = TritonDecodeLinear(w, None, fp8=True, name="gate_proj")
    values, scale = layer.values.view(torch.uint8).clone(), layer.scale.clone()
    with pytest.raises(ValueError, match="gate_proj: the new weight is not 2:4"):
        layer.set_weight_(bad)
    assert torch.equal(layer.values.view(torch.uint8), values) and torch.equal(layer.scale, scale)
    new_rows = two_four(8, 128, seed=9) * 4
    layer.set_weight_(new_rows, rows=slice(8, 16))  # as a fused group loads one member's rows
    assert torch.equal(layer.values.view(torch.uint8)[16:], values[16:]) and torch.equal(layer.scale[16:], scale[16:])
    assert torch.equal(layer.values.view(torch.uint8)[:8], values[:8])
    expected = torch.cat([fake_quantized(w)[:8], fake_quantized(new_rows), fake_quantized(w)[16:]])
    assert torch.equal(triton_decode.dequantize(layer.values, layer.meta, layer.scale, 128), expected)


# -- the kernel under Triton's interpreter (CPU, a child process) ----------------------------------------------------


def test_interpreted_fp8_dtype_bias_row_count_and_split_k_match_the_dequantized_fp32_result():
    cases = interpreted("fp8")
    check_interpreted(cases, "fp8", [(48, 256), (40, 100)])  # K a multiple of every block; not even of 32
    assert any(c["config"][0] >= 16 for c in cases)  # the tensor-core path (e4m3 widened to fp16) too


def test_interpreted_a_tiny_llama_on_fp8_layers_matches_the_fake_quantized_masked_model():
    (case,) = interpreted("fp8_llama")
    assert case["layers"] == 14  # q, k, v, o, gate, up, down per block
    assert case["reprs"] == ["e4m3 compressed 2:4 (Triton decode, per-output-feature scales)"]
    for rows in ("1", "16"):  # register accumulation; tl.dot
        assert case["errors"][rows] < 5e-3, case
        # the reference differs from the unquantized masked model by far more: the comparison sees the quantization
        assert case["unquantized"][rows] > 5 * case["errors"][rows], case
    assert case["compiled_equal"]  # under torch.compile, through its custom op with the scale


# -- on a GPU ----------------------------------------------------------------------------------------------------------

GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (2048, 8192)]


@needs_triton_gpu
@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_fp8_every_configuration_matches_at_decode_shapes(shape, dtype):
    w = two_four(*shape, dtype=dtype, device="cuda")
    b = torch.randn(shape[0], device="cuda", dtype=dtype)
    values, meta, scale = triton_decode.compress_fp8(w)
    dequantized = triton_decode.dequantize(values, meta, scale, shape[1])
    assert torch.equal(dequantized, fake_quantized(w))
    run = lambda x, bias, config: triton_decode.decode_linear(x, values, meta, bias, config, scale)  # noqa: E731
    check_every_configuration(run, dequantized, b, (1, 16, 64))


@needs_triton_gpu
@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fp8_layer_runs_in_cuda_graphs_and_under_torch_compile(dtype):
    linear = nn.Linear(4096, 4096, device="cuda", dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(two_four(4096, 4096, dtype=dtype, device="cuda"))
    layer = TritonDecodeLinear.from_linear(linear, fp8=True, name="o_proj")
    assert layer.weight_bytes == 4096 * 4096 * 5 // 8 + 4 * 4096
    check_in_graphs_and_compiled(layer, fake_quantized(linear.weight), linear.bias.detach())


# -- the plug-in of the FP8 swap (CPU) ---------------------------------------------------------------------------------


def test_the_fp8_plug_in_is_the_last_kernel_and_says_why_it_cannot_run_here(monkeypatch):
    from hf_sparse.inference.kernels import KERNELS, TRITON_DECODE_FP8
    from hf_sparse.inference.kernels.base import Weights

    assert KERNELS[-1] is TRITON_DECODE_FP8 and TRITON_DECODE_FP8.weights is Weights.E4M3 and TRITON_DECODE_FP8.sparse
    assert TRITON_DECODE_FP8.layout != "triton_decode"  # e4m3 values: it shares no bytes with the fp16 layout
    reason = TRITON_DECODE_FP8.unsupported_reason(torch.device("cpu"), torch.bfloat16, "model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj" in reason and "NVIDIA GPU" in reason
    # 5/16 of the fp16 bytes and a float32 scale per output feature
    assert TRITON_DECODE_FP8.weight_bytes((4096, 4096), torch.float16) == 4096 * 4096 * 5 // 8 + 4 * 4096
    assert TRITON_DECODE_FP8.shape_problem((24, 40), torch.float16) is not None
    # a sweep runs the e4m3 layout and checks it against the weight those values stand for, not the fp16 one
    w = two_four(32, 64, seed=5)
    values, meta, scale, held = TRITON_DECODE_FP8.pack(w)
    assert values.dtype == E4M3 and scale.shape == (32,) and torch.equal(held, fake_quantized(w))


def test_the_fp8_swap_puts_a_layer_on_the_triton_kernel_where_it_is_fastest_and_builds_its_e4m3_layer():
    from hf_sparse.inference import policy
    from hf_sparse.inference.kernels import DENSE, FP8, FP8_DENSE, TRITON_DECODE_FP8
    from hf_sparse.inference.kernels.base import LayerSpec, Timing
    from hf_sparse.inference.units import find_units
    from tests.test_autotune import FakeTimings
    from tests.test_inference import decide, pruned_tiny_model

    class Measured(FakeTimings):  # decode: the Triton kernel 0.3 ms, cuSPARSELt's e4m3 GEMM 0.6, fp16 dense 1.0
        def measure(self, request):
            ms = {"dense": 1.0, "fp8-dense": 0.7, "fp8": 0.6, "triton_decode_fp8": 0.3}[request.kernel]
            return Timing(
                ms, (1, 64, 256, 1, 4, 1) if request.kernel == "triton_decode_fp8" else (), request.tokens, 1
            )

    model = pruned_tiny_model(hidden_size=64, intermediate_size=128)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("output.dense")}
    units, _ = find_units(model, linears, ())
    kernels = (DENSE, FP8_DENSE, FP8, TRITON_DECODE_FP8)
    plan = decide(units[:1], Measured(cache_path=False), [1, 16], kernels=kernels, fp8=policy.Fp8Options(True))[0]
    assert plan.kernel is TRITON_DECODE_FP8 and plan.status == "fp8 2:4"
    assert "Triton e4m3 decode kernel is fastest" in plan.reason
    assert {run.kernel for run in plan.runs.values()} == {"triton_decode_fp8"}
    layer = TRITON_DECODE_FP8.layer(LayerSpec(units[0].weight.half(), None, units[0].name, runs=plan.runs))
    assert isinstance(layer, TritonDecodeLinear) and layer.fp8 and layer.values.dtype == E4M3
    assert layer.run_for(1).config == (1, 64, 256, 1, 4, 1)


@needs_triton_gpu
@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_the_fp8_swap_runs_a_llama_on_it_where_its_timings_win(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sparse import swap_to_semi_structured_
    from hf_sparse.inference import Fp8Config
    from hf_sparse.inference.kernels.base import Timing
    from hf_sparse.pruning import prune_
    from tests.test_autotune import FakeTimings
    from tests.test_inference import rel_error

    class Measured(FakeTimings):  # the Triton e4m3 kernel fastest at every token count
        def measure(self, request):
            if request.kernel == "triton_decode_fp8":
                return Timing(0.3, tuple(triton_decode.default_config(request.tokens)), request.tokens, 1)
            return Timing({"dense": 1.0, "fp8-dense": 0.7}.get(request.kernel, 0.6), (), request.tokens, 1)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    prune_(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, nn.Linear) and "layers" in name:
                module.weight.copy_(fake_quantized(module.weight))
    prompt = torch.randint(0, 256, (4, 8), device="cuda")
    report = swap_to_semi_structured_(model, fp8=Fp8Config("dynamic"), token_counts=[1, 16, 32],
                                      autotune=Measured(cache_path=False), eager_graphs=False)  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, TritonDecodeLinear)]
    assert len(layers) == 2 * 5 and all(layer.fp8 for layer in layers), report.format()
    with torch.no_grad():
        assert rel_error(model(input_ids=prompt).logits, reference(input_ids=prompt).logits) < 2e-2
        model.generate(prompt, max_new_tokens=4, do_sample=False)


def test_for_a_decoder_the_fp8_swap_weighs_decode_steps_as_often_as_a_generation_runs_them():
    from hf_sparse.inference import fp8_policy, policy
    from hf_sparse.inference.holdings import Workload
    from hf_sparse.inference.kernels import DENSE, FP8, FP8_DENSE, TRITON_DECODE_FP8
    from hf_sparse.inference.kernels.base import Timing
    from hf_sparse.inference.units import find_units
    from tests.test_autotune import FakeTimings
    from tests.test_inference import pruned_tiny_model

    class Measured(FakeTimings):  # the Triton kernel 3x faster than fp16 at decode, 4x slower at a 512-token prefill
        def measure(self, request):
            decode = request.tokens <= 64
            ms = {"dense": 1.0, "fp8-dense": 0.8, "fp8": 0.7, "triton_decode_fp8": 0.33 if decode else 4.0}
            return Timing(ms[request.kernel], (), request.tokens, 1)

    model = pruned_tiny_model(hidden_size=64, intermediate_size=128)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("output.dense")}
    units, _ = find_units(model, linears, ())
    in_play = policy.Kernels((DENSE, FP8_DENSE, FP8, TRITON_DECODE_FP8))
    buckets = {8: 1, 16: 16, 512: 512}
    chosen = {}
    for workload in (None, Workload()):
        options = policy.Options(buckets=buckets, fp8=policy.Fp8Options(True), workload=workload)
        needed = fp8_policy.requests(units[:1], in_play, options)
        timings = dict(zip(needed, Measured(cache_path=False).timings(needed, "cpu")))
        chosen[workload is not None] = fp8_policy.decide(units[:1], in_play, timings, options)[0].kernel
    assert chosen == {
        False: FP8,
        True: TRITON_DECODE_FP8,
    }  # each count alike: cuSPARSELt's; weighed: the decode kernel
