"""Pruning criteria that look at activations: Wanda and SparseGPT N:M masks, and the calibration passes they need.

Both run calibration batches through the model one transformer block at a time. The statistics of block k are
gathered with blocks 0..k-1 already pruned (and, for SparseGPT, already updated), so every block sees the inputs it
will see in the pruned model. The forward pass stops at the end of the block being pruned, and only that block's
statistics are held: one vector (Wanda) or one `in_features x in_features` matrix (SparseGPT) per layer of the block.
Hidden states are never stored between blocks; the price is that block k is reached by running blocks 0..k-1 again
(k(k+1)/2 block passes per batch instead of k), which is small next to SparseGPT's solve for the models this
library targets.

Statistics and the SparseGPT solve run in float32 on the CUDA GPU when there is one (or on `device`), whatever
device the model is on; the forward passes run where the model is.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .config import SparsityConfig
from .masks import nm_mask_from_scores

logger = logging.getLogger(__name__)

CALIBRATED_CRITERIA = ("wanda", "sparsegpt")
"""Criteria that need calibration data."""

_LABEL_KEYS = {"labels", "label", "label_ids", "start_positions", "end_positions"}


class _StopForward(Exception):
    """Raised by a hook at the end of the block being calibrated: the rest of the model is not needed."""


# -- calibration data ------------------------------------------------------------------------------------------------


def _is_batch(item) -> bool:
    """A dict whose `input_ids` (or first tensor) has a batch dimension, rather than one example."""
    if not isinstance(item, Mapping):
        return False
    value = item.get("input_ids", next(iter(item.values()), None))
    return isinstance(value, torch.Tensor) and value.dim() >= 2


def _collate(examples: list[Mapping], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stacks examples into a batch, right-padding 1-D sequences of different lengths (labels with -100)."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if isinstance(values[0], str) or (isinstance(values[0], list) and values[0] and isinstance(values[0][0], str)):
            continue  # text columns (e.g. "context") are not model inputs
        tensors = [torch.as_tensor(v) for v in values]
        if all(t.shape == tensors[0].shape for t in tensors):
            batch[key] = torch.stack(tensors)
            continue
        if any(t.dim() != 1 for t in tensors):
            raise ValueError(
                f"calibration examples have {key!r} of different shapes {sorted({tuple(t.shape) for t in tensors})}; "
                "pass batches (dicts of tensors with a batch dimension) or a DataLoader with a padding collator."
            )
        pad = -100 if "label" in key else pad_token_id if key == "input_ids" else 0
        batch[key] = nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad)
        if key == "input_ids" and "attention_mask" not in examples[0]:
            lengths = torch.tensor([len(t) for t in tensors])
            batch["attention_mask"] = (torch.arange(batch[key].shape[1])[None] < lengths[:, None]).long()
    return batch


def _take_rows(batch: dict, rows: int) -> dict:
    size = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if size is None or size <= rows:
        return batch
    return {
        k: v[:rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
        for k, v in batch.items()
    }


def _batch_size(batch: dict) -> int:
    return next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 1)


def calibration_batches(data, config: SparsityConfig, pad_token_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """The first `config.calibration_samples` sequences of `data`, as a list of batches (dicts of tensors).

    Args:
        data: a `torch.utils.data.DataLoader` or any iterable of batches (dicts of tensors with a batch dimension);
            a single batch; or a dataset / list / iterable of examples (dicts of tensors or lists of ints, as a
            tokenized `datasets.Dataset` returns them), which are padded and batched by
            `config.calibration_batch_size`. Text columns are ignored; tokenize first.
        config: gives `calibration_samples` and `calibration_batch_size`.
        pad_token_id: padding of `input_ids` when examples of different lengths are batched here.

    Example:

    ```python
    >>> batches = calibration_batches(tokenizer(texts, padding=True, return_tensors="pt"), SparsityConfig())
    ```
    """
    if data is None:
        raise ValueError(
            f"criterion={config.criterion!r} needs calibration data: pass calibration_data= to hf_sparse.prune_ "
            "(a DataLoader, a tokenized dataset, or a list of batches or examples), or SparsityCallback("
            "calibration_data=...); under a Trainer the callback takes it from the train dataloader."
        )
    if isinstance(data, Mapping):  # one batch, e.g. a tokenizer's BatchEncoding
        data = [dict(data)] if _is_batch(data) else [data]
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise TypeError(
            f"calibration_data must be a DataLoader, a dataset, or a list of batches or examples; got "
            f"{type(data).__name__}. Tokenize text first (e.g. tokenizer(texts, padding=True, return_tensors='pt'))."
        )
    wanted = config.calibration_samples
    batches, pending, seen = [], [], 0

    def flush():
        nonlocal pending, seen
        if pending:
            batch = _collate(pending, pad_token_id)
            batches.append(batch)
            seen += _batch_size(batch)
            pending = []

    items = iter(data) if isinstance(data, Iterable) else (data[i] for i in range(len(data)))
    for item in items:
        if seen >= wanted:
            break
        if _is_batch(item):
            flush()
            batch = _take_rows(dict(item), wanted - seen)
            batches.append(batch)
            seen += _batch_size(batch)
        elif isinstance(item, Mapping):
            pending.append(item)
            if len(pending) == min(config.calibration_batch_size, wanted - seen):
                flush()
        else:
            raise TypeError(
                f"calibration_data items must be dicts (batches or examples, e.g. with 'input_ids'); got "
                f"{type(item).__name__}."
            )
    flush()
    if not batches:
        raise ValueError("calibration_data is empty; give at least one batch or example.")
    return batches


def calibration_from_dataloader(dataloader, config: SparsityConfig, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from a training dataloader, without disturbing it.

    For a map-style dataset, `config.calibration_samples` examples are drawn by a permutation seeded with `seed`
    and batched with the dataloader's own collator: every data-parallel rank gets the same batches, and the
    training sampler's random state is left untouched. Otherwise the dataloader's first batches are used.
    """
    dataset = getattr(dataloader, "dataset", None)
    collate_fn = getattr(dataloader, "collate_fn", None)
    map_style = (
        dataset is not None
        and collate_fn is not None
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
        and not isinstance(dataset, torch.utils.data.IterableDataset)
    )
    if not map_style:
        return calibration_batches(dataloader, config)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[: config.calibration_samples].tolist()
    size = config.calibration_batch_size
    return [dict(collate_fn([dataset[i] for i in order[j : j + size]])) for j in range(0, len(order), size)]


