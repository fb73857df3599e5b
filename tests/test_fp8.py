"""FP8 (e4m3) x 2:4 layers: quantization, calibration and the per-layer choice on the CPU; the kernels on a GPU."""

import pytest
import torch
from torch import nn

from hf_sparse import swap_to_semi_structured_
from hf_sparse.inference import fp8_policy, policy
from hf_sparse.inference.fp8 import Fp8Config, calibrate_input_scales, fp8_support_problem
from hf_sparse.inference.kernels import CUSPARSELT, CUTLASS, DENSE, FP8, FP8_DENSE
from hf_sparse.inference.kernels.base import GemmRequest, Timing
from hf_sparse.inference.layers import GeluInEpilogue
from hf_sparse.inference.quantization import E4M3, quantize_rows, quantize_static, quantize_weight
from hf_sparse.inference.units import DEFAULT_FUSE_GROUPS, find_units
from hf_sparse.masks import is_nm
from tests.conftest import needs_fp8_gpu
from tests.test_autotune import FakeTimings
from tests.test_inference import assert_untouched, decide, pruned_tiny_model, rel_error, snapshot

# -- CPU: numerics, configuration, choices ----------------------------------------------------------------------------


def test_weight_quantization_keeps_2_4_and_is_within_e4m3_precision():
    model = pruned_tiny_model()
    weight = model.bert.encoder.layer[0].intermediate.dense.weight.detach()
    values, scales = quantize_weight(weight)
    assert values.dtype == E4M3 and scales.shape == (weight.shape[0],) and scales.dtype == torch.float32
    assert is_nm(values.float(), 2, 4) and torch.equal(values.float() == 0, weight == 0)
    assert float(values.float().abs().amax(dim=1).min()) == 448.0  # each row's largest value maps to e4m3's max
    restored = values.float() * scales[:, None]
    assert rel_error(restored, weight) < 0.04  # 3 mantissa bits: ~2-3% relative error


def test_activation_quantization_per_token_and_static():
    x = torch.randn(6, 64) * torch.tensor([1.0, 10.0, 100.0, 0.1, 1.0, 1.0])[:, None]
    xq, scales = quantize_rows(x)
    assert xq.dtype == E4M3 and scales.shape == (6, 1)
    assert rel_error(xq.float() * scales, x) < 0.04
    assert torch.allclose(xq.float().abs().amax(dim=1), torch.full((6,), 448.0))
    static = quantize_static(x, torch.tensor(0.05))
    assert float(static.float().abs().max()) == 448.0  # saturates (100 * 3 / 0.05 is far past 448), never inf/NaN
    assert not torch.isnan(static.float()).any()


def test_config_checks_its_fields():
    assert Fp8Config(calibration=[]).activation_scales == "static"  # the default: measured faster, same F1
    assert Fp8Config(activation_scales="dynamic").calibration is None
    with pytest.raises(ValueError, match=r"activation_scales must be one of \['dynamic', 'static'\]"):
        Fp8Config(activation_scales="per-token")
    with pytest.raises(ValueError, match=r"needs calibration batches.*Fp8Config\(calibration=\[batch, ...\]\)"):
        Fp8Config()


def test_calibration_records_each_layers_largest_input():
    model = pruned_tiny_model()
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    batches = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(3)]
    seen = {n: 0.0 for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.__setitem__(n, max(seen[n], float(a[0].abs().max())))
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    scales = calibrate_input_scales(model, names, batches)
    assert scales == pytest.approx({n: seen[n] / 448.0 for n in names})
    model.train()
    with pytest.raises(ValueError, match=r"saw 0 batch\(es\).*bert.encoder.layer.0.attention.self.query"):
        calibrate_input_scales(model, names, [])
    assert model.training  # the mode it was in is restored


def test_cpu_and_old_gpus_are_refused_for_fp8_and_nothing_changes():
    from hf_sparse.inference.fp8 import fp8_capability_problem

    assert "compute capability 8.9" in fp8_support_problem("cpu", layer="x.dense")
    a100 = fp8_capability_problem((8, 0), "NVIDIA A100-SXM4-80GB")
    assert "8.9 or newer" in a100 and "A100-SXM4-80GB is 8.0" in a100 and "Swap without fp8" in a100
    assert fp8_capability_problem((8, 9), "NVIDIA L4") is None and fp8_capability_problem((9, 0)) is None
    model = pruned_tiny_model().half()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="not changed"):
        swap_to_semi_structured_(model, fp8=Fp8Config("dynamic"), autotune=False)
    with pytest.raises(ValueError, match="needs calibration batches"):  # fp8=True: static scales, which need data
        swap_to_semi_structured_(model, fp8=True, autotune=False)
    assert_untouched(model, before)
    with pytest.raises(TypeError, match="fp8 must be True, False or an Fp8Config"):
        swap_to_semi_structured_(model, fp8="e4m3")


