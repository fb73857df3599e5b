"""The CUTLASS 2:4 kernel, with GELU in its epilogue or not (`cutlass.py`, `cutlass_linear.py`, `kernels/cutlass.py`),
and how the swap decides to use it. The decisions and refusals run on the CPU; the kernels need an sm_90 GPU (H100, H200) with nvcc and the
`nvidia-cutlass` headers, and are skipped with a reason elsewhere."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_sparse import prune_, swap_to_semi_structured_
from hf_sparse.inference import cutlass
from hf_sparse.inference.kernels import CUSPARSELT, CUTLASS
from hf_sparse.inference.kernels.base import GemmRequest, Run, Timing
from hf_sparse.inference.layers import GeluInEpilogue, Plan
from hf_sparse.inference.policy import fits, fuses
from hf_sparse.inference.swap import restore_dense_
from hf_sparse.inference.units import find_units, is_exact_gelu
from tests.conftest import needs_cutlass, tiny_bert_config
from tests.test_autotune import FakeTimings
from tests.test_inference import decide


class FusedTimings(FakeTimings):
    """cuSPARSELt GEMMs as `FakeTimings` (dense 1.2 ms; sparse 1.0 ms from `sparse_from` tokens, else 1.5 ms, algorithm
    0); the CUTLASS kernel `cutlass_ms` from `sparse_from` on, else `cutlass_small_ms` (configuration 1); with GELU,
    dense takes 0.4 ms more and the CUTLASS kernel with GELU fused `fused_ms` from `sparse_from` on, else 1.8 ms
    (configuration 0)."""

    def __init__(self, *args, fused_ms=1.1, cutlass_ms=0.9, cutlass_small_ms=1.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_ms, self.cutlass_ms, self.cutlass_small_ms = fused_ms, cutlass_ms, cutlass_small_ms

    def measure(self, request):
        big = request.tokens >= self.sparse_from
        if request.kernel == "dense":
            return Timing(1.6 if request.gelu else 1.2, (), request.tokens, 1)
        if request.kernel == "cutlass" and request.gelu:
            return Timing(self.fused_ms if big else 1.8, (0,), request.tokens, 4)
        if request.kernel == "cutlass":
            return Timing(self.cutlass_ms if big else self.cutlass_small_ms, (1,), request.tokens, 4)
        return Timing(1.0 if big else 1.5, (0, 1, -1), request.tokens, 7)


def bert(hidden_act="gelu", **overrides):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(0)
    config = dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, hidden_act=hidden_act)
    model = BertForQuestionAnswering(tiny_bert_config(**{**config, **overrides})).eval()
    prune_(model)
    return model


def intermediate_unit(model):
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units, _ = find_units(model, linears, [])
    index = next(i for i, u in enumerate(units) if u.name.endswith("0.intermediate.dense"))
    return index, units


# -- decisions and refusals (CPU) ------------------------------------------------------------------------------------


def test_fused_kernel_replaces_gemm_and_gelu_where_it_is_faster():
    index, units = intermediate_unit(bert().half())
    unit, tuner = units[index : index + 1], FusedTimings(cache_path=False)
    (plan,) = decide(unit, tuner, [1536, 98304], "copy")
    # cuSPARSELt: dense 1.2 + GELU 0.4 at 1536, sparse 1.0 + 0.4 at 98304 (3.0 ms); fused: dense + GELU 1.6, then 1.1
    assert plan.kernel is CUTLASS and plan.gelu and plan.status == "sparse+dense"
    assert plan.runs == {2048: Run("dense"), 131072: Run("cutlass", (0,))}
    assert "runs on the CUTLASS kernel with GELU in its epilogue" in plan.reason and "1.11x" in plan.reason
    assert GemmRequest("cutlass", 512, 128, torch.float16, True, 1536, gelu=True) in tuner.calls

    slower = FusedTimings(cache_path=False, fused_ms=1.5)  # 1.6 + 1.5 = 3.1 ms against 3.0
    (plan,) = decide(unit, slower, [1536, 98304], "copy")
    assert plan.kernel is CUSPARSELT and not plan.gelu
    assert "GELU stays a separate step (the CUTLASS kernel with GELU took 1.03x the time" in plan.reason

    (plan,) = decide(unit, None, [1536], "copy")
    assert plan.kernel is CUSPARSELT and "not tuned" in plan.reason


def test_plain_layers_move_to_the_cutlass_kernel_only_where_it_beats_cusparselt():
    index, units = intermediate_unit(bert().half())
    unit = units[index + 1 : index + 2]  # output.dense, 128x512: no GELU after it
    assert unit[0].name.endswith("0.output.dense") and unit[0].gelu is None
    (plan,) = decide(unit, FusedTimings(cache_path=False), [1536, 98304], "copy")
    # dense 1.2 at 1536 either way; at 98304 CUTLASS 0.9 against cuSPARSELt 1.0 ms: 2.2 / 2.1 ms
    assert plan.kernel is CUTLASS and plan.runs == {2048: Run("dense"), 131072: Run("cutlass", (1,))}
    assert "runs on the CUTLASS kernel (bias in its epilogue): 1.05x the cuSPARSELt GEMM" in plan.reason
    (plan,) = decide(unit, FusedTimings(cache_path=False, cutlass_ms=1.0), [1536, 98304], "copy")  # a tie
    assert plan.kernel is CUSPARSELT and "GELU" not in plan.reason and "CUTLASS" not in plan.reason


@pytest.mark.parametrize("fallback, moves", [("copy", True), ("none", False), ("auto", False)])
def test_the_kernels_are_compared_as_the_layer_would_run_them(fallback, moves):
    index, units = intermediate_unit(bert().half())
    # CUTLASS: 1.9 ms below 4096 tokens, 0.9 from there; cuSPARSELt 1.5 and 1.0; dense 1.2. With a dense copy at
    # 1536 tokens CUTLASS saves 0.1 ms in all; compressed only, it costs 0.3 ms more.
    tuner = FusedTimings(cache_path=False, cutlass_small_ms=1.9)
    (plan,) = decide(units[index + 1 : index + 2], tuner, [1536, 98304], fallback)
    assert (plan.kernel is CUTLASS) == moves


def test_where_the_cutlass_kernel_cannot_run_the_report_says_why_gelu_stays_separate():
    index, units = intermediate_unit(bert().half())
    unavailable = {"cutlass": "the CUTLASS 2:4 kernels are built for sm_90 (H100, H200); this GPU is 8.0"}
    plans = decide(units, FusedTimings(cache_path=False), [1536, 98304], "copy", unavailable=unavailable)
    assert all(p.kernel is not CUTLASS for p in plans)
    assert plans[index].reason.endswith(f"; GELU stays a separate step ({unavailable['cutlass']})")
    assert "GELU" not in plans[index + 1].reason  # output.dense: no GELU after it


def test_a_failed_build_says_why_and_leaves_nothing_behind(tmp_path, monkeypatch):
    fake_nvcc = tmp_path / "nvcc"
    fake_nvcc.write_text("#!/bin/sh\nexit 137\n")  # killed, as the out-of-memory killer does: no message
    fake_nvcc.chmod(0o755)
    root = tmp_path / "cutlass"
    (root / "include" / "cutlass").mkdir(parents=True)
    (root / "include" / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 4\n")
    monkeypatch.setattr(cutlass, "nvcc", lambda: str(fake_nvcc))
    monkeypatch.setattr(cutlass, "headers", lambda: root)
    monkeypatch.setenv(cutlass.DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(cutlass.CutlassError, match=r"nvcc exited with code 137 compiling .*out of memory\?"):
        cutlass.build(jobs=1)
    (built,) = (tmp_path / "cache").iterdir()
    assert [p.name for p in built.iterdir()] == [".lock"]  # no objects, no partial library


def test_fp16_layers_of_kernel_shapes_are_candidates_with_their_exact_gelu():
    model = bert().half()
    index, units = intermediate_unit(model)
    assert units[index].gelu.activation == "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    assert fits(CUTLASS, units[index]) and fuses(CUTLASS, units[index])
    names = {u.name.removeprefix("bert.encoder.layer.0."): fuses(CUTLASS, u) for u in units if fits(CUTLASS, u)}
    assert names["attention.output.dense"] is False and names["output.dense"] is False  # no GELU after them
    assert sum(fuses(CUTLASS, u) for u in units if fits(CUTLASS, u)) == 2  # one per encoder layer
    problem = CUTLASS.unsupported_reason(units[index].device, torch.float16)
    assert problem == "no CUDA GPU" or problem.startswith("the weights are on cpu")  # never a build for CPU weights
    fp32 = bert()
    assert not any(fits(CUTLASS, u) for u in intermediate_unit(fp32)[1])  # float32: the kernel is fp16
    assert "float16" in CUTLASS.unsupported_reason(units[index].device, torch.float32)
    tanh = bert("gelu_new").half()  # the tanh approximation: the fp16 output would differ from the kernel's erf GELU
    index, units = intermediate_unit(tanh)
    assert fits(CUTLASS, units[index]) and not fuses(CUTLASS, units[index])
    narrow = bert(hidden_size=64, intermediate_size=128).half()  # 128x64: in_features not a multiple of 128
    index, units = intermediate_unit(narrow)
    assert not fits(CUTLASS, units[index])
    assert is_exact_gelu(nn.GELU()) and not is_exact_gelu(nn.GELU(approximate="tanh"))


def test_shape_and_toolchain_problems_say_what_would_work(monkeypatch):
    assert cutlass.shape_problem(3072, 768, torch.float16) is None
    assert "multiple of 64" in cutlass.shape_problem(100, 768, torch.float16)
    assert "bfloat16" in cutlass.shape_problem(3072, 768, torch.bfloat16)
    monkeypatch.setattr(cutlass, "nvcc", lambda: None)
    monkeypatch.setattr(cutlass, "headers", lambda: None)
    with pytest.raises(cutlass.CutlassError, match=r"no nvcc .*CUDA_HOME.* and no CUTLASS headers \(pip install"):
        cutlass.build()
    monkeypatch.setenv(cutlass.DISABLE_ENV, "0")
    assert cutlass.device_problem() == "HF_SPARSE_CUTLASS=0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")
def test_without_a_gpu_the_library_is_refused_before_anything_compiles(monkeypatch):
    monkeypatch.setattr(cutlass, "build", lambda *args, **kwargs: pytest.fail("compiled on a machine with no GPU"))
    monkeypatch.delenv(cutlass.LIB_ENV, raising=False)
    with pytest.raises(
        cutlass.CutlassError, match=r"unavailable: no CUDA GPU; to compile them for later, call .*build"
    ):
        cutlass.library()


# -- the kernels (sm_90 GPU) -----------------------------------------------------------------------------------------


def two_four(out_features, in_features, seed=0):
    from hf_sparse.masks import nm_mask

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16, generator=g)
    return (w * nm_mask(w)).contiguous(), torch.randn(out_features, device="cuda", dtype=torch.float16, generator=g)


def rel_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_cutlass
@pytest.mark.parametrize("gelu", [False, True])
def test_every_configuration_matches_the_masked_dense_gemm(gelu):
    w, b = two_four(512, 256)
    w[:64] = 0  # all-zero groups
    values, meta = cutlass.compress(w)
    assert values.shape == (512 * 128,) and meta.numel() == 512 * 256 // 8
    for tokens in (1, 7, 333, 2048):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.float16)
        for bias in (None, b):
            expected = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            expected = F.gelu(expected) if gelu else expected
            for config in range(len(cutlass.library().configs)):
                got = cutlass.sparse_linear(x, values, meta, bias, 512, config, gelu)
                assert got.shape == (tokens, 512) and got.dtype == torch.float16
                assert rel_error(got, expected) < 2e-3, (tokens, bias is None, config)


@needs_cutlass
def test_layer_runs_fused_and_dense_plans_graphs_compile_and_checkpoints():
    from hf_sparse.inference.cutlass_linear import CutlassSparseLinear

    w, b = two_four(512, 256)
    plans = {2048: Plan("dense"), 8192: Plan("sparse", 1)}
    layer = CutlassSparseLinear(w, b, gelu=True, plans=plans, keep_dense=True, name="ffn")
    assert torch.equal(layer.weight, w) and layer.weight_bytes == 512 * 256 * 2 * (1 + 9 / 16)
    lean = CutlassSparseLinear(w, b, gelu=True, plans={8192: Plan("sparse", 0)}, name="ffn")
    assert torch.equal(lean.weight, w)  # decompressed through the kernel: exact
    assert lean.plan(1000) == Plan("sparse", 0)  # the nearest bucket
    x = torch.randn(2, 4096, 256, device="cuda", dtype=torch.float16)  # 8192 tokens: the fused kernel
    small = x[:, :512]  # 1024 tokens: dense + GELU
    with torch.no_grad():
        expected = F.gelu(F.linear(x.float(), w.float(), b.float()))
        fused = layer(x)
        assert rel_error(fused, expected) < 2e-3
        assert rel_error(layer(small), F.gelu(F.linear(small.float(), w.float(), b.float()))) < 2e-3  # dense
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        graph.replay()
        assert torch.equal(captured, fused)
        compiled = torch.compile(layer, dynamic=False, fullgraph=True)
        assert torch.equal(compiled(x), fused)
    state = layer.state_dict()
    assert torch.equal(state["weight"], w) and torch.equal(state["bias"], b)
    w2, b2 = two_four(512, 256, seed=1)
    lean.load_state_dict({"weight": w2, "bias": b2})
    with torch.no_grad():
        assert rel_error(lean(x), F.gelu(F.linear(x.float(), w2.float(), b2.float()))) < 2e-3
    with pytest.raises(RuntimeError, match="ffn: the new weight is not 2:4"):
        lean.load_state_dict({"weight": torch.ones_like(w2), "bias": b2})
    assert "runs float16 weights" in lean.cast_problem(lambda t: t.float())
    with pytest.raises(TypeError, match="ffn: a 2:4 layer on the CUTLASS kernel runs float16 weights"):
        lean.float()  # the layer alone, not through a swapped model's guard
    assert lean.values.dtype == torch.float16 and lean.meta.dtype == torch.uint8


@needs_cutlass
@pytest.mark.parametrize("on_cutlass", [True, False])
def test_swap_runs_gelu_in_the_epilogue_and_restores_exactly(on_cutlass):
    model = bert().to("cuda", torch.float16)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = {"input_ids": torch.randint(0, 128, (4, 128), device="cuda")}
    with torch.no_grad():
        expected = model(**inputs).start_logits
        report = swap_to_semi_structured_(
            model, token_counts=[512, 8192], autotune=FusedTimings(cache_path=False), cutlass=on_cutlass
        )
        got = model(**inputs).start_logits
    layer = model.bert.encoder.layer[0]
    if on_cutlass:
        assert type(layer.intermediate.dense).__name__ == "CutlassSparseLinear"
        assert isinstance(layer.intermediate.intermediate_act_fn, GeluInEpilogue)
        row = next(r for r in report if r.name.endswith("0.intermediate.dense"))
        assert "runs on the CUTLASS kernel with GELU in its epilogue" in row.reason
        assert row.plans[8192].startswith("CUTLASS 2:4 + GELU (")
        assert type(layer.output.dense).__name__ == "CutlassSparseLinear" and not layer.output.dense.gelu
        assert report[[r.name for r in report].index(row.name) + 1].plans[8192].startswith("CUTLASS 2:4 (")
    else:
        assert type(layer.intermediate.dense).__name__ == "SemiStructuredLinear"
        assert not isinstance(layer.intermediate.intermediate_act_fn, GeluInEpilogue)
    assert rel_error(got, expected) < 5e-3
    restore_dense_(model)
    assert type(layer.intermediate.dense) is nn.Linear
    assert type(layer.intermediate.intermediate_act_fn).__name__ == "GELUActivation"
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


@needs_cutlass
@pytest.mark.parametrize("isolate", [False, True])
def test_autotuner_times_the_configurations_against_dense_and_gelu(tmp_path, isolate):
    from hf_sparse.inference import Autotuner

    tuner = Autotuner(cache_path=tmp_path / "tune.json", reps=3, isolate=isolate)
    fused = GemmRequest("cutlass", 512, 256, torch.float16, True, 4096, gelu=True)
    dense, timing = tuner.timings([fused.on("dense"), fused], torch.device("cuda"))
    assert timing.candidates == len(cutlass.library().configs)  # every configuration ran and was verified
    assert dense.ms > 0 and timing.ms > 0 and 0 <= timing.config[0] < timing.candidates
    assert (
        f"cutlass@{cutlass.kernel_id()}|512x256|float16|bias|tokens<=4096|gelu" in (tmp_path / "tune.json").read_text()
    )


def test_why_gelu_stays_a_separate_step_is_kept_when_a_later_kernel_takes_the_layer(monkeypatch):
    from hf_sparse.inference import kernels
    from tests.test_inference import FP16_KERNELS, TileKernel

    tile = TileKernel()
    monkeypatch.setattr(kernels, "KERNELS", (*kernels.KERNELS, tile))

    class Timings(FusedTimings):  # the tile kernel: 0.8 ms from 4096 tokens on, else 1.5 (cuSPARSELt: 1.0 and 1.5)
        def measure(self, request):
            if request.kernel == "tile":
                return Timing(0.8 if request.tokens >= self.sparse_from else 1.5, (7,), request.tokens, 3)
            return super().measure(request)

    index, units = intermediate_unit(bert().half())
    tuner = Timings(cache_path=False, fused_ms=1.5)  # CUTLASS with GELU loses (3.1 ms against 3.0)
    (plan,) = decide(units[index : index + 1], tuner, [1536, 98304], "copy", kernels=(*FP16_KERNELS, tile))
    assert plan.kernel is tile and not plan.gelu
    assert "runs on the tile kernel (bias in its epilogue): 1.10x the cuSPARSELt GEMM" in plan.reason
    assert plan.reason.endswith(
        "; GELU stays a separate step (the CUTLASS kernel with GELU took 1.03x the time of this GEMM and GELU)"
    )