def _model_inputs(model: nn.Module, batch: dict, device: torch.device) -> dict:
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    inputs = {}
    for key, value in batch.items():
        if key in _LABEL_KEYS or (key not in params and not takes_any):
            continue  # calibration needs activations only; labels would just add a loss computation
        inputs[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    if not inputs:
        raise ValueError(f"calibration batch keys {sorted(batch)} are not inputs of {type(model).__name__}.forward.")
    return inputs


# -- block structure -------------------------------------------------------------------------------------------------


def _block_of(name: str) -> str | None:
    """The repeated block a layer belongs to: its name up to the first numeric component ("encoder.layer.3")."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _groups(model: nn.Module, layers: dict[str, nn.Linear]) -> list[tuple[str | None, list[str]]]:
    """Layers grouped by block, blocks in module order; layers outside any block come last (one full pass)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    by_block: dict[str | None, list[str]] = {}
    for name in sorted(layers, key=lambda n: order.get(n, len(order))):
        by_block.setdefault(_block_of(name), []).append(name)
    blocks = sorted((b for b in by_block if b is not None), key=lambda b: order.get(b, len(order)))
    groups = [(b, by_block[b]) for b in blocks]
    if None in by_block:
        groups.append((None, by_block[None]))
    return groups


# -- statistics ------------------------------------------------------------------------------------------------------


class _InputStats:
    """Running statistics of a linear layer's inputs over the calibration tokens (padding excluded)."""

    def __init__(self, in_features: int, hessian: bool, device: torch.device):
        self.tokens = 0
        self.sq_norms = None if hessian else torch.zeros(in_features, device=device, dtype=torch.float32)
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=torch.float32) if hessian else None
        self.device = device

    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if token_mask is not None and token_mask.numel() == x.shape[0]:
            x = x[token_mask.reshape(-1).to(x.device)]
        x = x.to(self.device, torch.float32)
        self.tokens += x.shape[0]
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)
        else:
            self.sq_norms += (x * x).sum(dim=0)


