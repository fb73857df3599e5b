"""Pruning criteria: which weights of each layer an N:M mask keeps.

- "magnitude": the `n` largest `|W|` of every `m` consecutive inputs (no data needed).
- "wanda": the largest `|W_ij| * ||X_j||_2`, with input norms from calibration data (Sun et al., 2023).
- "sparsegpt": masks chosen and kept weights updated to minimise the layer's output error on calibration data
  (Frantar & Alistarh, 2023).

`compute_masks` is the one place that chooses between them; `hf_sparse.prune_` and `SparsityCallback` both call it.
The calibrated criteria prune block by block as they go (see `hf_sparse.calibration`), so they change the weights
they return masks for; magnitude only reads them.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from ._distributed import broadcast_masks, broadcast_weights_, is_sharded, local_tensor, rank, world_size
from .blocks import layer_groups
from .calibration import (
    block_statistics,
    calibration_batches,
    calibration_samples,
    prepare_batch,
    stats_device,
)
from .config import SparsityConfig
from .masks import nm_mask, nm_mask_from_scores
from .numerics import count_non_finite, non_finite
from .refit import admm_mask, check_refit_method, output_error, refit_kept

logger = logging.getLogger(__name__)

CALIBRATED_CRITERIA = ("wanda", "sparsegpt")
"""Criteria that need calibration data."""


class Masks(dict):
    """The N:M masks by layer name, as `compute_masks` returns them, with `calibration`: what the calibration of
    Wanda or SparseGPT actually used (`None` for magnitude), as the checkpoint metadata records it over the configured
    values (`attach_sparsity_metadata(..., calibration=masks.calibration)`): `calibration_samples` (the sequences run,
    which may be fewer than configured), `calibration_tokens` (the real tokens the statistics came from: the fewest
    any layer saw, e.g. an encoder-decoder's targets) and, for SparseGPT,
    `sparsegpt_update_bias` (whether any layer had a bias to update).
    """

    def __init__(self, masks=(), calibration: dict | None = None):
        super().__init__(masks)
        self.calibration = calibration


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
    bias: torch.Tensor | None = None,
    refit: bool = False,
    admm_steps: int = 0,
    refit_method: str = "auto",
) -> torch.Tensor:
    """SparseGPT N:M pruning of one weight in place: mask selection plus the OBS update of the kept weights.

    Columns are pruned left to right. At the first column of each group of `m`, the group's `m - n` weights with
    the smallest `w^2 / [H^-1]_jj^2` are dropped; each pruned column's error is then spread over the columns not
    yet processed through the (upper Cholesky factor of the) inverse Hessian, so that the layer's output on the
    calibration inputs changes as little as possible (Frantar & Alistarh, 2023). Every row uses the same Hessian,
    so a row-sharded weight can be pruned shard by shard.

    With `bias`, the bias is the weight of a constant input 1, placed after the last column and never pruned, so
    the error of every pruned column is also spread onto it (the shift of the output's mean is absorbed).

    SparseGPT's one pass is an approximation: each column's update only reaches the columns after it. With
    `refit`, the kept weights of every row are then solved for exactly (`refit_kept`): the least-squares fit of the
    dense layer's output under the chosen mask. With `admm_steps`, a second mask is also searched by ADMM (`admm_mask`,
    a mask that forms gradually while the weights are fitted) and refit; the layer keeps whichever of the two masks
    has the lower output error on the calibration inputs, so it is never worse than `refit` alone.

    Args:
        weight: `(out_features, in_features)` weight, changed in place (kept weights updated, others zero).
        hessian: `(in_features, in_features)` sum of `x x^T` over calibration tokens (`in_features + 1` square
            with `bias`: the inputs with a 1 appended); its device and float32 are where the solve runs.
        n, m: the pattern.
        damping: fraction of the mean diagonal added to the diagonal before inversion.
        block_size: columns updated together (a multiple of `m`).
        name: the layer, for error messages.
        bias: `(out_features,)` bias, updated in place with the kept weights.
        refit: solve each row's kept weights exactly after the pass.
        admm_steps: if > 0, also search a mask by that many ADMM steps and keep the better (implies `refit`).
        refit_method: the refit's solver, "auto", "cholesky" or "cg" (see `refit_kept`).

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
    check_refit_method(refit_method, name)
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"{name}: in_features={cols} is not divisible by M={m}.")
    size = cols + (bias is not None)
    if hessian.shape != (size, size):
        expected = f"in_features={cols}" + (" plus one for the bias" if bias is not None else "")
        raise ValueError(f"{name}: Hessian of shape {tuple(hessian.shape)} does not match {expected}.")
    device = hessian.device
    W = weight.detach().to(device, torch.float32)
    if bias is not None:
        W = torch.cat([W, bias.detach().to(device, torch.float32)[:, None]], dim=1)
    else:
        W = W.clone()
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights do not matter; keep H invertible
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    dense = W.clone() if refit or admm_steps else None
    Hinv = _upper_cholesky_of_inverse(H, damping, name)
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
        W[:, end:] -= Err1 @ Hinv[start:end, end:]  # with a bias, its column (the last) is updated too
    del Hinv
    if dense is not None:
        W = refit_kept(dense, H, keep, damping, name, start=W, method=refit_method)
        if admm_steps:
            admm_keep = admm_mask(dense, H, n, m, admm_steps, name)
            admm_W = refit_kept(dense, H, admm_keep, damping, name, method=refit_method)
            if output_error(dense, admm_W, H) < output_error(dense, W, H):
                keep, W = admm_keep, admm_W
    weight.copy_(W[:, :cols].to(weight.device, weight.dtype))
    if bias is not None:
        bias.copy_(W[:, cols].to(bias.device, bias.dtype))
    return keep.to(weight.device)


