"""The kept cuSPARSELt plans: results equal to PyTorch's own call and to the masked dense layer, every execution
mode, many shapes in one process, and an algorithm that faults survived (GPU), plus what runs on the CPU."""

import pytest
import torch
import torch.nn.functional as F

from hf_sparse.inference import cusparselt
from hf_sparse.inference.kernels.base import GemmRequest
from hf_sparse.masks import nm_mask
from tests.conftest import needs_gpu


def test_binding_is_unavailable_without_a_gpu_and_import_stays_cheap():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU behaviour")
    assert cusparselt.available() is False
    with pytest.raises(RuntimeError, match="cannot bind cuSPARSELt"):
        cusparselt.library()


def test_planned_matmuls_can_be_switched_off(monkeypatch):
    # The way out if a kept plan misbehaves: every call then goes through torch._cslt_sparse_mm. Checked before any
    # binding happens, so it holds on a GPU machine too.
    monkeypatch.setenv(cusparselt.PLANNED_ENV, "0")
    assert cusparselt.available() is False


def problem(out_f, in_f, rows, dtype=torch.float16, bias=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen)
    w = w * nm_mask(w)
    x = torch.randn(rows, in_f, device="cuda", dtype=dtype, generator=gen)
    b = torch.randn(out_f, device="cuda", dtype=dtype, generator=gen) if bias else None
    return w, x, b, torch._cslt_compress(w)


def rel_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(768, 768), (2304, 768), (768, 3072)])
@pytest.mark.parametrize("rows", [8, 1536])
def test_plans_equal_torch_bit_for_bit_and_the_masked_dense_layer(dtype, bias, shape, rows):
    # Only ids 0 and 1 run here. In the one H100 run of an earlier version of this test (ids 0, 1, middle, last), its
    # first case (768x768 fp16 with a bias over 8 rows) hit "an illegal instruction" at the first comparison, i.e.
    # after id 0 ran through this binding and through torch._cslt_sparse_mm; in an earlier process ids 0, 1 and 26 of
    # that case had run cleanly. Not pinned down: if this test faults, that is what it found.
    w, x, b, packed = problem(*shape, rows, dtype, bias, seed=rows)
    assert cusparselt.max_alg_id(*shape, rows, dtype, bias=b) >= 1
    reference = F.linear(x.float(), w.float(), None if b is None else b.float())
    for alg_id in (0, 1):
        out = torch.full((rows, shape[0]), float("nan"), device="cuda", dtype=dtype)  # poisoned: every element written
        cusparselt.plan_for(x, packed, b, shape[0], alg_id)(x, packed, out=out)
        theirs = torch._cslt_sparse_mm(packed, x.t(), b, transpose_result=True, alg_id=alg_id)
        assert torch.equal(out, theirs), alg_id  # the same kernel on the same layout: the same bits
        assert rel_error(out, reference) < (1e-2 if dtype == torch.bfloat16 else 5e-3), alg_id


@needs_gpu
def test_an_algorithm_id_past_the_last_is_refused_before_it_runs():
    w, x, b, packed = problem(768, 768, 64)
    last = cusparselt.max_alg_id(768, 768, 64, torch.float16, bias=b)
    for refused in (last + 1, last + 5, -1):
        with pytest.raises(cusparselt.CusparseLtError, match=rf"outside 0\.\.{last}"):
            cusparselt.sparse_linear(x, packed, b, 768, refused)
    torch.cuda.synchronize()  # nothing ran: the context is fine
    assert rel_error(cusparselt.sparse_linear(x, packed, b, 768, 0), F.linear(x, w, b)) < 5e-3


