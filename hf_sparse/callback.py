"""`SparsityCallback`: N:M sparse training with any `transformers.Trainer`, in one line."""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback

from ._distributed import check_replicas_agree, is_sharded, local_tensor, rank, unwrap_model, world_size
from .adapters import base_layer_names
from .calibration import calibration_from_dataloader
from .checkpoint import SparseCheckpointError, atomic_path
from .config import SparsityConfig
from .criteria import CALIBRATED_CRITERIA, compute_masks
from .masks import SparsityReport, group_counts, is_nm, layer_sparsity, nm_mask, total_sparsity
from .numerics import NonFiniteLossError, NumericsCallback, count_non_finite, non_finite
from .pruning import (
    apply_masks_,
    checked_masks,
    chosen_after,
    masks_chosen_before,
    nonzeros_to_compare,
    record_sparsity_,
)
from .selection import block_of, select_layers

logger = logging.getLogger(__name__)

MASKS_NAME = "hf_sparse_masks.safetensors"
"""File the callback writes into every Trainer checkpoint, so that a resumed run continues with the same masks."""


class SparsityCallback(TrainerCallback):
    """Trains N:M (default 2:4) sparse models with `transformers.Trainer`.

    When training starts it selects the layers (`SparsityConfig.target_modules`, default every `nn.Linear` of the
    transformer blocks) and computes their masks; around every optimizer step it zeroes the masked gradients and
    re-applies the masks, so the pruned weights stay exactly zero whatever the optimizer, weight decay, mixed
    precision or gradient accumulation do; it recomputes masks on the configured schedule; and when training ends
    it leaves plain weight tensors with exact zeros (the model has no parametrization or hook at any time, so
    every checkpoint loads with plain `from_pretrained`). Masks are saved in each checkpoint (`MASKS_NAME`) so
    `trainer.train(resume_from_checkpoint=...)` continues with the same masks.

    Under the gradient clipping of the Trainer (`max_grad_norm`), the norm is taken before the masked gradients
    are zeroed, as the Trainer clips before any callback sees the gradients.

    Args:
        config: what to prune and when; default `SparsityConfig()` (2:4, magnitude, once at train start).
        calibration_data: for criterion "wanda" or "sparsegpt": the batches or examples to calibrate on (see
            `hf_sparse.calibration.calibration_batches`). Default: `config.calibration_samples` examples of the
            Trainer's training data, drawn with `args.seed` and batched by its collator.
        masks: masks already chosen for the selected layers, by layer name (what `hf_sparse.prune_` returns, e.g.
            after a one-shot SparseGPT pass): held from `mask_start_step` instead of computed there, so a
            recovery fine-tuning keeps the masks of `config.criterion` and `config.json` names that criterion.

    `config.json` names the criterion (and options) that chose the masks: `config.criterion`, unless the model was
    pruned before (its `config.sparsity` covers the selected layers) and this callback's masks keep every weight
    that pruning left, as `SparsityCallback()` after `prune_(model, SparsityConfig(criterion="sparsegpt"), ...)`
    does; then the earlier criterion and options.

    Example:

    ```python
    >>> from transformers import Trainer
    >>> from hf_sparse import SparsityCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[SparsityCallback()])
    >>> trainer.train()   # every targeted nn.Linear is now exactly 2:4
    ```
    """

    def __init__(
        self, config: SparsityConfig | None = None, calibration_data=None, masks: dict[str, torch.Tensor] | None = None
    ):
        if config is not None and not isinstance(config, SparsityConfig):
            raise TypeError(f"SparsityCallback(config=...) takes a SparsityConfig; got {type(config).__name__}.")
        self.config = config or SparsityConfig()
        self.calibration_data = calibration_data
        self.initial_masks = dict(masks) if masks is not None else None
        self.calibration = getattr(masks, "calibration", None)  # what prune_'s calibration used, for the metadata
        self.masks: dict[str, torch.Tensor] = {}
        self.layers: dict[str, nn.Linear] = {}
        # Values the pruned weights had when pruned, kept only while a mask recomputation is still scheduled.
        self.pruned_values: dict[str, torch.Tensor] = {}
        self._log_layers = False
        # The criterion and options that chose the masks when an earlier pruning did (see masks_chosen_before);
        # None when this callback's config did.
        self._chosen: dict | None = None
        self._step, self._finite_step = 0, None  # the last step checked, the last one found finite

    # -- training events ---------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        callbacks = _run_before_reporting_callbacks(self)  # also when added with trainer.add_callback after __init__
        if model is None:
            raise ValueError("SparsityCallback needs the Trainer's model; the Trainer passed none.")
        model = unwrap_model(model)
        # This callback runs before the user's callbacks and prunes now: a NumericsCallback that refuses the run
        # must do so before that.
        for callback in callbacks:
            if isinstance(callback, NumericsCallback):
                callback.check_before_training(model)
        selection = select_layers(model, self.config)
        self.layers = selection.targets
        if selection.skipped:
            logger.warning(selection.format_skipped())
        logger.info(
            "hf-sparse: %d layer(s) selected for %s sparsity (%s); masks at step %d%s.",
            len(self.layers),
            self.config.sparsity_pattern,
            self.config.criterion,
            self.config.mask_start_step,
            f", then every {self.config.mask_update_every} steps" if self.config.mask_update_every else "",
        )
        self.masks, self.pruned_values = {}, {}
        self._step, self._finite_step = state.global_step, None
        target, names = base_layer_names(model, list(self.layers))
        self._chosen = masks_chosen_before(target, names, self.config)
        if state.max_steps and self.config.mask_start_step > state.max_steps:
            raise ValueError(
                f"hf-sparse: mask_start_step={self.config.mask_start_step} is after the last optimizer step of this "
                f"run (max_steps={state.max_steps}): training would end with a dense model. Lower mask_start_step "
                "or train for more steps."
            )
        if state.global_step > 0 and state.global_step >= self.config.mask_start_step:
            self._restore_masks(args, state)
        elif self.initial_masks is not None and state.global_step == self.config.mask_start_step:
            self._hold_masks(self.initial_masks)
        elif self.config.mask_due(state.global_step):
            self._update_masks(state.global_step, args, model, kwargs.get("train_dataloader"))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Keeps the optimizer's state (momentum, Adam moments) of pruned weights at zero.
        with torch.no_grad():
            for name, mask in self.masks.items():
                grad = self.layers[name].weight.grad
                if grad is not None:
                    local_tensor(grad, f"{name}.weight.grad").mul_(mask)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Weight decay and moments built up before the masks existed still move pruned weights: zero them again.
        apply_masks_(self.layers, self.masks)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0 and self.config.mask_due(state.global_step):
            self._update_masks(state.global_step, args, model, kwargs.get("train_dataloader"))
        elif control.should_save or control.should_log or control.should_evaluate:
            # Before the checkpoint, log or evaluation the Trainer's DefaultFlowCallback (which runs just before this
            # one) has decided on: none of them may hold the NaN of a diverged run.
            self._check_finite(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_log or control.should_evaluate:
            self._check_finite(state.global_step)

    def on_init_end(self, args, state, control, **kwargs):
        _run_before_reporting_callbacks(self)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.masks or logs is None:
            return
        rows = self.report()
        extra = {"sparsity": total_sparsity(rows)}
        if self._log_layers:
            # Per transformer block ("sparsity/bert.encoder.layer.0") whenever masks were (re)computed, and per
            # layer too with `log_per_layer`.
            groups: dict[str, list] = {}
            for r in rows:
                groups.setdefault(block_of(r.name) or "other", []).append(r)
            extra.update({f"sparsity/{group}": round(total_sparsity(g), 6) for group, g in groups.items()})
            if self.config.log_per_layer:
                extra.update({f"sparsity/{r.name}": round(r.sparsity, 6) for r in rows})
            self._log_layers = False
        # In place: the reporting callbacks (TensorBoard, W&B, MLflow, ...) that run after this one see the keys.
        logs.update(extra)
        # The Trainer stores its own copy of the logs before callbacks run: keep `state.log_history` complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if not self.masks:
            return
        # Sharded weights (FSDP2) have masks that differ by rank: every rank saves its own shard's.
        sharded = self._sharded()
        metadata = self._metadata()
        if world_size() > 1 and not sharded:  # every rank, before any early return: it gathers
            digests = check_replicas_agree(self.masks, f"at step {state.global_step}")
            metadata["digests_by_rank"] = ",".join(digests)
            logger.info("hf-sparse: masks identical on %d ranks at step %d (%s).", len(digests), state.global_step,
                        digests[0])  # fmt: skip
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):
            logger.warning("hf-sparse: checkpoint folder %s not found; masks not saved with it.", checkpoint)
            return
        if args.should_save or sharded:
            tensors = _pack_masks(self.masks)
            tensors.update({f"pruned_values.{name}": value.cpu() for name, value in self.pruned_values.items()})
            with atomic_path(os.path.join(checkpoint, _masks_file(sharded))) as tmp:
                save_file(tensors, tmp, metadata=metadata)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.layers and not self.masks:
            raise RuntimeError(
                f"hf-sparse: training ended at step {state.global_step} before any mask was computed "
                f"(mask_start_step={self.config.mask_start_step}); the model is dense. Lower mask_start_step, or "
                "train until it (the run stopped early?)."
            )
        self._step = getattr(state, "global_step", self._step)
        self.squash_(model)
        if self.config.swap_at_end and model is not None:
            from .inference.swap import swap_at_train_end

            swap_at_train_end(unwrap_model(model), self.config)

    # -- mask management ---------------------------------------------------------------------------------------

    def squash_(self, model: nn.Module | None = None) -> None:
        """Applies the masks a last time, checks every layer is exactly N:M, and drops the masks. With `model`, also
        records the sparsity metadata in `model.config.sparsity`, which `save_pretrained` writes into config.json."""
        if not self.masks:
            return
        self._check_finite(self._step)
        apply_masks_(self.layers, self.masks)
        rows = self.report()
        broken = [r.name for r in rows if not r.is_nm]
        if broken:
            raise RuntimeError(f"hf-sparse: layers {broken} are not {self.config.sparsity_pattern} after training.")
        logger.info("hf-sparse: final sparsity\n%s", rows)
        if model is not None:
            # On a PEFT model the metadata goes on the base model, under its own layer names.
            target, layers = base_layer_names(unwrap_model(model), list(self.layers))
            if getattr(target, "config", None) is not None:
                record_sparsity_(target, self.config, layers, self._chosen, self.calibration)
        self.masks, self.pruned_values = {}, {}

    def report(self) -> SparsityReport:
        """Per-layer sparsity of the selected layers (local shards under FSDP2), printable as a table."""
        return SparsityReport(
            layer_sparsity(name, local_tensor(layer.weight), self.config.n, self.config.m)
            for name, layer in self.layers.items()
        )

    def _check_finite(self, step: int) -> None:
        """Raises `NonFiniteLossError` naming the first selected layer with a NaN or inf weight: a diverged run
        cannot be kept N:M (NaN times a mask's zero is NaN), and would otherwise train on, log a sparsity of 0 and
        end with layers that are "not N:M"."""
        self._step = step
        bad = non_finite({name: local_tensor(layer.weight) for name, layer in self.layers.items()})
        if not bad:
            self._finite_step = step
            return
        count = count_non_finite(self.layers[bad[0]].weight)
        where = f"layer {bad[0]} has {count} NaN or inf weight(s) at step {step}"
        if self._finite_step is None:  # no finite check yet in this run: the weights came in non-finite
            raise NonFiniteLossError(
                f"hf-sparse: {where} ({len(bad)} selected layer(s) in all), before this run checked them finite: the "
                "model was given with non-finite weights. Load it from a checkpoint written before training diverged."
            )
        raise NonFiniteLossError(
            f"hf-sparse: {where} (finite at step {self._finite_step}, the last check; {len(bad)} selected layer(s) in "
            "all): training diverged. Lower the learning rate (or raise warmup_steps), train with fp32 master "
            "weights (load the model with dtype=torch.float32, --bf16 for mixed precision), add "
            "hf_sparse.numerics.NumericsCallback to stop at the first non-finite loss, and resume from an earlier "
            f"checkpoint (none after step {self._finite_step} was written by this run)."
        )

    def _hold_masks(self, masks: dict[str, torch.Tensor]) -> None:
        self._check_finite(self._step)
        held = checked_masks(masks, self.layers, self.config, "SparsityCallback(masks=...)")
        self._chosen = chosen_after(self._chosen, nonzeros_to_compare(self._chosen, self.config, self.layers), held)
        self.masks = held
        if self.config.updates_after(self.config.mask_start_step):
            with torch.no_grad():
                self.pruned_values = {
                    name: local_tensor(layer.weight) * ~self.masks[name] for name, layer in self.layers.items()
                }
        apply_masks_(self.layers, self.masks)
        self._log_layers = True
        logger.info("hf-sparse: holding the %d given %s masks.", len(held), self.config.criterion)

    def _update_masks(self, step: int, args=None, model=None, train_dataloader=None) -> None:
        self._check_finite(step)
        if self.pruned_values:
            # Score the pruned weights at the values they had when pruned: the weights are zero there.
            with torch.no_grad():
                for name, values in self.pruned_values.items():
                    local_tensor(self.layers[name].weight).add_(values)
        nonzero = nonzeros_to_compare(self._chosen, self.config, self.layers)
        try:
            masks = self._compute_masks(args, model, train_dataloader)
        except BaseException:
            apply_masks_(self.layers, self.masks)  # zero the pruned values again: the weights are as they were
            raise
        self._chosen = chosen_after(self._chosen, nonzero, masks)
        self.masks, self.calibration = masks, masks.calibration
        if self.config.updates_after(step):
            with torch.no_grad():
                self.pruned_values = {
                    name: local_tensor(layer.weight) * ~self.masks[name] for name, layer in self.layers.items()
                }
        else:
            self.pruned_values = {}
        apply_masks_(self.layers, self.masks)
        self._log_layers = True
        # One line here; the per-layer table is logged once, when training ends (squash_).
        logger.info(
            "hf-sparse: masks computed at step %d: %d layer(s), %.2f%% of their weights pruned.",
            step, len(self.masks), 100 * total_sparsity(self.report()),
        )  # fmt: skip

    def _compute_masks(self, args=None, model=None, train_dataloader=None) -> dict[str, torch.Tensor]:
        data = None
        if self.config.criterion in CALIBRATED_CRITERIA:
            data = self.calibration_data
            if data is None:
                if train_dataloader is None:
                    raise ValueError(
                        f"criterion={self.config.criterion!r} needs calibration data and the Trainer passed no "
                        "train_dataloader; give SparsityCallback(calibration_data=...)."
                    )
                data = calibration_from_dataloader(train_dataloader, self.config, getattr(args, "seed", 0))
            if model is None:
                raise ValueError(f"criterion={self.config.criterion!r} needs the Trainer's model; it passed none.")
        # Under DDP, rank 0's masks (and SparseGPT's weights) on every rank; under FSDP2, each rank's own rows.
        return compute_masks(unwrap_model(model) if model is not None else None, self.layers, self.config, data)

    def _sharded(self) -> bool:
        return any(is_sharded(layer.weight) for layer in self.layers.values())

    def _restore_masks(self, args, state) -> None:
        checkpoint = resumed_checkpoint(args, state)
        bad = non_finite({name: local_tensor(layer.weight) for name, layer in self.layers.items()})
        if bad:
            count = count_non_finite(self.layers[bad[0]].weight)
            raise SparseCheckpointError(
                f"hf-sparse: the checkpoint {checkpoint} has NaN or inf weights (layer {bad[0]}: {count} value(s); "
                f"{len(bad)} layer(s) in all): it was written after training diverged, and no masks can hold them at "
                "zero. Resume from an earlier checkpoint of this run, and keep it from diverging again (a lower "
                "learning rate, fp32 master weights, hf_sparse.numerics.NumericsCallback to stop at the first "
                "non-finite loss)."
            )
        path = os.path.join(checkpoint, _masks_file(self._sharded()))
        if os.path.isfile(path):
            self.masks, self.pruned_values = read_masks(path, self.layers, self.config)
            self._chosen = _masks_chosen_by(path, self._chosen)
            logger.info("hf-sparse: resumed with the masks saved in %s.", path)
        else:
            # A checkpoint from elsewhere: its weights are already N:M, so their nonzeros are the masks.
            not_nm = [
                n
                for n, layer in self.layers.items()
                if not is_nm(local_tensor(layer.weight), self.config.n, self.config.m)
            ]
            if not_nm:
                raise SparseCheckpointError(
                    f"hf-sparse: resuming at step {state.global_step} from {checkpoint}, which has no {MASKS_NAME}, "
                    f"and layers {not_nm[:5]} are not {self.config.sparsity_pattern}; resume from a checkpoint "
                    "written with SparsityCallback (and the same sparsity_pattern)."
                )
            logger.warning("hf-sparse: %s not found; resuming with the masks of the weights' nonzeros.", path)
            self.masks = {
                name: nm_mask(local_tensor(layer.weight), self.config.n, self.config.m, name)
                for name, layer in self.layers.items()
            }
        apply_masks_(self.layers, self.masks)

    def _metadata(self) -> dict[str, str]:
        # masks_chosen_by: who chose these masks, for the run that resumes from this checkpoint ("null": criterion).
        return {
            "sparsity_pattern": self.config.sparsity_pattern,
            "criterion": self.config.criterion,
            "masks_chosen_by": json.dumps(self._chosen),
        }


