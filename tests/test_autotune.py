import json
import sys

import pytest
import torch

from hf_sparse.inference.autotune import (
    CACHE_ENV,
    Autotuner,
    GemmChoice,
    Plan,
    default_cache_path,
    format_device_key,
    gemm_key,
    token_bucket,
)


class FakeTimings(Autotuner):
    """An autotuner whose measurements are given, not timed: sparse wins from `sparse_from` tokens on."""

    def __init__(self, *args, gpu="NVIDIA H200", sparse_from=4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.gpu = gpu
        self.sparse_from = sparse_from
        self.calls = []

    def device_key(self, device):
        return format_device_key(self.gpu, (9, 0), "2.11.0", "13.0", 800)

    def measure_many(self, requests, device):
        return [self.measure(*request[:5], device, *request[5:]) for request in requests]

    def measure(self, out_features, in_features, dtype, bias, tokens, device, epilogue=""):
        self.calls.append(
            (out_features, in_features, tokens, epilogue) if epilogue else (out_features, in_features, tokens)
        )
        sparse_ms = 1.0 if tokens >= self.sparse_from else 1.5
        return GemmChoice("sparse" if sparse_ms < 1.2 else "dense", Plan("sparse", 3), 1.2, sparse_ms, tokens, 7)


def test_token_bucket_is_next_power_of_two():
    assert [token_bucket(t) for t in (1, 7, 8, 9, 1536, 2048, 2049, 98304)] == [8, 8, 8, 16, 2048, 2048, 4096, 131072]


def test_keys_name_shape_dtype_bias_bucket_and_versions():
    assert gemm_key(3072, 768, torch.float16, True, 2048) == "3072x768|float16|bias|tokens<=2048"
    assert gemm_key(768, 3072, torch.bfloat16, False, 8) == "768x3072|bfloat16|nobias|tokens<=8"
    from hf_sparse.inference.cutlass import kernel_id  # the CUTLASS kernels' choices belong to their build

    assert (
        gemm_key(768, 3072, torch.float16, True, 8, "cutlass")
        == f"768x3072|float16|bias|tokens<=8|cutlass@{kernel_id()}"
    )
    assert len(kernel_id()) == 10
    assert (
        gemm_key(3072, 768, torch.float8_e4m3fn, True, 2048, "gelu") == "3072x768|float8_e4m3fn|bias|tokens<=2048|gelu"
    )
    key = format_device_key("NVIDIA H200", (9, 0), "2.11.0+cu130", "13.0", 800)
    assert key == "NVIDIA H200 (sm90)|torch 2.11.0+cu130|cuda 13.0|cusparselt 800"


def test_choice_speedup():
    assert GemmChoice("sparse", dense_ms=1.5, sparse_ms=1.0).speedup == 1.5
    assert GemmChoice("dense").speedup is None


def test_disk_cache_round_trip(tmp_path):
    path = tmp_path / "tune.json"
    tuner = FakeTimings(cache_path=path)
    first = tuner.choice(3072, 768, torch.float16, True, 1536, "cuda")
    again = tuner.choice(3072, 768, torch.float16, True, 2000, "cuda")  # same bucket (2048): no new measurement
    big = tuner.choice(3072, 768, torch.float16, True, 98304, "cuda")
    assert tuner.calls == [(3072, 768, 1536), (3072, 768, 98304)]
    assert (first.backend, big.backend) == ("dense", "sparse")
    assert again == first

    on_disk = json.loads(path.read_text())
    assert on_disk["version"] == 1
    device = "NVIDIA H200 (sm90)|torch 2.11.0|cuda 13.0|cusparselt 800"
    assert sorted(on_disk["devices"][device]) == [
        "3072x768|float16|bias|tokens<=131072",
        "3072x768|float16|bias|tokens<=2048",
    ]

    fresh = FakeTimings(cache_path=path)  # a new process: reads the disk cache, measures nothing
    assert fresh.choice(3072, 768, torch.float16, True, 98304, "cuda") == big
    assert fresh.choice(3072, 768, torch.float16, True, 1536, "cuda") == first
    assert fresh.calls == []

    other_gpu = FakeTimings(cache_path=path, gpu="NVIDIA A100-SXM4-80GB")  # never reuses another GPU's timings
    other_gpu.choice(3072, 768, torch.float16, True, 98304, "cuda")
    assert other_gpu.calls == [(3072, 768, 98304)]
    assert len(json.loads(path.read_text())["devices"]) == 2


def test_other_dtype_or_bias_is_another_entry(tmp_path):
    tuner = FakeTimings(cache_path=False)
    tuner.choice(768, 768, torch.float16, True, 1536, "cuda")
    tuner.choice(768, 768, torch.bfloat16, True, 1536, "cuda")
    tuner.choice(768, 768, torch.float16, False, 1536, "cuda")
    assert len(tuner.calls) == 3
    assert not list(tmp_path.iterdir())  # cache_path=False writes nothing


def test_unreadable_cache_is_ignored_and_replaced(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    tuner = FakeTimings(cache_path=path)
    tuner.choice(768, 768, torch.float16, True, 64, "cuda")
    assert tuner.calls == [(768, 768, 64)]
    assert json.loads(path.read_text())["version"] == 1


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


# -- the tuning child process (CPU: a stand-in child speaks the same protocol) ---------------------------------------

FAKE_CHILD = r"""
import json, os, sys
payload = json.loads(sys.stdin.read())
last = payload["settings"].get("max_algorithms", 4)
for key, (out_f, in_f, dtype, bias, tokens) in payload["requests"].items():
    print(json.dumps({"request": key, "dense_ms": 1.0}), flush=True)
    for alg in range(min(4, last)):
        print(json.dumps({"request": key, "trying": alg, "split_k": 1}), flush=True)
        if alg == 2 and tokens == 64:  # this algorithm "faults": the process dies on it
            os.abort()
        print(json.dumps({"request": key, "timed": [alg, 1, -1], "ms": 0.9 - 0.1 * alg}), flush=True)
    result = {"backend": "sparse", "alg_id": min(4, last) - 1, "dense_ms": 1.0, "sparse_ms": 0.5, "tokens": tokens}
    print(json.dumps({"request": key, "result": result}), flush=True)
"""


def test_an_algorithm_that_kills_the_child_ends_its_sweep_and_caps_later_ones(caplog, monkeypatch):
    from hf_sparse.inference import tuning

    monkeypatch.setattr(tuning, "FAULT_FLOOR", {})
    requests = [(768, 768, torch.float16, True, n) for n in (1536, 64, 4096)]
    with caplog.at_level("WARNING", logger="hf_sparse.inference.tuning"):
        chosen = tuning.measure_in_child(requests, "cpu", {}, command=[sys.executable, "-c", FAKE_CHILD])
    # the first request finished; the second is settled from algorithms 0 and 1 (timed before 2 killed the child);
    # the third, measured by a new child, never tries 2 or above
    assert [c["alg_id"] for c in chosen] == [3, 1, 1]
    assert [c["tokens"] for c in chosen] == [1536, 64, 4096]
    assert chosen[1]["backend"] == "sparse" and chosen[1]["candidates"] == 2 and chosen[1]["sparse_ms"] == 0.8
    assert chosen[1]["note"] == "sweep ended by a fault at algorithm 2"
    assert chosen[2]["note"] == "algorithms from 2 up not tried (one faulted on this GPU)"
    assert tuning.FAULT_FLOOR == {(0, "float16"): 2}
    assert "cuSPARSELt algorithm 2 of 768x768 float16 at 64 tokens killed the tuning process" in caplog.text
    assert "from 2 up are not tried again for float16" in caplog.text


LATE_DEATHS = r"""
import json, os, sys
payload = json.loads(sys.stdin.read())
for key, (out_f, in_f, dtype, bias, tokens) in payload["requests"].items():
    if tokens == 64:
        os.abort()  # dies between two requests: after the previous result, before this one's first event
    print(json.dumps({"request": key, "dense_ms": 1.0}), flush=True)
    print(json.dumps({"request": key, "trying": 0, "split_k": 1}), flush=True)
    print(json.dumps({"request": key, "untimed": [0, 1, -1]}), flush=True)  # refused: not blamed later
    result = {"backend": "dense", "dense_ms": 1.0, "tokens": tokens, "candidates": 0}
    print(json.dumps({"request": key, "result": result}), flush=True)
sys.exit(3)  # and even a clean run exits badly (a crash at teardown)
"""


def test_results_survive_a_bad_exit_and_a_death_between_requests(monkeypatch):
    from hf_sparse.inference import tuning

    monkeypatch.setattr(tuning, "FAULT_FLOOR", {})
    requests = [(768, 768, torch.float16, True, n) for n in (1536, 64, 4096)] + [(64, 64, torch.bfloat16, True, 8)]
    chosen = tuning.measure_in_child(requests, "cpu", {}, command=[sys.executable, "-c", LATE_DEATHS])
    assert [c["tokens"] for c in chosen] == [1536, 64, 4096, 8]
    assert chosen[1]["backend"] == "dense" and chosen[1]["dense_ms"] is None and "died" in chosen[1]["note"]
    assert all("note" not in c for i, c in enumerate(chosen) if i != 1)
    assert tuning.FAULT_FLOOR == {}  # no algorithm was blamed


def test_a_child_that_cannot_start_says_how_to_tune_in_process():
    from hf_sparse.inference.tuning import measure_in_child

    with pytest.raises(RuntimeError, match=r"before measuring anything.*isolate=False"):
        measure_in_child([(64, 64, torch.float16, False, 8)], "cpu", {}, command=[sys.executable, "-c", "exit(3)"])


def test_a_gemm_with_gelu_in_its_epilogue_is_measured_and_cached_apart(tmp_path):
    e4m3 = torch.float8_e4m3fn
    tuner = FakeTimings(cache_path=tmp_path / "tune.json")
    tuner.prefetch([(3072, 768, e4m3, True, 1536), (3072, 768, e4m3, True, 1536, "gelu")], "cuda")
    assert tuner.calls == [(3072, 768, 1536), (3072, 768, 1536, "gelu")]
    assert tuner.choice(3072, 768, e4m3, True, 2000, "cuda", epilogue="gelu") is not None
    fresh = FakeTimings(cache_path=tmp_path / "tune.json")
    assert fresh.cached(3072, 768, e4m3, True, 1536, "cuda", "gelu") is not None
    assert fresh.cached(3072, 768, e4m3, True, 1536, "cuda") is not None and fresh.calls == []


def test_a_gelu_epilogue_sweep_is_a_kernel_family_of_its_own():
    from hf_sparse.inference.tuning import _kernel

    e4m3 = torch.float8_e4m3fn
    assert _kernel((3072, 768, e4m3, True, 1536)) == "float8_e4m3fn"
    assert _kernel((3072, 768, e4m3, True, 1536, "gelu")) == "float8_e4m3fn|gelu"
    assert _kernel((3072, 768, torch.float16, True, 1536, "")) == "float16"