FP8_KERNELS = (DENSE, FP8_DENSE, FP8)


class Measured(FakeTimings):
    """What an autotuner would have measured: per GEMM shape, tokens -> (fp16 ms, fp8 dense ms, fp8 2:4 ms)
    (`default` for shapes not listed; the e4m3 2:4 kernel's algorithm 5); with GELU after the GEMM, fp16 takes 0.3x
    more and the 2:4 kernel with GELU and e4m3 output in its epilogue `fused` ms (algorithm 9)."""

    def __init__(self, times, default=None, fused=None):
        super().__init__(cache_path=False)
        self.times, self.default, self.fused = times, default, fused or {}

    def measure(self, request):
        fp16, dense, sparse = self.times.get(request.shape, self.default)[request.tokens]
        if request.gelu:
            ms, config = {"dense": (1.3 * fp16, ()), "fp8": (self.fused.get(request.tokens), (9,))}[request.kernel]
            return Timing(ms, config, request.tokens, 2)
        ms, config = {"dense": (fp16, ()), "fp8-dense": (dense, ()), "fp8": (sparse, (5,))}[request.kernel]
        return Timing(ms, config, request.tokens, 3)


def decide_fp8(units, tuner, counts, sparse=True, fuse_gelu=False):
    return decide(units, tuner, counts, kernels=FP8_KERNELS, fp8=policy.Fp8Options(sparse, fuse_gelu))


@pytest.mark.parametrize(
    "times, status",
    [
        ({1536: (1.0, 0.9, 0.8), 98304: (10.0, 7.0, 5.0)}, "fp8 2:4"),
        ({1536: (1.0, 0.8, 0.9), 98304: (10.0, 7.0, 7.0)}, "fp8 dense"),
        ({1536: (1.0, 1.5, 1.4), 98304: (10.0, 10.1, 9.9)}, "dense"),  # FP8 not worth it: the layer stays fp16
    ],
)
def test_each_layer_takes_the_fastest_of_fp8_2_4_fp8_dense_and_fp16(times, status):
    model = pruned_tiny_model(hidden_size=64, intermediate_size=128)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("intermediate.dense")}
    units, _ = find_units(model, linears, ())
    plan = decide_fp8(units[:1], Measured({}, times), list(times))[0]
    assert plan.status == status
    assert "GEMM speed over fp16 by tokens" in plan.reason and "1536: e4m3 2:4" in plan.reason
    if status == "fp8 2:4":
        assert {r.config for r in plan.runs.values()} == {(5,)}
    (baseline,) = decide_fp8(units[:1], Measured({}, times), list(times), sparse=False)
    assert baseline.status == "fp8 dense" and "Fp8Config(sparse=False)" in baseline.reason


def test_a_layer_whose_fp8_timings_are_missing_stays_fp16_and_says_why():
    class Died(FakeTimings):
        def measure(self, request):
            return Timing(None, (), request.tokens, 0, "tuning process died")  # what a dead child leaves

    model = pruned_tiny_model(hidden_size=64, intermediate_size=128)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("output.dense")}
    units, _ = find_units(model, linears, ())
    (plan,) = decide_fp8(units[:1], Died(cache_path=False), [1536, 6144])
    assert plan.status == "dense" and "not measured (tuning process died)" in plan.reason


