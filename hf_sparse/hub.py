"""Model cards for sparse checkpoints, and pushing them to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import CONFIG_NAME, METADATA_KEY, atomic_path, load_state_dict, save_pretrained
from .config import parse_pattern

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "sparse_model_card.md"
CARD_NAME = "README.md"

_TASKS = {
    "ForQuestionAnswering": "question-answering",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForMaskedLM": "fill-mask",
    "ForCausalLM": "text-generation",
}
_METRIC_NAMES = {"exact_match": "Exact match", "f1": "F1", "perplexity": "Perplexity",
                 "answer_choice_accuracy": "Answer-choice accuracy",
                 "answer_choice_accuracy_norm": "Answer-choice accuracy (length-normalised)"}  # fmt: skip


class HubPushError(RuntimeError):
    """Pushing to the Hub failed; the local checkpoint is left as it was."""


def template_path() -> Path:
    """The model card template: inside the installed package (`hf_sparse/model_cards/`, mapped from the
    top-level `model_cards/` folder by pyproject.toml), or in `model_cards/` of a source checkout."""
    packaged = resources.files("hf_sparse").joinpath("model_cards", TEMPLATE_NAME)
    if packaged.is_file():
        return Path(str(packaged))
    source = Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME
    if source.is_file():
        return source
    raise FileNotFoundError(
        f"model card template {TEMPLATE_NAME} is in neither {packaged} nor {source}; reinstall hf-sparse."
    )


def current_command() -> str:
    """The command line of this process, as a user would type it again (for the card's "Reproduce" section).

    Under `accelerate launch` or `torchrun`, the launcher's command (found among the parent processes' command
    lines, on Linux), e.g. `accelerate launch --num_processes 2 recipes/squad_24.py --preset tutorial`.
    """
    launcher = launcher_command(_parent_command_lines())
    if launcher is not None:
        return launcher
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        return "python " + shlex.join(argv)
    return shlex.join(argv)


_LAUNCHERS = {"accelerate": "accelerate launch", "accelerate.commands.launch": "accelerate launch",
              "accelerate.commands.accelerate_cli": "accelerate launch", "torchrun": "torchrun",
              "torch.distributed.run": "torchrun", "torch.distributed.launch": "torchrun"}  # fmt: skip


def launcher_command(command_lines: list[list[str]]) -> str | None:
    """The `accelerate launch ...` / `torchrun ...` command among `command_lines` (the parents' argv, nearest
    first), as typed: `python -m accelerate.commands.launch x.py` reads `accelerate launch x.py`. None if none is."""
    for argv in command_lines:
        for i, arg in enumerate(argv):
            name = os.path.basename(arg)
            module = argv[i + 1] if arg == "-m" and i + 1 < len(argv) else None
            launcher = _LAUNCHERS.get(module) if module else _LAUNCHERS.get(name)
            if launcher is None or (name == "accelerate" and argv[i + 1 : i + 2] != ["launch"]):
                continue
            rest = argv[i + (2 if module or name == "accelerate" else 1) :]
            if launcher == "accelerate launch" and rest[:1] == ["launch"]:
                rest = rest[1:]  # python -m accelerate.commands.accelerate_cli launch ...
            return shlex.join([*launcher.split(), *rest])
    return None


def _parent_command_lines(depth: int = 4) -> list[list[str]]:
    if not any(key.startswith(("ACCELERATE_", "TORCHELASTIC_")) or key == "LOCAL_RANK" for key in os.environ):
        return []  # not started by a launcher: no need to look
    lines, pid = [], os.getppid()
    for _ in range(depth):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                lines.append([a.decode(errors="replace") for a in f.read().split(b"\0") if a])
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
    return lines


def _load_config(model_or_folder) -> dict:
    if isinstance(model_or_folder, (str, os.PathLike)):
        file = Path(model_or_folder) / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: pass a saved checkpoint folder or the model itself.")
        return json.loads(file.read_text())
    config = getattr(model_or_folder, "config", None)
    if config is None:
        raise ValueError(f"{type(model_or_folder).__name__} has no config; pass a PreTrainedModel or a folder.")
    return config.to_dict()


def _hub_id(name: str | None) -> str | None:
    # config._name_or_path is often a local path; only a Hub repo id makes a link.
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number; got {value!r}.")
    return float(value)


def _format_cell(value: Any) -> str:
    if value is None:  # not measured
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _result_rows(metrics: dict[str, dict[str, float]], base_model: str | None, n: int, m: int) -> list[dict]:
    """The card's results table: one row for the dense model and one for this sparse model, where measured."""
    unknown = set(metrics) - {"dense", "sparse"}
    if unknown:
        raise ValueError(f"metrics keys must be 'dense' and/or 'sparse'; got {sorted(unknown)}.")
    rows = []
    for label, key in (
        (f"dense{f' ({base_model})' if base_model else ''}", "dense"),
        (f"{n}:{m} sparse (this model)", "sparse"),
    ):
        values = {name: _number(f"metrics[{key!r}][{name!r}]", v) for name, v in (metrics.get(key) or {}).items()}
        if values:
            rows.append({"label": label, "scores": {_METRIC_NAMES.get(k, k): v for k, v in values.items()}})
    return rows


