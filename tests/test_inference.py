import logging
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_sparse import SparsityCallback, SparsityConfig, prune_, swap_to_semi_structured_
from hf_sparse.inference import fp8_policy, policy
from hf_sparse.inference.cuda_graphs import EagerGraphs, _clone_output, _signature
from hf_sparse.inference.cutlass_linear import CutlassSparseLinear
from hf_sparse.inference.kernels import CUSPARSELT, CUTLASS, DENSE
from hf_sparse.inference.kernels.base import Gelu, GemmRequest, Run, Timing, Weights, token_bucket
from hf_sparse.inference.kernels.cusparselt import support_problem
from hf_sparse.inference.layers import Plan, SemiStructuredLinear
from hf_sparse.inference.swap import LayerSwap, SwapReport
from hf_sparse.inference.units import DEFAULT_FUSE_GROUPS, find_units
from tests.conftest import needs_gpu, tiny_bert_config
from tests.test_autotune import FakeTimings


def pruned_tiny_model(**overrides):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config(**overrides)).eval()
    prune_(model)
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_untouched(model, before):
    state, types = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types


# -- refusals (CPU) --------------------------------------------------------------------------------------------------


def test_support_problem_explains_each_refusal():
    assert support_problem("cuda", torch.float16, (9, 0), "NVIDIA H200") is None
    assert support_problem("cuda", torch.bfloat16, (8, 0)) is None
    cpu = support_problem("cpu", torch.float16, layer="bert.encoder.layer.0.output.dense")
    assert "compute capability 8.0" in cpu and "on cpu" in cpu and "model.to('cuda')" in cpu
    assert "bert.encoder.layer.0.output.dense" in cpu
    old = support_problem("cuda", torch.float16, (7, 5), "Tesla T4")
    assert "found 7.5 (Tesla T4)" in old and "Keep the dense model" in old
    fp32 = support_problem("cuda", torch.float32, (9, 0), layer="x.query")
    assert "float16 or bfloat16" in fp32 and "float32" in fp32 and "model.half()" in fp32 and "x.query" in fp32
    no_lib = support_problem("cuda", torch.float16, (9, 0), cusparselt_available=False)
    assert "cuSPARSELt" in no_lib and "is_available() is False" in no_lib


def test_cpu_model_is_refused_and_left_usable():
    model = pruned_tiny_model().half()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"NVIDIA GPU of compute capability 8\.0.*not changed"):
        swap_to_semi_structured_(model, autotune=False)
    assert_untouched(model, before)
    out = model.float()(input_ids=torch.randint(0, 128, (2, 16)))  # still an ordinary, usable model
    assert out.start_logits.shape == (2, 16)