def _blocks(model):
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units, _ = find_units(model, linears, DEFAULT_FUSE_GROUPS)
    options = policy.Options(fp8=policy.Fp8Options(fuse_gelu=True))
    by_name = {u.name: u for u in units}
    blocks = fp8_policy.gelu_blocks(units, policy.Kernels(FP8_KERNELS), options)
    return [(name, by_name[name].gelu.activation, by_name[name].gelu.next_layer) for name in blocks]


def test_feed_forward_blocks_whose_gelu_can_run_in_the_epilogue_are_found():
    blocks = _blocks(pruned_tiny_model(hidden_size=64, intermediate_size=128).half())
    layer = "bert.encoder.layer.{}."
    assert blocks == [
        (layer.format(i) + "intermediate.dense", layer.format(i) + "intermediate.intermediate_act_fn",
         layer.format(i) + "output.dense")
        for i in range(2)
    ]  # fmt: skip
    assert _blocks(pruned_tiny_model(hidden_size=64, intermediate_size=128, hidden_act="relu").half()) == []
    assert _blocks(pruned_tiny_model(hidden_size=64, intermediate_size=112).half()) == []  # no e4m3 kernel takes 112
    # a bf16 model keeps GELU separate: with an e4m3 output cuSPARSELt reads the bias as fp16
    assert _blocks(pruned_tiny_model(hidden_size=64, intermediate_size=128).to(torch.bfloat16)) == []

    from transformers import DistilBertConfig, DistilBertForQuestionAnswering

    from hf_sparse import prune_

    torch.manual_seed(0)
    distil = DistilBertForQuestionAnswering(
        DistilBertConfig(vocab_size=100, dim=64, hidden_dim=128, n_layers=1, n_heads=2, max_position_embeddings=64)
    )
    prune_(distil)
    ffn = "distilbert.transformer.layer.0.ffn."
    assert _blocks(distil.half()) == [(ffn + "lin1", ffn + "activation", ffn + "lin2")]


@pytest.mark.parametrize(
    "fused_ms, consumer_times, fuses",
    [
        ({1536: 0.7, 98304: 4.0}, {1536: (1.0, 0.9, 0.8), 98304: (10.0, 7.0, 5.0)}, True),
        # slower than the plain GEMM, faster than it and the separate GELU: fused
        ({1536: 0.9, 98304: 6.0}, {1536: (1.0, 0.9, 0.8), 98304: (10.0, 7.0, 5.0)}, True),
        ({1536: 1.2, 98304: 9.0}, {1536: (1.0, 0.9, 0.8), 98304: (10.0, 7.0, 5.0)}, False),  # slower than both
        ({1536: 0.7, 98304: 4.0}, {1536: (1.0, 1.5, 1.4), 98304: (10.0, 10.1, 9.9)}, False),  # next layer fp16
    ],
)
def test_gelu_runs_in_the_epilogue_only_where_measured_no_slower_and_the_next_layer_is_fp8(
    fused_ms, consumer_times, fuses
):
    producer_times = {1536: (1.0, 0.9, 0.8), 98304: (10.0, 7.0, 5.0)}
    model = pruned_tiny_model(hidden_size=64, intermediate_size=128).half()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units, _ = find_units(model, linears, DEFAULT_FUSE_GROUPS)
    tuner = Measured({(128, 64): producer_times, (64, 128): consumer_times}, producer_times, fused_ms)
    plans = {p.unit.name: p for p in decide_fp8(units, tuner, [1536, 98304], fuse_gelu=True)}
    producer = plans["bert.encoder.layer.0.intermediate.dense"]
    assert producer.status == "fp8 2:4" and producer.gelu == fuses, producer.reason
    if fuses:
        assert {r.config for r in producer.runs.values()} == {(9,)}
        assert "fp16 GEMM + GELU over this, by tokens: 1536: " in producer.reason
        assert "bert.encoder.layer.0.output.dense's e4m3 quantization run in its epilogue" in producer.reason
    else:
        assert "; GELU stays a separate step" in producer.reason