def _eval_results(sparse_metrics: dict[str, float], task: str | None, dataset: str | None, dataset_name: str | None):
    """`model-index` entries of the sparse model's metrics. They name a Hub task and a Hub dataset, so local or
    generated data gets none (the card's table says it all)."""
    from huggingface_hub import EvalResult

    if not sparse_metrics or task is None or dataset is None:
        return []
    return [
        EvalResult(
            task_type=task,
            dataset_type=dataset,
            dataset_name=dataset_name or dataset,
            metric_type=name,
            metric_name=_METRIC_NAMES.get(name, name),
            metric_value=float(value),
        )
        for name, value in sparse_metrics.items()
    ]


def _fp8_description(meta: dict) -> dict | None:
    """What the card says of a compact checkpoint's FP8 layers (None: it has none): how many, and whether they keep
    a static input scale."""
    fp8 = meta.get("fp8") if meta.get("format") == "compact" else None
    if not isinstance(fp8, dict) or not fp8.get("layers"):
        return None
    return {"layers": len(fp8["layers"]), "static": fp8.get("activation_scales") == "static"}


def _benchmark_table(benchmark: list[dict[str, Any]] | None, plot) -> tuple[list[str], list[dict[str, str]] | None]:
    """(columns, rows as strings) of the latency table; checks the plot that goes with it."""
    if plot is not None and not benchmark:
        raise ValueError("benchmark_plot was given without the benchmark rows it plots; pass benchmark= too.")
    if plot is not None and not Path(plot).is_file():
        raise FileNotFoundError(f"benchmark_plot {plot} does not exist.")
    if not benchmark:
        return [], benchmark
    columns = list(dict.fromkeys(k for row in benchmark for k in row))
    return columns, [{c: _format_cell(row[c]) if c in row else "" for c in columns} for row in benchmark]