def test_layers_that_are_not_2_4_are_named_and_nothing_changes():
    model = pruned_tiny_model()
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight.fill_(0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense'\] are not exactly 2:4"):
        swap_to_semi_structured_(model, SparsityConfig(), autotune=False)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense'\] are not exactly 2:4"):
        swap_to_semi_structured_(model, ["bert.encoder.layer.1.intermediate.dense"], autotune=False)
    assert_untouched(model, before)


def test_a_model_without_2_4_layers_is_refused():
    from transformers import BertForQuestionAnswering

    model = BertForQuestionAnswering(tiny_bert_config())
    with pytest.raises(ValueError, match="no exactly-2:4 nn.Linear layer found.*prune the model first"):
        swap_to_semi_structured_(model, autotune=False)


def test_bad_arguments_are_refused():
    model = pruned_tiny_model()
    with pytest.raises(ValueError, match="dense_fallback must be one of"):
        swap_to_semi_structured_(model, dense_fallback="sometimes")
    with pytest.raises(ValueError, match="token_counts must be positive"):
        swap_to_semi_structured_(model, token_counts=[0])
    with pytest.raises(ValueError, match="only nn.Linear"):
        swap_to_semi_structured_(model, ["bert.encoder.layer.0.attention"])
    with pytest.raises(ValueError, match="2:4 sparsity only"):
        swap_to_semi_structured_(model, SparsityConfig(sparsity_pattern="1:4"))


# -- planning and the report (CPU) -----------------------------------------------------------------------------------


def test_units_fuse_query_key_value_of_2_4_layers_only():
    model = pruned_tiny_model()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.key.weight.fill_(1.0)  # breaks 2:4: no fusion in layer 1
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units, not_nm = find_units(model, linears, [("query", "key", "value")])
    names = [u.name for u in units]
    assert names[0] == "bert.encoder.layer.0.attention.self.{query,key,value}"
    assert units[0].shape == (192, 64)
    assert "bert.encoder.layer.1.attention.self.query" in names
    assert "bert.encoder.layer.1.attention.self.value" in names
    assert [u.name for u in not_nm] == ["bert.encoder.layer.1.attention.self.key", "qa_outputs"]
    assert len(units) == 4 + 5  # layer 0: fused qkv + 3 others; layer 1: query and value unfused + 3 others
    assert torch.equal(units[0].weight[64:128], model.bert.encoder.layer[0].attention.self.key.weight)


FP16_KERNELS = (DENSE, CUSPARSELT, CUTLASS)


def decide(units, tuner, counts, fallback="auto", kernels=FP16_KERNELS, fp8=None, unavailable=None):
    """What the swap decides for `units` with `tuner`'s (fake) timings at `counts`: the policy's plans, through the
    same calls the swap makes (every kernel runs here, but those named in `unavailable`: name -> why not)."""
    buckets = {}
    for tokens in counts if tuner is not None else ():
        buckets.setdefault(token_bucket(tokens), tokens)
    min_speedup = tuner.min_speedup if tuner is not None else policy.MIN_SPEEDUP
    options = policy.Options(policy.DenseFallback(fallback), min_speedup, buckets, fp8)
    in_play = policy.Kernels(kernels, lambda kernel, unit: (unavailable or {}).get(kernel.name))
    rules = policy if fp8 is None else fp8_policy
    needed = rules.requests(units, in_play, options)
    timings = dict(zip(needed, tuner.timings(needed, "cpu"))) if needed else {}
    return rules.decide(units, in_play, timings, options)


def test_decisions_follow_the_timings():
    model = pruned_tiny_model(hidden_size=64, intermediate_size=128)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units, _ = find_units(model, linears, [])
    unit = units[:1]  # 64x64
    tuner = FakeTimings(cache_path=False, sparse_from=4096)  # dense below 4096 tokens, sparse from there on

    (plan,) = decide(unit, tuner, [1536, 98304], "copy")
    assert plan.status == "sparse+dense" and "dense copy kept" in plan.reason
    assert "1536: 0.80x, 98304: 1.20x" in plan.reason
    assert plan.runs == {2048: Run("dense"), 131072: Run("cusparselt", (3, 1, -1))}
    assert plan.holds == (CUSPARSELT, DENSE) and plan.keep_dense
    assert plan.times == {1536: (1.2, 1.2), 98304: (1.2, 1.0)}

    (plan,) = decide(unit, tuner, [1536, 98304], "none")
    assert plan.status == "sparse" and "dense_fallback='none'" in plan.reason
    assert plan.runs == {2048: Run("cusparselt", (3, 1, -1)), 131072: Run("cusparselt", (3, 1, -1))}
    assert plan.times == {1536: (1.2, 1.5), 98304: (1.2, 1.0)}  # runs sparse where dense is faster

    (plan,) = decide(unit, tuner, [8192, 98304], "copy")
    assert plan.status == "sparse" and "faster at every tuned token count" in plan.reason

    (plan,) = decide(unit, tuner, [512, 1536], "none")
    assert plan.status == "dense" and "dense is faster at every tuned token count" in plan.reason
    assert plan.runs == {512: Run("dense"), 2048: Run("dense")} and plan.holds == (DENSE,)

    (plan,) = decide(unit, None, [512], "copy")
    assert plan.status == "sparse" and "autotune off" in plan.reason and plan.runs == {}


def test_auto_fallback_keeps_dense_copies_within_the_dense_bytes():
    model = pruned_tiny_model(hidden_size=64, intermediate_size=128)  # per layer: 192x64, 64x64, 128x64, 64x128
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units, _ = find_units(model, linears, DEFAULT_FUSE_GROUPS)
    tuner = FakeTimings(cache_path=False, sparse_from=4096)  # every unit: dense wins at 1536 tokens, sparse at 98304
    assert {p.status for p in decide(units, tuner, [1536, 98304], "copy")} == {"sparse+dense"}  # all mixed
    decided = decide(units, tuner, [1536, 98304], "auto")
    kept = [p.unit.name.split("layer.")[1] for p in decided if p.status == "sparse+dense"]
    # The same loss per call for every unit: the largest units give up least per byte, so they drop their copies
    # first, until the swapped layers fit in their dense bytes; the smallest keep theirs.
    assert kept == ["0.attention.output.dense", "1.attention.output.dense", "1.intermediate.dense", "1.output.dense"]
    dense = sum(u.dense_bytes for u in units)
    after = sum(p.unit.dense_bytes * 9 // 16 + (p.unit.dense_bytes if p.keep_dense else 0) for p in decided)
    assert after <= dense < after + min(p.unit.dense_bytes for p in decided if p.status == "sparse")
    for p in decided:
        assert ("within the dense weights' bytes" in p.reason) == (p.status == "sparse+dense")
        assert ("would take the swapped layers over their dense bytes" in p.reason) == (p.status == "sparse")


def test_decisions_keep_misaligned_shapes_dense():
    layer = nn.Linear(40, 24)  # 24 output rows: not a multiple of 16
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(10))
    units, _ = find_units(nn.Sequential(layer), {"0": layer}, [])
    (plan,) = decide(units, FakeTimings(cache_path=False), [64], "copy")
    assert plan.status == "dense" and "multiples of 16" in plan.reason and "24x40" in plan.reason


class TileKernel:
    """A 2:4 kernel a test adds: one class (the members of `kernels.base.Kernel`) and one entry in `KERNELS`. It runs
    anywhere (its layer computes densely) and takes layers of at least 128 output features."""

    name, label, status, untuned = "tile", "tile kernel", "sparse", "the tile kernel's first tile"
    weights, sparse, gelu, gelu_dtypes, groups, row_align = Weights.MODEL, True, Gelu.NONE, (), True, 8

    def unsupported_reason(self, device, dtype, layer=""):
        return None

    def shape_problem(self, shape, dtype):
        return None if shape[0] >= 128 else f"the tile kernel needs 128 output features or more; got {shape[0]}"

    def weight_bytes(self, shape, dtype):
        return shape[0] * shape[1] * dtype.itemsize * 9 // 16

    def version(self):
        return "v1"

    def problem(self, request, inputs, settings):
        raise AssertionError("timed by the test's autotuner, never swept")

    def layer(self, spec):
        layer = SemiStructuredLinear(
            spec.weight, spec.bias, sparse=False, name=spec.name, emits_state=spec.emits_state
        )
        layer.kernel = self.name
        return layer

    def describe(self, config, gelu):
        return f"tile {config[0]}"


class TileTimings(FakeTimings):
    """`FakeTimings`, and the tile kernel: 0.9 ms on the fused query/key/value GEMM, 1.6 ms elsewhere."""

    def measure(self, request):
        if request.kernel == "tile":
            return Timing(0.9 if request.out_features == 192 else 1.6, (7,), request.tokens, 3)
        return super().measure(request)


def test_a_kernel_added_by_one_class_and_one_line_runs_where_its_timings_win(monkeypatch):
    from hf_sparse import restore_dense_
    from hf_sparse.inference import kernels

    monkeypatch.setattr(kernels, "KERNELS", (*kernels.KERNELS, TileKernel()))  # the one line
    model = pruned_tiny_model(hidden_size=64, intermediate_size=128)  # on the CPU: cuSPARSELt cannot run here
    inputs = {"input_ids": torch.randint(0, 128, (2, 16))}
    with torch.no_grad():
        expected = model(**inputs).start_logits
    tuner = TileTimings(cache_path=False)
    report = swap_to_semi_structured_(model, token_counts=[1536, 98304], autotune=tuner, dense_fallback="copy")
    rows = {r.name.removeprefix("bert.encoder.layer.0."): r for r in report}
    qkv = rows["attention.self.{query,key,value}"]
    assert qkv.status == "sparse" and qkv.plans == {2048: "tile 7", 131072: "tile 7"}  # 1.2 ms dense against 0.9
    assert qkv.times == {1536: (1.2, 0.9), 98304: (1.2, 0.9)}
    assert model.bert.encoder.layer[0].attention.self.hf_sparse_fused_query_key_value.kernel == "tile"
    assert rows["intermediate.dense"].status == "dense"  # 1.6 ms: dense wins there
    assert "dense is faster at every tuned token count" in rows["intermediate.dense"].reason
    assert rows["output.dense"].status == "dense" and "cuSPARSELt" in rows["output.dense"].reason  # too few rows
    assert type(model.bert.encoder.layer[0].intermediate.dense) is nn.Linear
    assert {r.kernel for r in tuner.calls} == {"dense", "tile"}  # cuSPARSELt and CUTLASS cannot run on the CPU
    with torch.no_grad():
        assert torch.allclose(model(**inputs).start_logits, expected, atol=1e-5)
    assert restore_dense_(model) and all(not isinstance(m, SemiStructuredLinear) for m in model.modules())


def test_a_later_kernel_replaces_an_earlier_one_only_where_it_is_at_least_1_percent_faster(monkeypatch):
    from hf_sparse.inference import kernels

    tile = TileKernel()
    monkeypatch.setattr(kernels, "KERNELS", (*kernels.KERNELS, tile))

    class Timings(FakeTimings):  # cuSPARSELt 1.0 ms; the tile kernel 0.9 on query/key/value, 0.995 on the rest
        def measure(self, request):
            if request.kernel == "tile":
                return Timing(0.9 if request.out_features == 384 else 0.995, (7,), request.tokens, 3)
            return super().measure(request)

    model = pruned_tiny_model(hidden_size=128, intermediate_size=128)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units, _ = find_units(model, linears, DEFAULT_FUSE_GROUPS)
    plans = decide(units, Timings(cache_path=False), [8192], "copy", kernels=(*FP16_KERNELS, tile))
    by_name = {p.unit.name.removeprefix("bert.encoder.layer.0."): p for p in plans}
    qkv = by_name["attention.self.{query,key,value}"]  # 384x128
    assert qkv.kernel.name == "tile" and qkv.runs == {8192: Run("tile", (7,))}
    assert "runs on the tile kernel (bias in its epilogue): 1.11x the cuSPARSELt GEMM" in qkv.reason
    near = by_name["intermediate.dense"]  # 1.005x: a near tie stays on the kernel listed first
    assert near.kernel.name == "cusparselt" and "tile" not in near.reason


def test_report_memory_and_table():
    mb = 768 * 768 * 2
    report = SwapReport(
        [
            LayerSwap("a.{query,key,value}", (2304, 768), "sparse", "fast", 3 * mb, 3 * mb * 9 // 16),
            LayerSwap("a.output.dense", (768, 768), "sparse+dense", "mixed", mb, mb + mb * 9 // 16),
            LayerSwap("a.small", (768, 768), "dense", "dense wins", mb, mb),
            LayerSwap("qa_outputs", (2, 768), "not 2:4", "weight is not 2:4", 3072, 3072),
        ]
    )
    assert [r.name for r in report.swapped] == ["a.{query,key,value}", "a.output.dense"]
    assert report.memory_ratio == pytest.approx((3 * 9 / 16 + 1 + 9 / 16) / 4)
    assert report.memory_ratio_2_4 == pytest.approx((3 * 9 / 16 + 1 + 9 / 16 + 1) / 5)
    table = report.format()
    assert "a.{query,key,value}" in table and "  0.562  fast" in table and "sparse+dense" in table
    assert table.splitlines()[-1].startswith(
        "2 of 3 2:4 layer(s) swapped; weight memory of the swapped layers: 0.812x dense (all 2:4 layers: 0.850x)"
    )


def test_report_shows_measured_speed_per_token_count_and_in_total():
    report = SwapReport(
        [
            LayerSwap("a.qkv", (2304, 768), "sparse", "fast", 9, 5, times={1536: (1.0, 1.25), 98304: (10.0, 8.0)}),
            LayerSwap("a.out", (768, 768), "sparse+dense", "mixed", 3, 4, times={1536: (1.0, 1.0), 98304: (4.0, 4.0)}),
        ]
    )
    assert report.token_counts == [1536, 98304]
    assert report.gemm_speedup(1536) == pytest.approx(2.0 / 2.25)
    assert report.gemm_speedup(98304) == pytest.approx(14.0 / 12.0)
    assert report.gemm_speedup(64) is None
    lines = report.format().splitlines()
    assert lines[0].split()[:6] == ["layer", "out", "x", "in", "status", "memory"] and "x@98304" in lines[0]
    assert "     0.80       1.25  fast" in lines[1]
    assert lines[-1] == (
        "GEMM time of the 2:4 layers vs dense (autotuner's per-GEMM timings; > 1 is faster): 1536 tokens 0.89x, "
        "98304 tokens 1.17x"
    )


def test_eager_fast_path_remembers_the_kernel_per_token_count_and_forgets_it_on_move():
    torch.manual_seed(0)
    weight, bias = torch.randn(32, 16), torch.randn(32)
    layer = SemiStructuredLinear(weight, bias, sparse=False, name="fused")  # the dense fused baseline runs on CPU
    x = torch.randn(2, 5, 16)
    first = layer(x)
    assert list(layer._eager) == [(10, torch.float32)]
    assert torch.equal(layer(x), first) and torch.equal(first, torch.nn.functional.linear(x, weight, bias))
    with pytest.raises(RuntimeError):
        layer(torch.randn(5, 32))  # 10 rows of 16 would match the numel, but not the layer's input size
    layer.double()
    assert layer._eager == {}  # the remembered kernel held the float32 tensors
    assert torch.allclose(layer(x.double()), first.double(), atol=1e-5)


def test_a_swapped_layer_round_trips_its_dense_weight_through_a_strict_state_dict():
    torch.manual_seed(0)
    weight, bias = torch.randn(32, 16), torch.randn(32)
    model = torch.nn.Sequential(SemiStructuredLinear(weight, bias, sparse=False, name="0"))
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias"] and torch.equal(state["0.weight"], weight)
    new_weight, new_bias = torch.randn(32, 16), torch.randn(32)
    result = model.load_state_dict({"0.weight": new_weight, "0.bias": new_bias}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model[0].weight, new_weight) and torch.equal(model[0].bias, new_bias)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.bias"'):
        model.load_state_dict({"0.weight": weight}, strict=True)


# -- Trainer option and graph helpers (CPU) --------------------------------------------------------------------------


def test_swap_at_end_is_off_by_default_and_documented():
    from dataclasses import fields

    assert SparsityConfig().swap_at_end is False
    help_text = {f.name: f.metadata["help"] for f in fields(SparsityConfig)}["swap_at_end"]
    assert "cuSPARSELt" in help_text and "compute capability" in help_text


def test_swap_at_end_on_cpu_logs_why_and_leaves_the_model(caplog):
    model = pruned_tiny_model()
    callback = SparsityCallback(SparsityConfig(swap_at_end=True))
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        callback.on_train_end(args=None, state=None, control=None, model=model)
    assert "swap_at_end: the model stays dense" in caplog.text and "on cpu" in caplog.text
    assert_untouched(model, before)
    assert "forward" not in model.__dict__


def test_graph_keys_and_output_copies():
    from transformers.modeling_outputs import QuestionAnsweringModelOutput

    a = torch.zeros(2, 8, dtype=torch.long)
    assert _signature([a]) == _signature([torch.ones(2, 8, dtype=torch.long)])
    assert _signature([a]) != _signature([torch.zeros(4, 8, dtype=torch.long)])
    assert _signature({"return_dict": True}) != _signature({"return_dict": False})
    with pytest.raises(TypeError, match="cannot key a graph"):
        _signature([object.__new__(type("Odd", (), {"__hash__": None}))])
    out = QuestionAnsweringModelOutput(start_logits=torch.ones(2), end_logits=torch.zeros(2))
    copy = _clone_output(out)
    assert isinstance(copy, QuestionAnsweringModelOutput) and copy.loss is None
    assert torch.equal(copy.start_logits, out.start_logits) and copy.start_logits is not out.start_logits


# -- GPU -------------------------------------------------------------------------------------------------------------

GPU_CONFIG = dict(
    vocab_size=512, hidden_size=256, num_attention_heads=4, intermediate_size=1024, max_position_embeddings=256
)


def gpu_model(dtype=torch.float16):
    return pruned_tiny_model(**GPU_CONFIG).to("cuda", dtype)


def gpu_inputs(batch=2, seq=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {"input_ids": torch.randint(0, 512, (batch, seq), device="cuda", generator=g)}


_TUNE_DIR = tempfile.mkdtemp(prefix="hf_sparse_test_tune_")


def quick_tuner(tmp_path, **kwargs):
    """A fast autotuner whose timings are shared by the GPU tests of this session (tmp_path is unused: the cache
    must outlive one test so every parametrization does not tune the same shapes again)."""
    from hf_sparse.inference import Autotuner

    name = "tune.json" if not kwargs else f"tune-{sorted(kwargs.items())}.json"
    # In this process: the child-process sweep has its own tests (test_cusparselt.py), and a child per swap is slow.
    return Autotuner(cache_path=Path(_TUNE_DIR) / name, reps=3, max_algorithms=2, isolate=False, **kwargs)


def rel_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("fallback", ["copy", "none"])
def test_swapped_model_matches_masked_dense(tmp_path, dtype, fuse, fallback):
    model = gpu_model(dtype)
    inputs = gpu_inputs()
    with torch.no_grad():
        expected = model(**inputs)
        report = swap_to_semi_structured_(
            model, fuse_qkv=fuse, token_counts=[128, 4096], dense_fallback=fallback, autotune=quick_tuner(tmp_path)
        )
        got = model(**inputs)
        big = gpu_inputs(batch=16, seq=256, seed=1)
        got_big = model(**big)  # another token bucket, tuned lazily
    assert len(report.swapped) + len(report.rows("dense")) == (4 if fuse else 6) * 2
    assert report.rows("not 2:4")[0].name == "qa_outputs"
    swapped_types = (SemiStructuredLinear, CutlassSparseLinear, nn.Linear)  # CUTLASS: an H100/H200 with its toolchain
    assert isinstance(model.bert.encoder.layer[0].output.dense, swapped_types)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert rel_error(got.start_logits, expected.start_logits) < tol
    assert rel_error(got.end_logits, expected.end_logits) < tol
    restored = _dense_twin(model)
    with torch.no_grad():
        assert rel_error(got_big.start_logits, restored(**big).start_logits) < tol


def _dense_twin(model):
    import copy

    from hf_sparse import restore_dense_

    twin = copy.deepcopy(model)
    restore_dense_(twin)
    assert not any(isinstance(m, (SemiStructuredLinear, CutlassSparseLinear)) for m in twin.modules())
    return twin


@needs_gpu
def test_compressed_weights_decompress_exactly_and_use_less_memory(tmp_path):
    model = gpu_model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    report = swap_to_semi_structured_(model, token_counts=[], autotune=False)
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, SemiStructuredLinear) and layer.dense_weight is None
    assert torch.equal(layer.weight, dense["bert.encoder.layer.0.intermediate.dense.weight"])
    assert layer.weight_bytes == 1024 * 256 * 2 * 9 // 16
    assert report.memory_ratio == pytest.approx(9 / 16)


@needs_gpu
def test_swapped_model_saves_an_ordinary_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import BertForQuestionAnswering

    model = gpu_model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    swap_to_semi_structured_(model, token_counts=[128], autotune=quick_tuner(tmp_path))
    state = model.state_dict()
    assert list(state) == list(dense)  # the same keys, in the same order
    assert all(type(v) is torch.Tensor and torch.equal(v, dense[k]) for k, v in state.items())

    model.save_pretrained(tmp_path / "ckpt")
    on_disk = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert sorted(on_disk) == sorted(k for k in dense if "position_ids" not in k)
    reloaded = BertForQuestionAnswering.from_pretrained(tmp_path / "ckpt", dtype=torch.float16).to("cuda")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, dense[key]), key

    # and a swapped model loads dense weights back (recompressing them)
    twin = gpu_model()
    swap_to_semi_structured_(twin, token_counts=[128], autotune=quick_tuner(tmp_path))
    twin.load_state_dict(dense)
    assert all(torch.equal(v, dense[k]) for k, v in twin.state_dict().items())


@needs_gpu
def test_autotune_runs_dense_when_dense_is_faster(tmp_path):
    import torch.nn.functional as F

    tuner = quick_tuner(tmp_path, min_speedup=1e9)  # sparse would have to be 1e9x faster: dense always wins
    model = gpu_model()
    weight = model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    bias = model.bert.encoder.layer[0].intermediate.dense.bias.detach().clone()
    report = swap_to_semi_structured_(model, fuse_qkv=False, token_counts=[128], autotune=tuner)
    assert {r.status for r in report if r.status != "not 2:4"} == {"dense"}
    gemm = GemmRequest("cusparselt", 1024, 256, torch.float16, True, 128)
    dense, sparse = tuner.cached(gemm.on("dense"), "cuda"), tuner.cached(gemm, "cuda")
    assert dense.ms > 0 and sparse.ms > 0 and sparse.candidates >= 1 and not policy.wins(dense, sparse, 1e9)
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert type(layer) is nn.Linear  # nothing swapped where dense is faster

    # with a normal margin, a layer that holds a dense copy runs dense exactly where its plan says so
    model = gpu_model()
    swap_to_semi_structured_(model, fuse_qkv=False, token_counts=[], autotune=False)
    sparse_layer = SemiStructuredLinear(weight, bias, plans={128: Plan("dense")}, keep_dense=True, name="t")
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.float16)
    assert torch.equal(sparse_layer(x), F.linear(x, weight, bias))


@needs_gpu
def test_cuda_graphs_match_eager(tmp_path):
    from hf_sparse import cuda_graphs

    model = gpu_model()
    # eager_graphs=False: "eager" below is the plain forward, not the swapped model's own graphs
    swap_to_semi_structured_(model, token_counts=[128, 512], autotune=quick_tuner(tmp_path), eager_graphs=False)
    assert "forward" not in model.__dict__
    fast = cuda_graphs(model)
    for seed, batch in ((0, 2), (1, 2), (2, 8)):
        inputs = gpu_inputs(batch=batch, seed=seed)
        with torch.no_grad():
            eager = model(**inputs)
        graphed = fast(**inputs)
        assert rel_error(graphed.start_logits, eager.start_logits) < 2e-3
        assert rel_error(graphed.end_logits, eager.end_logits) < 2e-3
    assert fast.num_graphs == 2  # batch 2 (captured once, replayed) and batch 8


@needs_gpu
def test_compiled_swapped_model_has_no_graph_breaks_and_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    from hf_sparse import cuda_graphs

    model = gpu_model()
    swap_to_semi_structured_(model, token_counts=[128], autotune=quick_tuner(tmp_path))
    inputs = gpu_inputs(batch=2)
    with torch.no_grad():
        eager = model(**inputs)
    torch._dynamo.reset()
    counters.clear()
    fast = cuda_graphs(torch.compile(model, dynamic=False).eval())
    compiled = fast(**inputs)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert rel_error(compiled.start_logits, eager.start_logits) < 1e-2
    assert rel_error(compiled.end_logits, eager.end_logits) < 1e-2


@needs_gpu
def test_fp32_gpu_model_is_refused_and_left_usable():
    model = pruned_tiny_model(**GPU_CONFIG).to("cuda")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="float16 or bfloat16.*not changed"):
        swap_to_semi_structured_(model, autotune=False)
    assert_untouched(model, before)