@needs_gpu
def test_many_shapes_in_one_process_and_plans_are_kept():
    cache = cusparselt.PlanCache(max_plans=8)
    for i, (out_f, in_f) in enumerate([(64, 64), (128, 64), (64, 256), (768, 768), (3072, 768), (768, 3072)]):
        for rows in (8, 24, 136, 1000 + 8 * i):
            w, x, b, packed = problem(out_f, in_f, rows, seed=i * 7 + rows)
            key = cusparselt.PlanKey(0, out_f, in_f, rows, torch.float16, b.data_ptr(), 0, 1, -1)
            got = cache.get(key, b)(x, packed)
            assert rel_error(got, F.linear(x.float(), w.float(), b.float())) < 5e-3, (out_f, in_f, rows)
    assert len(cache) == 8 and cache.built == 24  # least recently used plans destroyed past max_plans
    w, x, b, packed = problem(768, 768, 64)
    built = cusparselt.PLANS.built
    for _ in range(50):
        cusparselt.sparse_linear(x, packed, b, 768, 0)
    assert cusparselt.PLANS.built == built + 1  # one plan set up, then kept


@needs_gpu
def test_swapped_model_eager_graphs_and_compile_agree(tmp_path):
    from hf_sparse import cuda_graphs, restore_dense_, swap_to_semi_structured_
    from hf_sparse.inference import Autotuner
    from tests.test_inference import gpu_inputs, gpu_model

    model = gpu_model()
    inputs = gpu_inputs(batch=4, seq=64)
    with torch.no_grad():
        masked_dense = model(**inputs).start_logits
    tuner = Autotuner(cache_path=tmp_path / "tune.json", reps=3, max_algorithms=8, time_budget_s=2.0)
    report = swap_to_semi_structured_(model, token_counts=[256, 4096], autotune=tuner)
    assert report.memory_ratio <= 1.0  # the default keeps within the dense bytes
    if not report.swapped:  # dense won everywhere on this tiny model: make every layer sparse (kept plans, alg 0)
        restore_dense_(model)
        report = swap_to_semi_structured_(model, autotune=False)
    assert report.swapped and report.eager_graphs
    model.forward.enabled = False  # the layers' own eager path first
    with torch.no_grad():
        eager = model(**inputs).start_logits
        eager_again = model(**inputs).start_logits
    model.forward.enabled = True
    with torch.no_grad():
        auto = model(**inputs).start_logits  # a plain call: the swapped model's own CUDA graph
    graphed = cuda_graphs(model)(**inputs).start_logits
    torch._dynamo.reset()
    compiled = cuda_graphs(torch.compile(model, dynamic=False))(**inputs).start_logits
    assert torch.equal(eager, eager_again) and torch.equal(auto, graphed)
    assert rel_error(eager, masked_dense) < 1e-2
    assert rel_error(graphed, eager) < 2e-3  # the same GEMMs replayed (attention may take another kernel)
    assert rel_error(compiled, eager) < 1e-2  # inductor fuses the element-wise work differently


@needs_gpu
def test_an_algorithm_that_faults_costs_the_child_not_this_process(tmp_path, monkeypatch, caplog):
    from hf_sparse.inference import Autotuner, tuning

    monkeypatch.setattr(tuning, "FAULT_FLOOR", {})
    monkeypatch.setenv(tuning.FAULT_ENV, "1")  # the child makes a real, sticky CUDA fault when it reaches algorithm 1
    tuner = Autotuner(cache_path=tmp_path / "tune.json", reps=2, max_algorithms=4, time_budget_s=5.0)
    with caplog.at_level("WARNING", logger="hf_sparse.inference.tuning"):
        timing = tuner.timing(GemmRequest("cusparselt", 768, 768, torch.float16, True, 1536), "cuda")
    assert "configuration 1 of 768x768 float16 on cusparselt at 1536 tokens killed the tuning process" in caplog.text
    # settled from algorithm 0, verified and timed before the fault; later sweeps on this GPU stop below 1
    assert timing.config == (0, 1, -1) and timing.candidates == 1 and timing.ms
    assert timing.note == "sweep ended by a fault at configuration 1"
    assert tuning.FAULT_FLOOR == {(0, "cusparselt|float16"): 1}
    w, x, b, packed = problem(768, 768, 64)  # this process's CUDA context is untouched
    assert rel_error(cusparselt.sparse_linear(x, packed, b, 768, timing.config[0]), F.linear(x, w, b)) < 5e-3