def test_the_gelu_left_in_place_passes_the_fused_layers_e4m3_output_through_and_restores():
    from hf_sparse import restore_dense_

    gelu = GeluInEpilogue(nn.GELU())
    x = torch.randn(4, 8)
    assert torch.equal(gelu(x), nn.functional.gelu(x))  # a call not from the fused layer is still a GELU
    q = x.to(E4M3)
    assert gelu(q) is q
    model = pruned_tiny_model(hidden_size=64, intermediate_size=128)
    block = model.bert.encoder.layer[0].intermediate
    original = block.intermediate_act_fn
    block.intermediate_act_fn = GeluInEpilogue(original)
    restore_dense_(model)
    assert block.intermediate_act_fn is original


def test_the_gelu_epilogue_is_for_the_kernels_and_dtypes_that_have_one():
    from hf_sparse.inference.tuning import sweep

    for kernel, dtype in ((CUTLASS, torch.bfloat16), (FP8, torch.bfloat16), (CUSPARSELT, torch.float16)):
        request = GemmRequest(kernel.name, 3072, 768, dtype, True, 1536, gelu=True)
        with pytest.raises(ValueError, match=f"runs no GELU in its epilogue for {str(dtype)[6:]}"):
            sweep(kernel, request, "cpu")  # refused before anything runs


# -- GPU ---------------------------------------------------------------------------------------------------------------


def _fp8_model():
    from tests.test_inference import GPU_CONFIG

    return pruned_tiny_model(**GPU_CONFIG).to("cuda", torch.float16)