def _stats_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return param.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# -- the criteria ----------------------------------------------------------------------------------------------------


def wanda_mask(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, n: int = 2, m: int = 4, name: str = "weight"
) -> torch.Tensor:
    """Wanda N:M mask: keep the `n` largest `|W_ij| * ||X_j||_2` of every `m` consecutive inputs of each row.

    Args:
        weight: `(out_features, in_features)` weight (or its local rows).
        input_sq_norms: `(in_features,)` sum over calibration tokens of the squared inputs, `||X_j||_2^2`.
        n, m: the pattern.
        name: the layer, for error messages.

    Example:

    ```python
    >>> wanda_mask(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([100.0, 100.0, 1.0, 1.0]))
    tensor([[ True,  True, False, False]])
    ```
    """
    if input_sq_norms.shape != weight.shape[-1:]:
        raise ValueError(
            f"{name}: input norms of shape {tuple(input_sq_norms.shape)} do not match the weight's input "
            f"dimension {weight.shape[-1]}."
        )
    scores = weight.detach().abs().float() * input_sq_norms.to(weight.device, torch.float32).sqrt()[None, :]
    return nm_mask_from_scores(scores, n, m, name)


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    mean_diag = torch.diag(hessian).mean()
    for _ in range(4):
        lower, info = torch.linalg.cholesky_ex(hessian + damping * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
        damping *= 10  # rank-deficient statistics (few tokens, dead inputs): regularize more and retry
    raise RuntimeError(
        f"{name}: the Hessian of its inputs is not positive definite even with damping {damping / 10:g}; "
        "give more calibration samples or raise sparsegpt_damping."
    )


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int = 2,
    m: int = 4,
    damping: float = 0.01,
    block_size: int = 128,
    name: str = "weight",
) -> torch.Tensor:
    """SparseGPT N:M pruning of one weight in place: mask selection plus the OBS update of the kept weights.

    Columns are pruned left to right. At the first column of each group of `m`, the group's `m - n` weights with
    the smallest `w^2 / [H^-1]_jj^2` are dropped; each pruned column's error is then spread over the columns not
    yet processed through the (upper Cholesky factor of the) inverse Hessian, so that the layer's output on the
    calibration inputs changes as little as possible (Frantar & Alistarh, 2023). Every row uses the same Hessian,
    so a row-sharded weight can be pruned shard by shard.

    Args:
        weight: `(out_features, in_features)` weight, changed in place (kept weights updated, others zero).
        hessian: `(in_features, in_features)` sum of `x x^T` over calibration tokens; its device and float32 are
            where the solve runs.
        n, m: the pattern.
        damping: fraction of the mean diagonal added to the diagonal before inversion.
        block_size: columns updated together (a multiple of `m`).
        name: the layer, for error messages.

    Returns:
        The boolean mask of kept weights, on `weight`'s device.

    Example:

    ```python
    >>> x = torch.randn(256, 8)
    >>> mask = sparsegpt_prune_(layer.weight, x.T @ x)
    ```
    """
    if block_size % m:
        raise ValueError(f"{name}: block_size={block_size} must be a multiple of M={m}.")
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"{name}: in_features={cols} is not divisible by M={m}.")
    if hessian.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian of shape {tuple(hessian.shape)} does not match in_features={cols}.")
    device = hessian.device
    W = weight.detach().to(device, torch.float32).clone()
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights do not matter; keep H invertible
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _upper_cholesky_of_inverse(H, damping, name)
    del H
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        inv_diag_sq = torch.diag(Hinv1) ** 2
        keep1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(end - start):
            if i % m == 0:
                scores = W1[:, i : i + m] ** 2 / inv_diag_sq[i : i + m][None, :]
                keep1[:, i : i + m] = nm_mask_from_scores(scores, n, m, name)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, start:end] = Q1
        keep[:, start:end] = keep1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    weight.copy_(W.to(weight.device, weight.dtype))
    return keep.to(weight.device)