@needs_gpu
def test_swap_at_end_swaps_on_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_CACHE", str(tmp_path / "tune.json"))
    import hf_sparse.inference.autotune as autotune

    # sparse wins every measurement (min_speedup ~0), so layers are swapped whatever this GPU measures
    monkeypatch.setattr(
        autotune, "_DEFAULT_TUNER", autotune.Autotuner(cache_path=False, min_speedup=1e-6, reps=2, max_algorithms=4)
    )
    model = gpu_model(torch.bfloat16)
    inputs = gpu_inputs()
    with torch.no_grad():
        expected = model(**inputs).start_logits
    callback = SparsityCallback(SparsityConfig(swap_at_end=True))
    callback.on_train_end(args=None, state=None, control=None, model=model)
    assert any(isinstance(m, SemiStructuredLinear) for m in model.modules())
    assert isinstance(model.__dict__["forward"], EagerGraphs)  # model(...) goes through CUDA graphs now
    with torch.no_grad():
        assert rel_error(model(**inputs).start_logits, expected) < 3e-2
    assert model.forward.captures == 1


@needs_gpu
def test_a_swapped_model_graphs_its_own_inference_calls_safely(tmp_path, caplog):
    from hf_sparse import cuda_graphs

    model = gpu_model()
    report = swap_to_semi_structured_(model, autotune=False)  # every layer sparse: kept cuSPARSELt plans
    runner = model.__dict__["forward"]
    assert isinstance(runner, EagerGraphs) and report.eager_graphs and "CUDA graphs" in report.format()
    a, b = gpu_inputs(seed=0), gpu_inputs(seed=1)
    runner.enabled = False
    with torch.no_grad():
        plain_a, plain_b = model(**a).start_logits, model(**b).start_logits
    runner.enabled = True
    assert runner.captures == 0
    with torch.no_grad():
        got_a = model(**a).start_logits
        got_b = model(**b).start_logits  # same shape: the graph replays with b's values
    assert runner.captures == 1 and runner.num_graphs == 1
    assert torch.equal(got_a, plain_a) and torch.equal(got_b, plain_b)  # same kernels, and got_a not overwritten
    # calls that must not be graphed run the plain forward: with gradients, in training mode
    with torch.enable_grad():
        out = model(**a).start_logits
    assert out.requires_grad and runner.captures == 1
    model.train()
    with torch.no_grad():
        model(**a)
    model.eval()
    assert runner.captures == 1
    # an explicit cuda_graphs() over it graphs the model's own forward, not the runner (no graph inside a graph)
    outer = cuda_graphs(model)
    assert torch.equal(outer(**a).start_logits, plain_a) and runner.captures == 1
    # moving the model drops the graphs captured over the old tensors (and restarts the capture count)
    captured = next(iter(runner._graphs.values()))
    model.to(torch.bfloat16)
    with torch.no_grad():
        moved = model(**a).start_logits
    assert runner.num_graphs == 1 and runner.captures == 1 and moved.dtype == torch.bfloat16
    assert next(iter(runner._graphs.values())) is not captured
    assert rel_error(moved, plain_a) < 3e-2


