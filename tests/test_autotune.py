import json
import sys

import pytest
import torch

from hf_sparse.inference import policy
from hf_sparse.inference.autotune import (
    CACHE_ENV,
    CACHE_VERSION,
    Autotuner,
    cache_key,
    default_cache_path,
    format_device_key,
)
from hf_sparse.inference.kernels.base import Gelu, GemmRequest, Problem, SweepSettings, Timing, token_bucket


class FakeTimings(Autotuner):
    """An autotuner whose measurements are given, not timed: the dense GEMM 1.2 ms; the cuSPARSELt kernel 1.0 ms from
    `sparse_from` tokens on, else 1.5 ms (algorithm 3). `calls` lists the requests measured."""

    def __init__(self, *args, gpu="NVIDIA H200", sparse_from=4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.gpu = gpu
        self.sparse_from = sparse_from
        self.calls = []

    def device_key(self, device):
        return format_device_key(self.gpu, (9, 0), "2.11.0", "13.0", 800)

    def measure_many(self, requests, device):
        self.calls += requests
        return [self.measure(request) for request in requests]

    def measure(self, request: GemmRequest) -> Timing:
        if request.kernel == "dense":
            return Timing(1.2, (), request.tokens, 1)
        return Timing(1.0 if request.tokens >= self.sparse_from else 1.5, (3, 1, -1), request.tokens, 7)


def gemm(
    kernel="cusparselt", out_features=3072, in_features=768, dtype=torch.float16, bias=True, tokens=1536, gelu=False
):
    return GemmRequest(kernel, out_features, in_features, dtype, bias, tokens, gelu)


def test_token_bucket_is_next_power_of_two():
    assert [token_bucket(t) for t in (1, 7, 8, 9, 1536, 2048, 2049, 98304)] == [8, 8, 8, 16, 2048, 2048, 4096, 131072]


def test_keys_name_the_kernel_shape_dtype_bias_bucket_and_versions():
    assert cache_key(gemm(tokens=2048)) == "cusparselt|3072x768|float16|bias|tokens<=2048"
    assert cache_key(gemm("dense", 768, 3072, torch.bfloat16, False, 8)) == "dense|768x3072|bfloat16|nobias|tokens<=8"
    from hf_sparse.inference.cutlass import kernel_id  # the CUTLASS kernels' timings belong to their build

    tuner = Autotuner(cache_path=False)
    assert tuner.key(gemm("cutlass", 768, 3072, tokens=8)) == f"cutlass@{kernel_id()}|768x3072|float16|bias|tokens<=8"
    assert len(kernel_id()) == 10
    assert cache_key(gemm("fp8", tokens=2048, gelu=True)) == "fp8|3072x768|float16|bias|tokens<=2048|gelu"
    key = format_device_key("NVIDIA H200", (9, 0), "2.11.0+cu130", "13.0", 800)
    assert key == "NVIDIA H200 (sm90)|torch 2.11.0+cu130|cuda 13.0|cusparselt 800"


def test_a_kernel_runs_where_it_beats_dense_by_the_margin_and_without_a_dense_copy_everywhere_it_was_timed():
    dense, fast, slow, none = Timing(1.5), Timing(1.0, (7, 1, -1)), Timing(1.49, (2, 1, -1)), Timing(None)
    assert policy.wins(dense, fast, 1.03) and not policy.wins(dense, slow, 1.03) and not policy.wins(dense, none, 1.03)
    assert policy.bucket_run("cusparselt", dense, fast, 1.03, has_dense=True) == policy.Run("cusparselt", (7, 1, -1))
    assert policy.bucket_run("cusparselt", dense, slow, 1.03, has_dense=True) == policy.Run("dense")
    # a layer without a dense weight runs its kernel where dense wins, and dense only where no configuration ran
    assert policy.bucket_run("cusparselt", dense, slow, 1.03, has_dense=False) == policy.Run("cusparselt", (2, 1, -1))
    assert policy.bucket_run("cusparselt", dense, none, 1.03, has_dense=False) == policy.Run("dense")


def test_disk_cache_round_trip(tmp_path):
    path = tmp_path / "tune.json"
    tuner = FakeTimings(cache_path=path)
    first = tuner.timing(gemm(tokens=1536), "cuda")
    again = tuner.timing(gemm(tokens=2000), "cuda")  # same bucket (2048): no new measurement
    big = tuner.timing(gemm(tokens=98304), "cuda")
    assert tuner.calls == [gemm(tokens=1536), gemm(tokens=98304)]
    assert (first.ms, big.ms, first.config) == (1.5, 1.0, (3, 1, -1))
    assert again == first

    on_disk = json.loads(path.read_text())
    assert on_disk["version"] == CACHE_VERSION == 3
    device = "NVIDIA H200 (sm90)|torch 2.11.0|cuda 13.0|cusparselt 800"
    assert sorted(on_disk["devices"][device]) == [
        "cusparselt|3072x768|float16|bias|tokens<=131072",
        "cusparselt|3072x768|float16|bias|tokens<=2048",
    ]

    fresh = FakeTimings(cache_path=path)  # a new process: reads the disk cache, measures nothing
    assert fresh.timing(gemm(tokens=98304), "cuda") == big
    assert fresh.timing(gemm(tokens=1536), "cuda") == first
    assert fresh.calls == []

    other_gpu = FakeTimings(cache_path=path, gpu="NVIDIA A100-SXM4-80GB")  # never reuses another GPU's timings
    other_gpu.timing(gemm(tokens=98304), "cuda")
    assert other_gpu.calls == [gemm(tokens=98304)]
    assert len(json.loads(path.read_text())["devices"]) == 2


@pytest.mark.parametrize("version", [1, 2])
def test_a_cache_of_an_old_format_is_measured_again_and_rewritten(tmp_path, caplog, version):
    path = tmp_path / "tune.json"
    device = "NVIDIA H200 (sm90)|torch 2.11.0|cuda 13.0|cusparselt 800"
    if version == 1:
        old = {"3072x768|float16|bias|tokens<=2048": {"backend": "sparse", "alg_id": 3, "dense_ms": 1.2,
                                                      "sparse_ms": 1.0, "tokens": 1536}}  # fmt: skip
    else:  # version 2 timed the dense GEMM over 8 rows at 1 token
        old = {"dense|3072x768|float16|bias|tokens<=8": {"ms": 0.5, "config": [], "tokens": 1, "candidates": 1}}
    path.write_text(json.dumps({"version": version, "devices": {device: old}}))
    tuner = FakeTimings(cache_path=path)
    request = gemm(tokens=1536) if version == 1 else gemm("dense", tokens=1)
    with caplog.at_level("WARNING", logger="hf_sparse.inference.autotune"):
        timing = tuner.timing(request, "cuda")
    assert timing.ms in (1.5, 1.2) and tuner.calls == [request]  # measured again, not read from the old entry
    assert f"format version {version} and this hf-sparse reads 3" in caplog.text and "timed again" in caplog.text
    on_disk = json.loads(path.read_text())
    assert on_disk["version"] == 3 and list(on_disk["devices"][device]) == [cache_key(request)]


def test_a_gemm_is_timed_over_exactly_the_token_rows_its_layer_runs(monkeypatch):
    from hf_sparse.inference import tuning
    from hf_sparse.inference.kernels import DENSE, KERNELS

    monkeypatch.setattr(tuning, "time_graphed", lambda fn, inner, reps: float(fn().shape[0]))  # "ms": the rows run
    for tokens in (1, 3, 8, 17):
        assert tuning.sweep(DENSE, gemm("dense", 64, 32, torch.float32, True, tokens), "cpu").ms == tokens
    # only the layers that pad a call's rows are timed padded: cuSPARSELt's (to 8) and the e4m3 2:4 one's (to 32)
    assert {k.name: k.row_align for k in KERNELS} == {
        "dense": 1, "cusparselt": 8, "cutlass": 1, "triton_decode": 1, "fp8-dense": 1, "fp8": 32,
        "triton_decode_fp8": 1,
    }  # fmt: skip


def test_other_kernel_dtype_or_bias_is_another_entry(tmp_path):
    tuner = FakeTimings(cache_path=False)
    tuner.timing(gemm(tokens=1536), "cuda")
    tuner.timing(gemm(dtype=torch.bfloat16), "cuda")
    tuner.timing(gemm(bias=False), "cuda")
    tuner.timing(gemm("dense"), "cuda")
    assert len(tuner.calls) == 4
    assert not list(tmp_path.iterdir())  # cache_path=False writes nothing


def test_unreadable_cache_is_ignored_and_replaced(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    tuner = FakeTimings(cache_path=path)
    tuner.timing(gemm(out_features=768, tokens=64), "cuda")
    assert tuner.calls == [gemm(out_features=768, tokens=64)]
    assert json.loads(path.read_text())["version"] == CACHE_VERSION


def test_default_cache_path_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine.json"))
    assert default_cache_path() == tmp_path / "mine.json"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "hf_sparse" / "autotune.json"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_speedup"):
        Autotuner(cache_path=False, min_speedup=0)
    with pytest.raises(ValueError, match="reps"):
        Autotuner(cache_path=False, reps=0)


def test_requests_and_timings_survive_the_trip_to_the_child_and_back():
    for request in (gemm(), gemm("fp8", dtype=torch.bfloat16, bias=False, tokens=7, gelu=True)):
        assert GemmRequest.from_json(json.loads(json.dumps(request.to_json()))) == request
    timing = Timing(0.25, (3, 2, 1), 1536, 12, "sweep ended by a fault at configuration 4")
    assert Timing.from_dict(json.loads(json.dumps(timing.to_dict()))) == timing
    assert SweepSettings.from_json(json.loads(json.dumps(SweepSettings(split_k=(2, 4)).to_json()))).split_k == (2, 4)


# -- the tuning child process (CPU: a stand-in child speaks the same protocol) ---------------------------------------

FAKE_CHILD = r"""
import json, os, sys
payload = json.loads(sys.stdin.read())
for key, entry in payload["requests"].items():
    kernel, out_f, in_f, dtype, bias, tokens, gelu = entry["request"]
    last = entry["max_algorithms"]
    for alg in range(min(4, last)):
        print(json.dumps({"request": key, "trying": [alg, 1, -1], "first": True}), flush=True)
        if alg == 2 and tokens == 64:  # this configuration "faults": the process dies on it
            os.abort()
        print(json.dumps({"request": key, "timed": [alg, 1, -1], "ms": 0.9 - 0.1 * alg}), flush=True)
    result = {"ms": 0.5, "config": [min(4, last) - 1, 1, -1], "tokens": tokens, "candidates": min(4, last)}
    print(json.dumps({"request": key, "result": result}), flush=True)
"""


def test_a_configuration_that_kills_the_child_ends_its_sweep_and_caps_later_ones(caplog, monkeypatch):
    from hf_sparse.inference import tuning

    monkeypatch.setattr(tuning, "FAULT_FLOOR", {})
    requests = [gemm(out_features=768, tokens=n) for n in (1536, 64, 4096)]
    with caplog.at_level("WARNING", logger="hf_sparse.inference.tuning"):
        chosen = tuning.measure_in_child(requests, "cpu", SweepSettings(), command=[sys.executable, "-c", FAKE_CHILD])
    # the first request finished; the second is settled from configurations 0 and 1 (timed before 2 killed the
    # child); the third, measured by a new child, never tries 2 or above
    assert [c.config[0] for c in chosen] == [3, 1, 1]
    assert [c.tokens for c in chosen] == [1536, 64, 4096]
    assert chosen[1].ms == 0.8 and chosen[1].candidates == 2
    assert chosen[1].note == "sweep ended by a fault at configuration 2"
    assert chosen[2].note == "configurations from 2 up not tried (one faulted on this GPU)"
    assert tuning.FAULT_FLOOR == {(0, "cusparselt|float16"): 2}
    assert "configuration 2 of 768x768 float16 on cusparselt at 64 tokens killed the tuning process" in caplog.text
    assert "from 2 up are not tried again for cusparselt|float16" in caplog.text


LATE_DEATHS = r"""
import json, os, sys
payload = json.loads(sys.stdin.read())
for key, entry in payload["requests"].items():
    tokens = entry["request"][5]
    if tokens == 64:
        os.abort()  # dies between two requests: after the previous result, before this one's first event
    print(json.dumps({"request": key, "trying": [0, 1, -1], "first": True}), flush=True)
    print(json.dumps({"request": key, "untimed": [0, 1, -1]}), flush=True)  # refused: not blamed later
    print(json.dumps({"request": key, "result": {"ms": None, "tokens": tokens, "candidates": 0}}), flush=True)
sys.exit(3)  # and even a clean run exits badly (a crash at teardown)
"""


def test_results_survive_a_bad_exit_and_a_death_between_requests(monkeypatch):
    from hf_sparse.inference import tuning

    monkeypatch.setattr(tuning, "FAULT_FLOOR", {})
    requests = [gemm(out_features=768, tokens=n) for n in (1536, 64, 4096)] + [gemm("dense", 64, 64, tokens=8)]
    chosen = tuning.measure_in_child(requests, "cpu", SweepSettings(), command=[sys.executable, "-c", LATE_DEATHS])
    assert [c.tokens for c in chosen] == [1536, 64, 4096, 8]
    assert chosen[1].ms is None and "died" in chosen[1].note
    assert all(not c.note for i, c in enumerate(chosen) if i != 1)
    assert tuning.FAULT_FLOOR == {}  # no configuration was blamed


def test_a_child_that_cannot_start_says_how_to_tune_in_process():
    from hf_sparse.inference.tuning import measure_in_child

    with pytest.raises(RuntimeError, match=r"before measuring anything.*isolate=False"):
        measure_in_child([gemm(tokens=8)], "cpu", SweepSettings(), command=[sys.executable, "-c", "exit(3)"])


def test_a_gemm_with_gelu_in_its_epilogue_is_measured_and_cached_apart(tmp_path):
    tuner = FakeTimings(cache_path=tmp_path / "tune.json")
    tuner.prefetch([gemm("fp8"), gemm("fp8", gelu=True)], "cuda")
    assert tuner.calls == [gemm("fp8"), gemm("fp8", gelu=True)]
    assert tuner.timing(gemm("fp8", tokens=2000, gelu=True), "cuda") is not None
    fresh = FakeTimings(cache_path=tmp_path / "tune.json")
    assert fresh.cached(gemm("fp8", gelu=True), "cuda") is not None
    assert fresh.cached(gemm("fp8"), "cuda") is not None and fresh.calls == []


def test_a_gelu_epilogue_sweep_is_a_kernel_variant_of_its_own():
    assert gemm("fp8").family() == "fp8|float16"
    assert gemm("fp8", gelu=True).family() == "fp8|float16|gelu"
    assert gemm(dtype=torch.bfloat16).family() == "cusparselt|bfloat16"


# -- the generic sweep (CPU: a made-up kernel, timings read off its calls instead of CUDA events) --------------------


class Steps:
    """A kernel whose configuration 0 is right and takes 2 ms, 1 is off the reference, 2 is refused, 3 takes 1 ms; a
    second pass tries (0, 9), 0.5 ms."""

    name, label, row_align = "steps", "steps kernel", 8
    sparse, gelu, gelu_dtypes = True, Gelu.NONE, ()

    def __init__(self, stop_at_refusal):
        self.stop_at_refusal = stop_at_refusal
        self.refined_from = None

    def problem(self, request, inputs, settings):
        reference = torch.nn.functional.linear(inputs.x.float(), inputs.weight.float())
        ms = {(0,): 2.0, (1,): 0.1, (3,): 1.0, (0, 9): 0.5}

        def call(config):
            if config == (2,):
                raise ValueError("refused")
            off = 10.0 if config == (1,) else 0.0
            fn = lambda: reference + off  # noqa: E731
            fn.ms = ms[config]
            return fn

        def refine(timings):
            self.refined_from = dict(timings)
            return [(0, 9)]

        return Problem([(0,), (1,), (2,), (3,)], call, reference, 1e-3, stop_at_refusal=self.stop_at_refusal,
                       refine=refine)  # fmt: skip


@pytest.mark.parametrize("stop_at_refusal", [True, False])
def test_a_sweep_keeps_the_fastest_verified_configuration(monkeypatch, caplog, stop_at_refusal):
    from hf_sparse.inference import tuning

    monkeypatch.setattr(tuning, "time_graphed", lambda fn, inner, reps: fn.ms)
    kernel, events = Steps(stop_at_refusal), []
    request = gemm("steps", 64, 32, torch.float32, False, 16)
    with caplog.at_level("WARNING", logger="hf_sparse.inference.tuning"):
        timing = tuning.sweep(
            kernel, request, "cpu", progress=lambda c, first: events.append(("try", c, first)),
            on_timed=lambda c, ms: events.append(("timed", c, ms)),
        )  # fmt: skip
    assert "configuration (1,) of 64x32 float32 on steps at 16 tokens is off the fp32 result" in caplog.text
    tried = [(0,), (1,), (2,)] + ([] if stop_at_refusal else [(3,)])
    assert [e[1] for e in events if e[0] == "try"] == tried + [(0, 9)]
    assert [e[2] for e in events if e[0] == "timed"] == [2.0, None, None] + ([] if stop_at_refusal else [1.0]) + [0.5]
    assert kernel.refined_from == ({(0,): 2.0} if stop_at_refusal else {(0,): 2.0, (3,): 1.0})
    assert timing == Timing(0.5, (0, 9), 16, 3 if not stop_at_refusal else 2)