def _run_before_reporting_callbacks(callback: TrainerCallback) -> list[TrainerCallback]:
    """Moves `callback` to the front of the Trainer's callback list, just behind its `DefaultFlowCallback`.

    The Trainer registers the `report_to` integrations (TensorBoard, W&B, MLflow, ...) before the user's callbacks
    and calls `on_log` in that order, with one `logs` dict: the sparsity added there by a callback behind them
    would never reach them. `DefaultFlowCallback` comes first: at each step's end it decides whether the step logs,
    evaluates or saves, which `SparsityCallback` reads to check the weights before any of them. Callbacks are not
    given the Trainer, so this finds its `CallbackHandler` in the caller's frame (`CallbackHandler.call_event`,
    which is running this callback's event). Moving the running callback from position i to an earlier one leaves
    every later callback at its index, so the current event still reaches each callback exactly once.

    Returns:
        The Trainer's callbacks (empty when its list was not found).
    """
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    frame = sys._getframe(1)
    for _ in range(4):  # the event method, then call_event (or a wrapper of it)
        frame = frame.f_back
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            callbacks = handler.callbacks
            front = int(bool(callbacks) and isinstance(callbacks[0], DefaultFlowCallback))
            if callback in callbacks and callbacks.index(callback) > front:  # only ever forward (see above)
                callbacks.remove(callback)
                callbacks.insert(front, callback)
            return callbacks
    logger.warning(
        "hf-sparse: could not find the Trainer's callback list; the sparsity logged by SparsityCallback reaches "
        "state.log_history but not the report_to integrations that run before it."
    )
    return []