@torch.no_grad()
def calibrated_prune_(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    config: SparsityConfig,
    calibration_data,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Prunes `layers` of `model` in place with an activation-aware criterion, block by block.

    Used by `hf_sparse.prune_` and `SparsityCallback` for `config.criterion` in `CALIBRATED_CRITERIA`. The
    masked-out weights are zero on return (and SparseGPT has updated the kept ones); the masks are returned by
    layer name. The model's train/eval mode and `config.use_cache` are restored.

    Args:
        model: the model whose forward takes the calibration batches.
        layers: the layers to prune, as `select_layers(model, config).targets` returns them.
        config: criterion, pattern and calibration settings.
        calibration_data: see `calibration_batches`; a list of batches is used as it is.
        device: where statistics and the SparseGPT solve run; default the model's accelerator, else CUDA when
            available, else the CPU.

    Example:

    ```python
    >>> masks = calibrated_prune_(model, select_layers(model, config).targets, config, batches)
    ```
    """
    from .pruning import local_tensor

    if config.criterion not in CALIBRATED_CRITERIA:
        raise ValueError(f"calibrated_prune_ runs {list(CALIBRATED_CRITERIA)}; got criterion={config.criterion!r}.")
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    batches = calibration_batches(calibration_data, config, pad_token_id)
    model_device = next(model.parameters()).device
    batches = [_model_inputs(model, batch, model_device) for batch in batches]
    stats_device = _stats_device(model, device)
    hessian = config.criterion == "sparsegpt"
    modules = dict(model.named_modules())
    masks: dict[str, torch.Tensor] = {}
    was_training = model.training
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    model.eval()
    if use_cache:
        model_config.use_cache = False  # a KV cache would grow with every block pass
    started = time.perf_counter()
    try:
        for block, names in _groups(model, layers):
            stats = {name: _InputStats(layers[name].in_features, hessian, stats_device) for name in names}
            token_mask: list[torch.Tensor | None] = [None]
            handles = []
            for name in names:

                def record(module, args, kwargs, _stats=stats[name], _mask=token_mask):
                    x = args[0] if args else kwargs.get("input")
                    _stats.add(x, _mask[0])

                handles.append(layers[name].register_forward_pre_hook(record, with_kwargs=True))
            if block is not None:

                def stop(module, args, output):
                    raise _StopForward

                handles.append(modules[block].register_forward_hook(stop))
            try:
                for batch in batches:
                    mask = batch.get("attention_mask")
                    token_mask[0] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                    try:
                        model(**batch)
                    except _StopForward:
                        pass
            finally:
                for handle in handles:
                    handle.remove()
            for name in names:
                if stats[name].tokens == 0:
                    raise ValueError(
                        f"{name} saw no calibration tokens: the calibration batches do not reach it (an "
                        "encoder-decoder needs decoder inputs too), or exclude it with exclude_modules."
                    )
                weight = local_tensor(layers[name].weight, f"{name}.weight")
                if hessian:
                    mask = sparsegpt_prune_(
                        weight,
                        stats[name].hessian,
                        config.n,
                        config.m,
                        config.sparsegpt_damping,
                        config.sparsegpt_block_size,
                        name,
                    )
                else:
                    mask = wanda_mask(weight, stats[name].sq_norms, config.n, config.m, name)
                weight.mul_(mask)
                masks[name] = mask
            del stats
    finally:
        model.train(was_training)
        if use_cache:
            model_config.use_cache = use_cache
    logger.info(
        "hf-sparse: %s pruned %d layer(s) with %d calibration batch(es) in %.1fs (statistics on %s).",
        config.criterion,
        len(masks),
        len(batches),
        time.perf_counter() - started,
        stats_device,
    )
    return masks


def broadcast_weights_(layers: dict[str, nn.Linear]) -> None:
    """Copies rank 0's weights of `layers` to every data-parallel rank (after SparseGPT changed them), so that
    replicas stay identical even if ranks computed from different calibration batches. No-op without
    `torch.distributed` or for sharded (DTensor) weights, whose ranks hold different rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for layer in layers.values():
        if type(layer.weight).__name__ == "DTensor" or type(layer.weight.data).__name__ == "DTensor":
            continue
        dist.broadcast(layer.weight.data, src=0)
