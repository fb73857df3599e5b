"""Writing checkpoints so that a failure never leaves one half written, and finding the Trainer checkpoint a run
can resume from."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open

from .metadata import CONFIG_NAME
from .standard import DENSE_INDEX_NAME, DENSE_WEIGHTS_NAME, weight_files


def install(source: Path, destination: Path, stale: list[Path]) -> None:
    """Moves every file of `source` into `destination` (`os.replace`, `config.json` last) and removes the `stale`
    files it does not replace, as one transaction: the files replaced or removed are kept aside until the end, and
    put back if anything fails, so the folder holds either the old checkpoint or the new one."""
    aside = Path(tempfile.mkdtemp(dir=destination, prefix=".hf_sparse_old-"))
    done: list[tuple[Path, Path | None]] = []  # (path in destination, its old version kept aside, if any)
    new_names = {p.name for p in source.iterdir()}
    try:
        for item in sorted(source.iterdir(), key=lambda p: p.name == CONFIG_NAME):
            target = destination / item.name
            done.append((target, _set_aside(target, aside)))
            os.replace(item, target)
        for old in stale:
            if old.name not in new_names and old.exists():
                done.append((old, _set_aside(old, aside)))
    except BaseException:
        for target, kept in reversed(done):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if kept is not None:
                os.replace(kept, target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _set_aside(path: Path, aside: Path) -> Path | None:
    if not path.exists():
        return None
    kept = aside / path.name
    os.replace(path, kept)
    return kept


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` to write to; moved onto `path` (atomically) when the block ends without an
    error, removed otherwise. The file at `path`, if any, is never left half written.

    Example:

    ```python
    >>> with atomic_path("out/masks.safetensors") as tmp:
    ...     save_file(tensors, tmp)
    ```
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")  # per process: ranks never share one
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (a run killed while saving it), or None if it looks
    complete: `trainer_state.json` readable and at the folder's step, and model weights whose headers read."""
    folder = Path(folder)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return "it has no trainer_state.json (the Trainer writes it last)"
    try:
        step = json.loads(state_file.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError) as err:
        return f"{state_file.name} cannot be read ({err})"
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    if match and step != int(match.group(1)):
        return f"{state_file.name} records step {step}, not {match.group(1)}"
    files = weight_files(folder)
    if not files:
        return f"it has neither {DENSE_WEIGHTS_NAME} nor {DENSE_INDEX_NAME}"
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:
            return f"{file.name} cannot be read ({type(err).__name__}: {err})"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """The last Trainer checkpoint of `output_dir` that can be resumed from, and the later ones that cannot (a run
    killed while saving leaves a half-written `checkpoint-N`), each with the reason.

    Example:

    ```python
    >>> last, broken = last_complete_checkpoint("out")
    >>> trainer.train(resume_from_checkpoint=last)
    ```
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None, {}
    folders = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    broken: dict[str, str] = {}
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder), broken
        broken[str(folder)] = problem
    return None, broken