def model_card(
    model_or_folder: nn.Module | str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    dataset_name: str | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
    benchmark: list[dict[str, Any]] | None = None,
    benchmark_plot: str | os.PathLike | None = None,
    benchmark_description: str | None = None,
    command: str | None = None,
    task: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    training: str | None = None,
):
    """Renders the model card of a sparse model from what a run measured.

    Sections whose numbers were not given (evaluation, latency, the command) are left out of the card, never
    filled with placeholders. The sparse model's metrics also go into the card's `model-index` metadata.

    Args:
        model_or_folder: the sparse model, or a checkpoint folder written by `hf_sparse.save_pretrained`.
        repo_id: the Hub repo the card describes (used in the loading snippet; without it that section is left out).
        base_model: Hub id of the dense model it was pruned from (default: `config._name_or_path` if a Hub id).
        dataset: Hub id of the training/evaluation dataset (e.g. "rajpurkar/squad").
        dataset_name: a readable dataset name for the metrics (default: `dataset`).
        metrics: measured metrics, e.g. `{"dense": {"exact_match": 80.9, "f1": 88.2}, "sparse": {...}}`; either
            key may be absent.
        benchmark: latency rows as dicts with the same keys (e.g. batch size, dense ms, sparse ms, speedup).
        benchmark_plot: an image of the benchmark, copied beside the card by `write_model_card` / `push_to_hub`.
        benchmark_description: where and how the latency was measured (GPU, dtype, ...).
        command: the exact command that produced the model (see `current_command()`).
        task: Hub task id for `model-index` (default: from the model's architecture).
        license: license id for the card metadata.
        model_name: the card's title (default: the repo name).
        training: how the models of `metrics` were trained (e.g. their steps), printed with their results.

    Example:

    ```python
    >>> card = model_card(model, repo_id="me/bert-squad-2of4", base_model="bert-base-cased",
    ...                   dataset="rajpurkar/squad", metrics={"sparse": {"exact_match": 79.1, "f1": 86.9}})
    >>> card.save("out/README.md")
    ```
    """
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    config = _load_config(model_or_folder)
    meta = config.get(METADATA_KEY)
    if not isinstance(meta, dict) or "layers" not in meta:
        raise ValueError(
            "the model carries no sparsity metadata (config.sparsity); save it with hf_sparse.save_pretrained or "
            "train it with SparsityCallback first."
        )
    n, m = parse_pattern(meta["sparsity_pattern"])
    architectures = config.get("architectures") or []
    model_class = architectures[0] if architectures else "AutoModel"
    base_model = base_model or _hub_id(config.get("_name_or_path"))
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"{model_class} {n}:{m} sparse")

    metrics = metrics or {}
    rows = _result_rows(metrics, base_model, n, m)
    task = task or next((t for suffix, t in _TASKS.items() if model_class.endswith(suffix)), None)
    eval_results = _eval_results(metrics.get("sparse") or {}, task, dataset, dataset_name)
    metric_names = list(dict.fromkeys(k for row in rows for k in row["scores"]))
    benchmark_columns, benchmark = _benchmark_table(benchmark, benchmark_plot)

    card_data = ModelCardData(
        base_model=base_model,
        datasets=[dataset] if dataset else None,
        library_name="transformers",
        license=license,
        tags=["hf-sparse", "sparse", f"{n}:{m}-sparsity", "semi-structured-sparsity"],
        model_name=model_name,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        base_model=base_model,
        dataset=dataset,
        pattern=f"{n}:{m}",
        n=n,
        m=m,
        index_bits=max(1, math.ceil(math.log2(m))),
        library_version=meta.get("library_version", __version__),
        criterion=meta.get("criterion"),
        criterion_options=", ".join(f"{k}={v}" for k, v in meta.get("criterion_options", {}).items()),
        layers=meta["layers"],
        num_layers=len(meta["layers"]),
        sparse_parameters=meta.get("sparse_parameters", 0),
        total_sparsity=meta.get("total_sparsity", 0.0),
        model_sparsity=meta.get("model_sparsity", 0.0),
        compact=meta.get("format") == "compact",
        fp8=_fp8_description(meta),
        results=rows,
        results_description=" ".join(
            t for t in (f"Measured on {dataset_name or dataset}." if (dataset_name or dataset) else "", training) if t
        ),
        metric_names=metric_names,
        benchmark=benchmark,
        benchmark_columns=benchmark_columns,
        benchmark_description=benchmark_description or "",
        benchmark_plot=Path(benchmark_plot).name if benchmark_plot else None,
        model_class=model_class,
        repo_id=repo_id,
        command=command,
    )
    # Left-out sections leave blank lines behind: tidy them so the card reads as written by hand.
    text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", card.content)).rstrip() + "\n"
    return ModelCard(text)


def write_model_card(folder: str | os.PathLike, **card_kwargs) -> Path:
    """Renders `model_card(folder, **card_kwargs)` into `folder/README.md` (copying the benchmark plot beside it).

    Example:

    ```python
    >>> write_model_card("bert-squad-24", repo_id="me/bert-squad-24", dataset="rajpurkar/squad")
    ```
    """
    folder = Path(folder)
    card = model_card(folder, **card_kwargs)
    plot = card_kwargs.get("benchmark_plot")
    # Written beside and moved in whole (atomic_path): a failure never leaves a half-written card or plot in place
    # of the ones the folder had.
    if plot is not None and Path(plot).resolve() != (folder / Path(plot).name).resolve():
        with atomic_path(folder / Path(plot).name) as tmp:
            shutil.copyfile(plot, tmp)
    with atomic_path(folder / CARD_NAME) as tmp:
        card.save(tmp)
    return folder / CARD_NAME