def resumed_checkpoint(args, state) -> str:
    """The checkpoint folder the Trainer is resuming from.

    `Trainer.train(resume_from_checkpoint=path)` loads `path`, which can be anywhere: it is read from the arguments
    of the running `Trainer.train` call. With `resume_from_checkpoint=True` (or when no such call is on the stack)
    it is `output_dir/checkpoint-<global_step>`, the checkpoint the Trainer picks. The folder's
    `trainer_state.json` must be at the step the Trainer resumed at.
    """
    from transformers import Trainer

    checkpoint = None
    train_code = inspect.unwrap(Trainer.train).__code__
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is train_code:
            value = frame.f_locals.get("resume_from_checkpoint")
            checkpoint = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
            break
        frame = frame.f_back
    del frame
    checkpoint = checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    state_file = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(state_file):
        try:
            with open(state_file) as f:
                step = json.load(f).get("global_step")
        except (OSError, ValueError):
            step = None
        if step != state.global_step:
            raise SparseCheckpointError(
                f"hf-sparse: the Trainer resumed at step {state.global_step}, but {state_file} records step {step}; "
                "the masks of this checkpoint are not those of the weights being trained. Pass the checkpoint "
                "folder itself: trainer.train(resume_from_checkpoint='.../checkpoint-N')."
            )
    return checkpoint