@torch.no_grad()
def compute_masks(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    config: SparsityConfig,
    calibration_data=None,
    device: torch.device | str | None = None,
    block_inputs: str = "auto",
) -> Masks:
    """The N:M masks of `layers` (local shards under FSDP2) by `config.criterion`, by layer name.

    Magnitude reads the weights only. Wanda and SparseGPT calibrate block by block and prune each block before
    calibrating the next, so on return the masked-out weights of `layers` are zero (and SparseGPT has updated the
    kept ones); if anything fails on the way, every weight of `layers` is put back as it was before the call (a copy
    of them is kept on the CPU meanwhile). The
    model's train/eval mode and `config.use_cache` are restored.

    Under data parallelism (`torch.distributed` initialized, weights replicated, as under DDP or before the
    Trainer wraps the model) every rank must call it, and every rank returns rank 0's masks: Wanda and SparseGPT
    calibrate on rank 0 alone while the other ranks wait, then rank 0's masks and pruned weights are broadcast
    (one calibration's time plus one broadcast of the pruned layers; the log line says both). Magnitude masks are
    computed on every rank and rank 0's broadcast. Under FSDP2 (row-sharded weights) every rank computes the
    masks of its own rows from the same calibration batches, as the sharded forward pass needs every rank.

    Args:
        model: the model whose forward takes the calibration batches (unused by magnitude).
        layers: the layers, as `select_layers(model, config).targets` returns them.
        config: criterion, pattern and calibration settings.
        calibration_data: for "wanda" / "sparsegpt", see `hf_sparse.calibration.calibration_batches`: its first
            `config.calibration_samples` sequences.
        device: where statistics and the SparseGPT solve run; default the model's accelerator, else CUDA when
            available, else the CPU.
        block_inputs: where calibration keeps each block's inputs, so that every block runs a fixed number of times
            whatever its depth: "auto" (where the model computes them, or on the CPU when they would take more than
            half of the GPU's free memory), "device", "cpu", or "none" (nothing kept: each block is reached by running
            the model from its inputs again, k(k+1)/2 block passes for k blocks). See `block_statistics` for the
            memory each takes.

    Example:

    ```python
    >>> masks = compute_masks(model, select_layers(model, config).targets, config, batches)
    ```
    """
    if config.criterion == "learned":
        raise ValueError(
            "criterion='learned': these masks are trained by hf_sparse.learn_masks, not computed from the weights; "
            "learn them first and pass them on (prune_(model, config, masks=masks) or SparsityCallback(config, "
            "masks=masks)), or choose magnitude, wanda or sparsegpt."
        )
    replicated = world_size() > 1 and not any(is_sharded(layer.weight) for layer in layers.values())
    _check_finite_weights(layers)
    if config.criterion not in CALIBRATED_CRITERIA:
        masks = {
            name: nm_mask(local_tensor(layer.weight, f"{name}.weight"), config.n, config.m, name)
            for name, layer in layers.items()
        }
        return Masks(broadcast_masks(masks) if replicated else masks)
    if not replicated:
        return _calibrated_masks(model, layers, config, calibration_data, device, block_inputs)
    started = time.perf_counter()
    if rank() == 0:
        masks = _calibrated_masks(model, layers, config, calibration_data, device, block_inputs)
    else:  # placeholders of the right shapes: the broadcast fills them with rank 0's masks
        masks = Masks({name: torch.zeros_like(layer.weight, dtype=torch.bool) for name, layer in layers.items()})
    calibrated = time.perf_counter()
    broadcast_weights_(layers)
    record = [masks.calibration]
    torch.distributed.broadcast_object_list(record, src=0)
    masks = Masks(broadcast_masks(masks), record[0])
    logger.log(
        logging.INFO if rank() == 0 else logging.DEBUG,
        "hf-sparse: %s masks calibrated on rank 0 in %.2fs; its masks and weights of %d layer(s) broadcast to %d "
        "ranks in %.2fs.",
        config.criterion,
        calibrated - started,
        len(masks),
        world_size(),
        time.perf_counter() - calibrated,
    )
    return masks


