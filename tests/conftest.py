"""Shared test fixtures: tiny models built from configs, and the real SQuAD files beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

# One thread per process. The test models are tiny (hidden 64), so a second thread buys nothing on an idle machine,
# and on a busy one (CI sharing its two cores with another job) OpenMP's spinning threads thrash: the recipe's
# end-to-end test took 436-560 s there with two threads and 44 s with one. Set before torch is imported so that
# child processes (recipes, accelerate launch, torchrun) inherit it too. An explicit OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# A child process that runs this long is hung, not slow: a guard, not a time limit (no test asserts a wall-clock
# time; speed is measured by the benchmarks).
HANG_TIMEOUT = 3600


def _gpu_test(problem: str | None):
    """A decorator that marks a test `gpu` and skips it, saying why, where `problem` (why it cannot run here) is set."""

    def mark(test):
        return pytest.mark.gpu(pytest.mark.skipif(problem is not None, reason=problem or "")(test))

    return mark


def _capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _cutlass_problem() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from hf_sparse.inference import cutlass

    return cutlass.device_problem()


# The GPU markers of the inference tests: each marks a test `gpu` and skips it with a reason where it cannot run.
needs_gpu = _gpu_test(
    None if _capability() else "needs an NVIDIA GPU with cuSPARSELt (2:4 kernels do not run on the CPU)"
)
needs_fp8_gpu = _gpu_test(
    None
    if (_capability() or (0, 0)) >= (8, 9)
    else "needs an NVIDIA GPU of compute capability 8.9 or newer (FP8 tensor cores); none here"
)
_CUTLASS_PROBLEM = _cutlass_problem()
needs_cutlass = _gpu_test(
    _CUTLASS_PROBLEM and f"needs an sm_90 GPU (H100, H200), nvcc and nvidia-cutlass: {_CUTLASS_PROBLEM}"
)


def _triton_decode_problem() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from hf_sparse.inference.kernels import TRITON_DECODE

    return TRITON_DECODE.unsupported_reason(torch.device("cuda"), torch.float16)


_TRITON_DECODE_PROBLEM = _triton_decode_problem()
needs_triton_gpu = _gpu_test(
    _TRITON_DECODE_PROBLEM and f"needs an NVIDIA GPU of compute capability 8.0+ and Triton: {_TRITON_DECODE_PROBLEM}"
)


def shared_data(*parts: str) -> Path:
    """Path of a file in `../shared/data`. Skips the test where it is absent (a user's clone); fails in CI,
    which always has it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI must run with ../shared beside the checkout.")
        pytest.skip(f"{path} not found: these tests read the real SQuAD files in ../shared/data.")
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for child processes (accelerate launch, recipes) that import this checkout's hf_sparse."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def exit_ranks() -> None:
    """Ends a multi-process test script once its results are written: every rank waits at a barrier, then the process
    leaves without the interpreter's teardown. Tearing a gloo group down at exit now and then aborts a rank ("terminate
    called without an active exception", from torch's C++ threads), more often on a busy machine: it failed a CI run
    on two loaded cores after both ranks had done their work. The checks are on the results the ranks wrote."""
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun_two_ranks(script: str, out: Path, *args: str) -> list[dict]:
    """Runs `tests/scripts/<script>` in two processes (torchrun, gloo) writing into `out`, and returns what each rank
    wrote to `out/rank<r>.json`; fails with the end of the output if a rank failed."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "tests" / "scripts" / script),
         str(out), *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture
def tiny_qa_model():
    from transformers import BertForQuestionAnswering

    torch.manual_seed(0)
    return BertForQuestionAnswering(tiny_bert_config())


class RandomQADataset(torch.utils.data.Dataset):
    """Deterministic random QA features: enough for the Trainer to take real optimizer steps."""

    def __init__(self, size: int = 64, seq_len: int = 32, vocab_size: int = 128):
        self.size, self.seq_len, self.vocab_size = size, seq_len, vocab_size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {
            "input_ids": torch.randint(0, self.vocab_size, (self.seq_len,), generator=g),
            "start_positions": torch.tensor(i % self.seq_len),
            "end_positions": torch.tensor((i + 3) % self.seq_len),
        }