def _inputs(batch=2, seq=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {"input_ids": torch.randint(0, 512, (batch, seq), device="cuda", generator=g)}


@needs_fp8_gpu
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_layer_matches_the_masked_dense_layer(sparse, static):
    from hf_sparse.inference.fp8 import Fp8Linear
    from hf_sparse.masks import nm_mask

    torch.manual_seed(0)
    weight = torch.randn(768, 3072, device="cuda", dtype=torch.float16) * 0.02
    weight = weight * nm_mask(weight)
    bias = torch.randn(768, device="cuda", dtype=torch.float16)
    x = torch.randn(4, 384, 3072, device="cuda", dtype=torch.float16)
    scale = float(x.abs().max()) / 448 if static else None
    layer = Fp8Linear(weight, bias, sparse=sparse, input_scale=scale, name="ffn.out")
    reference = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float16 and out.shape == (4, 384, 768)
    assert rel_error(out, reference) < 0.05, rel_error(out, reference)
    assert layer.weight_bytes / (weight.numel() * 2) < (0.32 if sparse else 0.51)
    # the sparse kernel and the dense FP8 GEMM compute the same quantized product
    other = Fp8Linear(weight, bias, sparse=not sparse, input_scale=scale)
    with torch.no_grad():
        assert rel_error(other(x), out) < 1e-2
    # the dequantized weight is the 2:4 weight within e4m3 precision, zeros exact
    assert torch.equal(layer.weight == 0, weight == 0) and rel_error(layer.weight, weight) < 0.04


@needs_fp8_gpu
@pytest.mark.parametrize("activation_scales", ["dynamic", "static"])
def test_fp8_swap_graphs_compile_and_checkpoint(tmp_path, activation_scales):
    from tests.test_inference import quick_tuner

    model = _fp8_model()
    inputs = _inputs()
    with torch.no_grad():
        dense = model(**inputs).start_logits
    calibration = [_inputs(seed=s) for s in range(3)] if activation_scales == "static" else None
    config = Fp8Config(activation_scales=activation_scales, calibration=calibration)
    # tuned, every layer of this small model stays fp16 at 128 tokens (FP8 GEMMs lose there): the layers say why
    tuned = swap_to_semi_structured_(_fp8_model(), fp8=config, token_counts=[128], autotune=quick_tuner(tmp_path))
    assert {r.status for r in tuned if r.status != "not 2:4"} <= {"fp8 2:4", "fp8 dense", "dense"}
    assert all("GEMM speed over fp16 by tokens: 128:" in r.reason for r in tuned if r.status != "not 2:4")
    report = swap_to_semi_structured_(model, fp8=config, autotune=False)
    assert {r.status for r in report} == {"fp8 2:4", "not 2:4"}, report.format()
    static = activation_scales == "static"
    gelu = model.bert.encoder.layer[0].intermediate.intermediate_act_fn
    assert isinstance(gelu, GeluInEpilogue) == static  # static scales: GELU runs in the intermediate GEMM
    assert sum("run in its epilogue" in r.reason for r in report) == (2 if static else 0), report.format()
    runner = model.__dict__["forward"]
    with torch.no_grad():
        runner.enabled = False
        plain = model(**inputs).start_logits
        runner.enabled = True
        graphed = model(**inputs).start_logits
    assert runner.captures == 1 and torch.equal(graphed, plain)
    assert rel_error(plain, dense) < 0.08, rel_error(plain, dense)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        assert rel_error(compiled(**inputs).start_logits, plain) < 2e-2
    # an ordinary checkpoint of the dequantized weights: loading it re-quantizes to the same model
    state = model.state_dict()
    assert state["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.float16
    fresh = _fp8_model()
    swap_to_semi_structured_(fresh, fp8=config, autotune=False)
    fresh.load_state_dict(state)
    # re-quantized from fp16-rounded weights: the scales move by ~5e-4, which dynamic scales see through the
    # bfloat16 product's rounding (4.8e-3 measured on an H100; static scales stayed under 2e-3)
    with torch.no_grad():
        assert rel_error(fresh(**inputs).start_logits, plain) < (2e-3 if activation_scales == "static" else 1e-2)
    # casts that would destroy the e4m3 weights are refused, naming the layer
    with pytest.raises(TypeError, match="FP8 layer keeps e4m3 weights.* The model was not changed"):
        model.float()
    with torch.no_grad():  # nothing was cast: the same model still runs
        assert rel_error(model(**inputs).start_logits, plain) < 2e-3
    if static:  # GELU as a separate step computes the same model, within e4m3 rounding of its output
        unfused = _fp8_model()
        swap_to_semi_structured_(unfused, fp8=Fp8Config(calibration=calibration, fuse_gelu=False), autotune=False)
        assert not isinstance(unfused.bert.encoder.layer[0].intermediate.intermediate_act_fn, GeluInEpilogue)
        with torch.no_grad():
            assert rel_error(unfused(**inputs).start_logits, plain) < 3e-2
        from hf_sparse import restore_dense_

        restore_dense_(model)
        assert type(model.bert.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == "GELUActivation"
        with torch.no_grad():
            assert rel_error(model(**inputs).start_logits, dense) < 0.08
        assert model.float().bert.embeddings.word_embeddings.weight.dtype == torch.float32  # a dense model casts


@needs_fp8_gpu
def test_gelu_in_the_epilogue_writes_the_next_layers_e4m3_input():
    from hf_sparse.inference.fp8 import Fp8Linear
    from hf_sparse.masks import nm_mask

    torch.manual_seed(0)
    weight = torch.randn(3072, 768, device="cuda", dtype=torch.float16) * 0.05
    weight = weight * nm_mask(weight)
    bias = torch.randn(3072, device="cuda", dtype=torch.float16) * 0.5
    x = torch.randn(4, 100, 768, device="cuda", dtype=torch.float16)  # 400 rows: padded to 416 for the kernel
    scale = float(x.abs().max()) / 448
    plain, fused = (Fp8Linear(weight, bias, input_scale=scale, name="intermediate.dense") for _ in range(2))
    with torch.no_grad():
        reference = torch.nn.functional.gelu(plain(x).float())
    out_scale = float(reference.abs().max()) / 448
    fused.fuse_gelu_(out_scale)
    with torch.no_grad():
        out = fused(x)
    assert out.dtype == E4M3 and out.shape == (4, 100, 3072)
    assert rel_error(out.float() * out_scale, reference) < 0.06, rel_error(out.float() * out_scale, reference)
    # the next layer reads it as its quantized input: the same as quantizing the separate GELU's output
    w2 = torch.randn(768, 3072, device="cuda", dtype=torch.float16) * 0.02
    w2 = w2 * nm_mask(w2)
    after = Fp8Linear(w2, None, input_scale=out_scale, name="output.dense")
    with torch.no_grad():
        assert rel_error(after(out), after(reference.half())) < 0.03
    # the e4m3 output's C matrix points at D and is not read (beta 0): a D full of NaN bytes leaves no NaN behind
    from hf_sparse.inference import cusparselt

    xq = quantize_static(torch.randn(416, 768, device="cuda", dtype=torch.float16), fused.input_scale)
    plan = cusparselt.plan_for(xq, fused.packed, fused.bias, 3072, 0, out_dtype=E4M3, gelu_scale=fused.gelu_scale)
    nan_filled = torch.full((416, 3072), 0xFF, dtype=torch.uint8, device="cuda").view(E4M3)
    plan(xq, fused.packed, out=nan_filled, alpha=fused.alpha)
    assert not torch.isnan(nan_filled.float()).any()
    # compiled, the fused layer gives the same bits
    compiled = torch.compile(fused, dynamic=False)
    with torch.no_grad():
        assert torch.equal(compiled(x).view(torch.uint8), out.view(torch.uint8))
    with pytest.raises(ValueError, match="only a 2:4 FP8 layer of an fp16 model with a static input scale"):
        Fp8Linear(weight, bias, name="dynamic").fuse_gelu_(1.0)


@needs_fp8_gpu
def test_the_autotuner_times_fp8_2_4_dense_fp8_and_fp16_in_a_child_process(tmp_path):
    from hf_sparse.inference import Autotuner

    tuner = Autotuner(cache_path=tmp_path / "tune.json", reps=3, max_algorithms=4)
    gemm = GemmRequest("fp8", 3072, 768, torch.float16, True, 24576)
    requests = [gemm.on("dense"), gemm.on("fp8-dense"), gemm]
    fp16, dense, sparse = tuner.timings(requests, "cuda")  # in one child process
    assert fp16.ms and dense.ms and sparse.ms and sparse.candidates >= 1, (fp16, dense, sparse)
    print(f"3072x768 at 24576 tokens: fp16 {fp16.ms:.4f} ms, dense FP8 {dense.ms:.4f} ms, "
          f"FP8 2:4 {sparse.ms:.4f} ms (alg {sparse.config[0]})")  # fmt: skip
    again = Autotuner(cache_path=tmp_path / "tune.json")
    assert [again.cached(r, "cuda") for r in requests] == [fp16, dense, sparse]  # cached, measured once


def test_the_kernels_are_custom_ops_that_torch_compile_traces_by_their_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hf_sparse.inference.fp8 import fp8_sparse_gelu_op, fp8_sparse_mm_op
    from hf_sparse.inference.layers import _sparse_linear_op

    assert "CustomOpDef" in type(fp8_sparse_mm_op()).__name__ and "CustomOpDef" in type(_sparse_linear_op()).__name__
    assert "CustomOpDef" in type(fp8_sparse_gelu_op()).__name__
    with FakeTensorMode():
        xq = torch.empty(96, 256, dtype=E4M3)
        out = torch.ops.hf_sparse.fp8_sparse_mm(xq, torch.empty(10, dtype=E4M3), None, 768, 0, 0.5, torch.float16)
        assert out.shape == (96, 768) and out.dtype == torch.float16
        out = torch.ops.hf_sparse.fp8_sparse_gelu(xq, torch.empty(10, dtype=E4M3), None, 768, 0, 0.5, 20.0)
        assert out.shape == (96, 768) and out.dtype == E4M3
        x = torch.empty(96, 256, dtype=torch.float16)
        out = torch.ops.hf_sparse.sparse_linear(x, torch.empty(10, dtype=torch.float16), None, 512, 0, 1, -1)
        assert out.shape == (96, 512) and out.dtype == torch.float16


# -- compact FP8 checkpoints (CPU: the file format; GPU: the round trip of a swapped model) ---------------------------


def _fp8_checkpoint(folder, static=True):
    """A compact FP8 checkpoint written as save_pretrained writes one for a model swapped with fp8=..., from e4m3
    values quantized here (the CPU has no e4m3 kernels, but it quantizes and stores them)."""
    from hf_sparse import SparsityConfig
    from hf_sparse.checkpoint import attach_sparsity_metadata
    from hf_sparse.checkpoint.compact import write_compact

    model = pruned_tiny_model()
    meta = attach_sparsity_metadata(model, SparsityConfig())
    model.save_pretrained(folder)
    fp8, expected = {}, {}
    for name in meta["layers"]:
        values, scales = quantize_weight(model.get_submodule(name).weight, per_tensor=static)
        fp8[name] = (values, scales, 0.05 if static else None)
        expected[name] = values.float() * scales[:, None]
    write_compact(folder, meta, fp8)
    return model, expected


@pytest.mark.parametrize("static", [True, False])
def test_compact_fp8_checkpoint_stores_e4m3_values_positions_and_scales(tmp_path, static):
    import json

    from safetensors import safe_open

    from hf_sparse.checkpoint import COMPACT_WEIGHTS_NAME, load_state_dict

    model, expected = _fp8_checkpoint(tmp_path, static)
    name = "bert.encoder.layer.0.intermediate.dense"
    with safe_open(str(tmp_path / COMPACT_WEIGHTS_NAME), framework="pt") as f:
        values = f.get_tensor(f"{name}.weight.nm_values")
        assert values.dtype == E4M3 and values.shape[1] * 2 == model.get_submodule(name).in_features
        assert f.get_tensor(f"{name}.weight.fp8_scale").dtype == torch.float32
        assert (f"{name}.fp8_input_scale" in f.keys()) == static
        parts = (f.get_tensor(f"{name}.weight.nm_values"), f.get_tensor(f"{name}.weight.nm_indices"))
        stored = sum(t.numel() * t.element_size() for t in parts)
    dense_bytes = model.get_submodule(name).weight.numel() * 2  # the fp16 layer
    assert stored / dense_bytes == 0.3125  # e4m3 values (0.25) + 2-bit positions (0.0625), then 4 bytes per row
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "compact-nm-fp8-v2"
    assert config["sparsity"]["fp8"]["activation_scales"] == ("static" if static else "dynamic")
    state, meta = load_state_dict(tmp_path)
    for layer, weight in expected.items():
        assert torch.equal(state[f"{layer}.weight"], weight), layer  # exact: e4m3 values times their scales
    assert not any(k.endswith(("fp8_scale", "fp8_input_scale")) for k in state)
    assert meta["fp8"]["input_scales"] == pytest.approx({n: 0.05 for n in expected} if static else {})


def test_compact_fp8_checkpoint_damage_is_named_and_plain_from_pretrained_refuses_it(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForQuestionAnswering

    from hf_sparse import SparseCheckpointError
    from hf_sparse.checkpoint import COMPACT_WEIGHTS_NAME, load_state_dict

    _fp8_checkpoint(tmp_path)
    with pytest.raises(SparseCheckpointError, match=r"holds FP8 \(e4m3\) layers.*hf_sparse.from_pretrained"):
        AutoModelForQuestionAnswering.from_pretrained(tmp_path)  # would read e4m3 values without their scales
    file = tmp_path / COMPACT_WEIGHTS_NAME
    tensors = load_file(file)
    key = "bert.encoder.layer.1.output.dense.weight.fp8_scale"
    save_file({**tensors, key: tensors[key][:-1]}, file)
    with pytest.raises(SparseCheckpointError, match=r"layer bert.encoder.layer.1.output.dense: its e4m3 scales.*"):
        load_state_dict(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != key}, file)
    with pytest.raises(SparseCheckpointError, match=r"bert.encoder.layer.1.output.dense.*no scales"):
        load_state_dict(tmp_path)
    scale = "bert.encoder.layer.0.attention.self.key.fp8_input_scale"
    save_file({**tensors, scale: torch.tensor(float("nan"))}, file)
    with pytest.raises(SparseCheckpointError, match=r"layer bert.encoder.layer.0.attention.self.key: its input scale"):
        load_state_dict(tmp_path)


@needs_fp8_gpu
@pytest.mark.parametrize("activation_scales", ["static", "dynamic"])
def test_an_fp8_model_saves_compact_and_loads_fast_as_the_same_model(tmp_path, activation_scales):
    import hf_sparse
    from hf_sparse import SparsityConfig

    model = _fp8_model()
    hf_sparse.checkpoint.attach_sparsity_metadata(model, SparsityConfig())
    calibration = [_inputs(seed=s) for s in range(3)] if activation_scales == "static" else None
    swap_to_semi_structured_(model, fp8=Fp8Config(activation_scales, calibration), autotune=False)
    inputs = _inputs()
    with torch.no_grad():
        before = model(**inputs).start_logits
    hf_sparse.save_pretrained(model, tmp_path, compact=True)
    # fast=True: the saved FP8 layers run in FP8 again with their saved input scales, each on the kernel the
    # autotuner finds fastest at the default token counts (so not necessarily the 2:4 one everywhere)
    fast = hf_sparse.from_pretrained(tmp_path, fast=True, dtype=torch.float16)
    assert "Fp8Linear" in {type(m).__name__ for m in fast.modules()}
    with torch.no_grad():
        assert rel_error(fast(**inputs).start_logits, before) < 0.08
    # the same kernels as before the save give the same model
    _, meta = hf_sparse.checkpoint.load_state_dict(tmp_path)
    loaded = hf_sparse.from_pretrained(tmp_path, dtype=torch.float16).cuda()
    assert all(type(m).__name__ != "Fp8Linear" for m in loaded.modules())  # dequantized and dense until swapped
    config = Fp8Config(activation_scales, input_scales=meta["fp8"]["input_scales"] or None)
    swap_to_semi_structured_(loaded, layers=meta["fp8"]["layers"], fp8=config, autotune=False)
    with torch.no_grad():
        after = loaded(**inputs).start_logits
    # Same e4m3 values and input scales; the weight scales move by ~5e-4 (re-quantized from the fp16 model), which
    # static scales see as such and dynamic ones through the bfloat16 product's rounding (3.8e-3 measured, H100).
    tolerance = 2e-3 if activation_scales == "static" else 1e-2
    assert rel_error(after, before) < tolerance, rel_error(after, before)


@needs_fp8_gpu
def test_new_weights_after_a_capture_run_with_their_new_scales():
    # Not yet run on a GPU (written after the session's device time was spent): static scales live in the
    # captured launch as a host value, so loading new weights must drop the graphs that hold the old one.
    model = _fp8_model()
    calibration = [_inputs(seed=s) for s in range(3)]
    swap_to_semi_structured_(model, fp8=Fp8Config(calibration=calibration), autotune=False)
    inputs = _inputs()
    state = model.state_dict()
    doubled = {k: v * 2 if k.endswith("intermediate.dense.weight") else v for k, v in state.items()}
    with torch.no_grad():
        model(**inputs)  # captured
        model.load_state_dict(doubled)
        graphed = model(**inputs).start_logits
        model.forward.enabled = False
        plain = model(**inputs).start_logits
    assert torch.equal(graphed, plain)


def test_each_fp8_layer_exports_what_a_compact_checkpoint_stores():
    # dense FP8 layers are built and read on the CPU (the 2:4 ones need cuSPARSELt to compress)
    from hf_sparse.inference.fp8 import Fp8Linear
    from hf_sparse.inference.layers import FusedLinearSlice, SemiStructuredLinear, _FusedGroup

    torch.manual_seed(0)
    weight, bias = torch.randn(64, 32, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
    layer = Fp8Linear(weight, bias, sparse=False, input_scale=0.05, name="ffn")
    values, scales, input_scale = layer.compact_fp8_tensors()
    assert values.dtype == E4M3 and torch.equal(values.float(), layer.e4m3_weight().float())
    assert torch.equal(scales, layer.weight_scale) and input_scale == pytest.approx(0.05)
    fused = Fp8Linear(weight, bias, sparse=False, name="{q,k}", emits_state=False)  # dynamic scales
    assert fused.compact_fp8_tensors() is None  # its members store their rows
    group = _FusedGroup(fused, ["q", "k"])
    k = FusedLinearSlice(group, 1, slice(48, 64))
    values, scales, input_scale = k.compact_fp8_tensors()
    assert torch.equal(values.float(), fused.e4m3_weight()[48:64].float()) and torch.equal(
        scales, fused.weight_scale[48:]
    )
    assert input_scale is None
    dense = SemiStructuredLinear(weight, bias, sparse=False, name="d", emits_state=False)
    assert dense.compact_fp8_tensors() is None  # an fp16 layer: its dense weight is what is saved
    assert FusedLinearSlice(_FusedGroup(dense, ["a"]), 0, slice(0, 64)).compact_fp8_tensors() is None