def _check_finite_weights(layers: dict[str, nn.Linear]) -> None:
    """Masks chosen from NaN or inf weights would be meaningless (Wanda's and SparseGPT's statistics would blame a
    later layer, whose inputs the bad weights spoil, and inf times a mask's zero is NaN, which no N:M check passes):
    name the layer at fault before anything is changed. Every process raises (`non_finite` gathers)."""
    bad = non_finite({name: local_tensor(layer.weight, f"{name}.weight") for name, layer in layers.items()})
    if bad:
        raise ValueError(
            f"{bad[0]}.weight holds {count_non_finite(layers[bad[0]].weight)} NaN or inf value(s) before pruning "
            f"({len(bad)} selected layer(s) with non-finite weights in all): masks cannot be chosen from non-finite "
            "weights (a diverged run or a damaged checkpoint?). Load the model from a checkpoint written before "
            "training diverged; nothing was pruned."
        )


@torch.no_grad()
def _calibrated_masks(model, layers, config, calibration_data, device, block_inputs="auto") -> Masks:
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    batches = calibration_batches(calibration_data, config, pad_token_id)
    model_device = next(model.parameters()).device
    batches = [prepare_batch(model, batch, model_device, index) for index, batch in enumerate(batches)]
    samples = calibration_samples(batches)
    if samples < config.calibration_samples:
        logger.warning(
            "hf-sparse: calibration_samples=%d, but the calibration data holds %d sequence(s): %s calibrates on "
            "those, and the checkpoint records %d.",
            config.calibration_samples, samples, config.criterion, samples,
        )  # fmt: skip
    on = stats_device(model, device)
    # Calibrated criteria prune block by block: a failure in block k (or an interrupt) would leave blocks < k
    # pruned. Keep the selected weights (on the CPU) until every mask is computed, and put them back on any error.
    snapshot = _snapshot(layers)
    try:
        masks, biases, seen = _prune_block_by_block(model, layers, config, batches, on, block_inputs)
    except BaseException:
        _restore_(layers, snapshot)
        raise
    record = {"calibration_samples": samples, "calibration_tokens": min(seen.values(), default=0)}
    if config.criterion == "sparsegpt":
        record["sparsegpt_update_bias"] = bool(biases)
        if config.sparsegpt_update_bias and not biases:
            logger.warning(
                "hf-sparse: sparsegpt_update_bias=True, but none of the %d selected layers has a bias: no bias was "
                "updated, and the checkpoint records sparsegpt_update_bias=False.",
                len(layers),
            )
    return Masks(masks, record)