@needs_gpu
def test_a_forward_that_cannot_be_captured_runs_plainly_with_a_warning(caplog):
    class Syncs(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4, device="cuda"))

        def forward(self, x):
            if float(x.sum()) > 1e9:  # a host sync: not allowed while capturing
                return x
            return x * self.scale

    module = Syncs().eval()
    module.forward = EagerGraphs(module)
    x = torch.arange(4.0, device="cuda")
    with caplog.at_level("WARNING", logger="hf_sparse.inference.cuda_graphs"), torch.no_grad():
        first = module(x)
        second = module(x + 1)
    assert torch.equal(first, x) and torch.equal(second, x + 1)
    assert "could not capture Syncs as a CUDA graph" in caplog.text and module.forward.num_graphs == 0
    assert caplog.text.count("could not capture") == 1  # that shape is not tried again


def test_a_cast_that_a_swapped_layer_refuses_leaves_the_whole_model_as_it_was(monkeypatch):
    import copy
    import pickle

    from hf_sparse.inference.layers import _probe
    from hf_sparse.inference.swap import fuse_qkv_, guard_casts, restore_dense_

    model = pruned_tiny_model(hidden_size=64, intermediate_size=128).half()
    fuse_qkv_(model)  # SemiStructuredLinear layers that a CPU can hold
    guard_casts(model)  # what swap_to_semi_structured_ installs
    monkeypatch.setattr(
        SemiStructuredLinear,
        "cast_problem",
        lambda self, fn: "layer X: no float32 here." if _probe(fn, self.dense_weight)[0] == torch.float32 else None,
    )
    before = snapshot(model)
    with pytest.raises(TypeError, match="layer X: no float32 here. The model was not changed."):
        model.float()
    assert_untouched(model, before)  # the embeddings before the first swapped layer were not cast either
    with pytest.raises(TypeError, match="The model was not changed"):
        model.to(torch.float32)
    model.half()  # what no layer refuses runs as ever
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # copies keep the guard, bound to them
        assert twin._apply.model is twin
        with pytest.raises(TypeError, match="no float32 here"):
            twin.float()
    restore_dense_(model)
    assert "_apply" not in model.__dict__
    assert model.float().bert.embeddings.word_embeddings.weight.dtype == torch.float32