def read_masks(
    path: str, layers: dict[str, nn.Linear], config: SparsityConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reads a masks file written by `SparsityCallback` and checks it against `layers` (their current weights, as
    loaded from the same checkpoint) and `config`: the pattern it was written for, one mask per layer with the
    weight's shape, exactly N kept of every M, and no nonzero weight where the mask prunes.

    Returns:
        `(masks, pruned_values)` by layer name, on the weights' devices.

    Raises:
        SparseCheckpointError: naming the file and the layer at fault.
    """
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            packed = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:
        raise SparseCheckpointError(
            f"hf-sparse: the masks file {path} cannot be read ({type(err).__name__}: {err}); it is truncated or "
            "damaged. Resume from an earlier checkpoint, or start the run again."
        ) from err
    pattern = metadata.get("sparsity_pattern")
    if pattern != config.sparsity_pattern:
        raise SparseCheckpointError(
            f"hf-sparse: {path} holds masks for sparsity_pattern {pattern!r}, but this run's SparsityConfig has "
            f"{config.sparsity_pattern!r}; resume with the pattern the checkpoint was trained with, or start over."
        )
    masks = _unpack_masks(packed, layers, path)
    pruned_values = {}
    for name, mask in masks.items():
        weight = local_tensor(layers[name].weight)
        _check_mask(name, mask, weight, config, path)
        values = packed.get(f"pruned_values.{name}")
        if values is not None:
            if tuple(values.shape) != tuple(weight.shape):
                raise SparseCheckpointError(
                    f"hf-sparse: layer {name} in {path}: pruned values of shape {tuple(values.shape)}, weight of "
                    f"shape {tuple(weight.shape)}; the file does not belong to this model."
                )
            pruned_values[name] = values.to(weight.device, weight.dtype)
    return masks, pruned_values


def _check_mask(name: str, mask: torch.Tensor, weight: torch.Tensor, config: SparsityConfig, path: str) -> None:
    kept = group_counts(mask.reshape(-1, config.m))
    wrong = kept != config.n
    if bool(wrong.any()):
        group = int(wrong.nonzero()[0, 0])
        raise SparseCheckpointError(
            f"hf-sparse: layer {name} in {path}: the mask keeps {int(kept[group])} of {config.m} weights in group "
            f"{group} ({int(wrong.sum())} group(s) wrong), not exactly {config.n}:{config.m}; the file is damaged "
            "or was not written by SparsityCallback."
        )
    stray = int((weight.detach() != 0).logical_and_(~mask).sum())
    if stray:
        raise SparseCheckpointError(
            f"hf-sparse: layer {name} in {path}: {stray} weight(s) of the resumed checkpoint are nonzero where this "
            "mask prunes; the masks file belongs to another run or another checkpoint. Resume from a checkpoint "
            "folder written by this run (its weights and masks are saved together)."
        )


def _masks_chosen_by(path: str, default: dict | None) -> dict | None:
    """The `masks_chosen_by` a masks file records (`default` for files written before it was recorded)."""
    with safe_open(path, framework="pt") as f:
        value = (f.metadata() or {}).get("masks_chosen_by")
    return default if value is None else json.loads(value)


def _masks_file(sharded: bool) -> str:
    if not sharded:
        return MASKS_NAME
    return MASKS_NAME.replace(".safetensors", f"-rank{rank():05d}-of-{world_size():05d}.safetensors")


def _pack_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # One bit per weight: a BERT-base's masks take ~10 MB per checkpoint instead of ~85 MB.
    return {name: torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1))) for name, mask in masks.items()}


def _unpack_masks(packed: dict[str, torch.Tensor], layers: dict[str, nn.Linear], path: str) -> dict:
    missing = sorted(set(layers) - set(packed))
    if missing:
        raise SparseCheckpointError(
            f"hf-sparse: {path} has no masks for layers {missing[:5]}; was it written for this model?"
        )
    masks = {}
    for name, layer in layers.items():
        if packed[name].dtype != torch.uint8 or packed[name].dim() != 1:
            raise SparseCheckpointError(
                f"hf-sparse: the mask of {name} in {path} is a {packed[name].dtype} tensor of shape "
                f"{tuple(packed[name].shape)}, not 1-D packed uint8; the file was not written by SparsityCallback."
            )
        weight = local_tensor(layer.weight)
        bits = np.unpackbits(packed[name].numpy())
        if bits.size < weight.numel() or bits.size - weight.numel() >= 8:
            raise SparseCheckpointError(
                f"hf-sparse: the mask of {name} in {path} holds {bits.size} bits, not {weight.numel()} "
                f"(weight shape {tuple(weight.shape)}); the file does not belong to this model."
            )
        masks[name] = torch.from_numpy(bits[: weight.numel()].astype(bool)).reshape(weight.shape).to(weight.device)
    return masks