def _explain(err: Exception, repo_id: str, endpoint: str) -> str:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    kind = type(err).__name__
    if kind == "OfflineModeIsEnabled":
        why = "HF_HUB_OFFLINE=1 is set, so no request was sent: unset it to push"
    elif kind == "HFValidationError":
        why = f"{repo_id!r} is not a valid Hub repo id, so no request was sent: use 'namespace/name'"
    elif status == 401:
        why = "the Hub rejected the token (401): log in with `hf auth login`, set HF_TOKEN, or pass token="
    elif status == 403:
        why = f"the token has no write access to {repo_id} (403): use a write token of an account that owns it"
    elif status == 404:
        why = f"{repo_id} or the revision was not found (404): check the repo id and revision"
    elif status is not None:
        why = f"the Hub answered HTTP {status}"
    elif "token" in kind.lower() or "token" in str(err).lower():
        why = "no Hugging Face token was found: log in with `hf auth login`, set HF_TOKEN, or pass token="
    else:
        why = f"the Hub at {endpoint} could not be reached (network error, proxy or HF_ENDPOINT)"
    return f"{why}. ({kind}: {str(err).splitlines()[0] if str(err) else ''})"


def _check_before_push(repo_id: str | None, token: str | bool | None) -> None:
    """Refuses, before anything is saved or sent, a push that cannot work: a malformed repo id, offline mode, or
    no token at all (which the Hub would answer with the same 401 as a wrong token)."""
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be 'namespace/name' (e.g. 'your-name/bert-squad-2of4'); got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"repo_id {repo_id!r} is not a valid Hub repo id ({err}); nothing was sent. Use 'namespace/name' with "
            "letters, digits, '-', '_' and '.'."
        ) from None
    if hub_constants.HF_HUB_OFFLINE:
        raise HubPushError(
            f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set, so no request was sent and nothing was saved. "
            "Unset HF_HUB_OFFLINE to push."
        )
    if token is False or (token is None and get_token() is None):
        raise HubPushError(
            f"cannot push to {repo_id}: no Hugging Face token was found (token={token!r}, no HF_TOKEN, not logged "
            "in), so no request was sent. Log in with `hf auth login`, set HF_TOKEN, or pass token=."
        )