def _snapshot(layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The weights and biases of `layers` (local shards), on the CPU: SparseGPT may change both."""
    saved = {}
    for name, layer in layers.items():
        for kind in ("weight", "bias"):
            if getattr(layer, kind, None) is not None:
                saved[f"{name}.{kind}"] = local_tensor(getattr(layer, kind)).detach().to("cpu", copy=True)
    return saved


@torch.no_grad()
def _restore_(layers: dict[str, nn.Linear], snapshot: dict[str, torch.Tensor]) -> None:
    for key, saved in snapshot.items():
        name, kind = key.rsplit(".", 1)
        local_tensor(getattr(layers[name], kind)).copy_(saved)


def _prune_block_by_block(
    model, layers, config: SparsityConfig, batches: list, on: torch.device, block_inputs: str = "auto"
) -> tuple:
    """Wanda / SparseGPT masks, pruning each block (or group of layers) of `layers` before the next is calibrated;
    the names of the layers whose bias SparseGPT updated; and the calibration tokens each layer saw."""
    hessian = config.criterion == "sparsegpt"
    update_bias = hessian and config.sparsegpt_update_bias
    masks: dict[str, torch.Tensor] = {}
    biases, tokens = [], {}
    started = time.perf_counter()
    groups = block_statistics(
        model,
        layers,
        batches,
        hessian,
        on,
        sequential=config.sequential_calibration,
        constant_input=update_bias,
        block_inputs=block_inputs,
    )
    # A progress bar per block, as the Trainer shows for steps (transformers' tqdm: off with
    # HF_HUB_DISABLE_PROGRESS_BARS=1 or transformers.utils.logging.disable_progress_bar(); main process only).
    progress = hf_logging.tqdm(
        groups, total=None if config.sequential_calibration else len(layer_groups(model, layers)),
        desc=f"{config.criterion} calibration", unit="group" if config.sequential_calibration else "block",
        disable=rank() != 0,
    )  # fmt: skip
    for stats in progress:
        for name, stat in stats.items():
            weight = local_tensor(layers[name].weight, f"{name}.weight")
            if hessian:
                mask = sparsegpt_prune_(
                    weight,
                    stat.hessian,
                    config.n,
                    config.m,
                    config.sparsegpt_damping,
                    config.sparsegpt_block_size,
                    name,
                    bias=local_tensor(layers[name].bias, f"{name}.bias") if stat.constant_input else None,
                    refit=config.sparsegpt_refit,
                    admm_steps=config.sparsegpt_admm_steps,
                )
            else:
                mask = wanda_mask(weight, stat.sq_norms, config.n, config.m, name)
            weight.mul_(mask)
            masks[name] = mask
            if hessian and stat.constant_input:
                biases.append(name)
            tokens[name] = stat.tokens
    logger.info(
        "hf-sparse: %s pruned %d layer(s) with %d calibration batch(es) in %.1fs (statistics on %s).",
        config.criterion,
        len(masks),
        len(batches),
        time.perf_counter() - started,
        on,
    )
    if hessian:
        _warn_rank_deficient(layers, tokens)
    return masks, biases, tokens


def _warn_rank_deficient(layers: dict[str, nn.Linear], tokens: dict[str, int]) -> None:
    """SparseGPT on fewer tokens than a layer has inputs: the Hessian is rank-deficient, and the masks (and refit or
    ADMM weights) fit those few tokens, at the risk of doing worse than magnitude's on other data."""
    few = [name for name in tokens if tokens[name] < layers[name].in_features]
    if few:
        widest = max(layers[name].in_features for name in few)
        logger.warning(
            "hf-sparse: sparsegpt calibrated %d of %d layer(s) on fewer tokens than they have inputs (%s: %d tokens "
            "for %d inputs), so their Hessians are rank-deficient: the masks and weights follow those few tokens and "
            "may do worse than magnitude pruning on other data. Give more calibration data (well over %d real "
            "tokens: more or longer calibration_samples).",
            len(few), len(tokens), few[0], tokens[few[0]], layers[few[0]].in_features, widest,
        )  # fmt: skip