def push_to_hub(
    model_or_folder,
    repo_id: str | None = None,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload 2:4 sparse model with hf-sparse",
    compact: bool = False,
    save_directory: str | os.PathLike | None = None,
    endpoint: str | None = None,
    **card_kwargs,
):
    """Uploads a sparse checkpoint, its metadata and its model card to a Hub repo (created if needed).

    Takes a model (saved first, into `save_directory` or a temporary folder), a folder written by
    `hf_sparse.save_pretrained` / `Trainer.save_model` after `SparsityCallback`, or a `transformers.Trainer` (its
    final model is saved to `args.output_dir`, and `hub_model_id`, `hub_token`, `hub_private_repo`, `hub_revision`
    are used unless given here). The checkpoint is verified before upload; the card is rendered by `model_card` and
    uploaded as README.md without touching the local folder. Hub errors raise `HubPushError` saying what to fix;
    the local checkpoint is left intact (a temporary one is kept, and its path given).

    Args:
        model_or_folder: a sparse model, a checkpoint folder, or a Trainer.
        repo_id: "namespace/name" of the repo.
        token, private, revision, create_pr: as in `huggingface_hub.HfApi.upload_folder` / `create_repo`;
            a `revision` branch that does not exist is created from the main branch.
        commit_message: the commit message.
        compact: save a model in the compact format (for a model or Trainer; a folder is uploaded as it is). A
            Trainer's output_dir keeps its standard checkpoint; the compact one goes to `save_directory` or a
            temporary folder.
        save_directory: where to save a model before upload (default: a temporary folder).
        endpoint: Hub endpoint (default: `HF_ENDPOINT` / huggingface.co).
        card_kwargs: passed to `model_card` (base_model, dataset, metrics, benchmark, benchmark_plot, command, ...).

    Returns:
        The `huggingface_hub.CommitInfo` of the upload.

    Example:

    ```python
    >>> import hf_sparse
    >>> trainer.train()
    >>> hf_sparse.push_to_hub(trainer, "me/bert-squad-2of4", dataset="rajpurkar/squad", private=True)
    ```
    """
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hub_constants

    if hasattr(model_or_folder, "args") and hasattr(model_or_folder, "save_model"):
        args = model_or_folder.args
        repo_id = repo_id or args.hub_model_id
        token = token if token is not None else args.hub_token
        private = private if private is not None else getattr(args, "hub_private_repo", None)
        revision = revision or getattr(args, "hub_revision", None)
        if not args.should_save:
            folder, temporary = _folder_to_push(model_or_folder, compact, save_directory)  # collective under FSDP
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)
            return None
    _check_before_push(repo_id, token)
    folder, temporary = _folder_to_push(model_or_folder, compact, save_directory)

    load_state_dict(folder)  # never upload a checkpoint that hf_sparse.from_pretrained would refuse
    card = model_card(folder, repo_id=repo_id, **card_kwargs)
    api = HfApi(endpoint=endpoint, token=token)
    endpoint = api.endpoint or hub_constants.ENDPOINT
    operations = _commit_operations(folder, card, card_kwargs.get("benchmark_plot"))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as err:
        kept = " (a temporary save, kept for you)" if temporary else ""
        raise HubPushError(
            f"pushing {folder} to {repo_id}{f'@{revision}' if revision else ''} failed: {_explain(err, repo_id, endpoint)} "
            f"The local checkpoint in {folder} is intact{kept}; push it again with "
            f"hf_sparse.push_to_hub({str(folder)!r}, {repo_id!r})."
        ) from err
    if temporary:
        shutil.rmtree(folder, ignore_errors=True)
    logger.info("hf-sparse: pushed %s to %s", folder, info.commit_url)
    return info


def _folder_to_push(model_or_folder, compact: bool, save_directory) -> tuple[Path, bool]:
    """(folder, whether it is a temporary one) holding the checkpoint to push: a Trainer's final model saved to its
    output_dir, a model saved to `save_directory` or a temporary folder, or a checkpoint folder as it is."""
    if hasattr(model_or_folder, "args") and hasattr(model_or_folder, "save_model"):
        trainer = model_or_folder
        folder = Path(trainer.args.output_dir if save_directory is None or compact else save_directory)
        # _internal_call keeps the Trainer from starting its own push (with its own card) when args.push_to_hub.
        trainer.save_model(str(folder), _internal_call=True)
        if not compact:
            return folder, False
        # The standard checkpoint stays in output_dir; the compact one is written beside it (save_directory, or a
        # temporary folder), so a failed push never leaves the user without the weights they had.
        return _save_model(trainer.model, save_directory, compact=True)
    if isinstance(model_or_folder, (str, os.PathLike)):
        if compact:
            raise ValueError("compact=True applies when saving a model; save the folder with compact=True first.")
        return Path(model_or_folder), False
    return _save_model(model_or_folder, save_directory, compact)


def _save_model(model, save_directory, compact: bool) -> tuple[Path, bool]:
    temporary = save_directory is None
    folder = Path(tempfile.mkdtemp(prefix="hf_sparse_push-")) if temporary else Path(save_directory)
    save_pretrained(model, folder, compact=compact)
    return folder, temporary


def _commit_operations(folder: Path, card, plot) -> list:
    """The files of one upload: the rendered card as README.md, the benchmark plot, and the checkpoint's files
    (hidden files, private files and Trainer checkpoints left out)."""
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode())]
    if plot is not None:
        operations.append(CommitOperationAdd(path_in_repo=Path(plot).name, path_or_fileobj=str(plot)))
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel == CARD_NAME or rel.startswith((".", "_", "checkpoint-")) or "/." in rel:
            continue
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    return operations
