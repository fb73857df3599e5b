"""`NumericsCallback`: refuse half-precision master weights before the first step, and stop on a NaN or inf loss
or weight before it is logged or saved.

A checkpoint stored in fp16 (common on the Hub) loads in fp16 under transformers 5 unless `dtype` is given, and
the Trainer then trains it in pure fp16: the gradients overflow, `grad_norm` is NaN from the first logged step,
the logged loss reads 0 (the Trainer's `logging_nan_inf_filter` hides NaN losses), and the run only dies at
evaluation. This callback fails before the first step instead, and at the first non-finite log, with the fix.
Checkpoints can be written more often than logs: the weights are checked before every save too, so no checkpoint
of a diverged run is written, and none of the finite ones is rotated out (`save_total_limit`) for one.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import TrainerCallback

from ._distributed import gather_object, local_part

HALF_DTYPES = (torch.float16, torch.bfloat16)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf loss, gradient norm or weight."""


def half_precision_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters stored in fp16 or bf16 (they would be the optimizer's master weights)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.dtype in HALF_DTYPES]


def check_master_weights(model: nn.Module) -> None:
    """Raises `ValueError` when trainable parameters are fp16/bf16: the optimizer would update them in half
    precision. Load the model with `dtype=torch.float32` and train with `--fp16`/`--bf16` (mixed precision: fp32
    master weights, half-precision compute) instead.

    Example:

    ```python
    >>> model = AutoModelForQuestionAnswering.from_pretrained(path, dtype=torch.float32)
    >>> check_master_weights(model)
    ```
    """
    names = half_precision_parameters(model)
    if names:
        dtype = dict(model.named_parameters())[names[0]].dtype
        raise ValueError(
            f"{len(names)} trainable parameter(s) are {str(dtype).removeprefix('torch.')} (first: {names[0]}): "
            "the optimizer would update them in half precision, which overflows (NaN gradients) or stalls. Load "
            "the model with dtype=torch.float32 (from_pretrained(..., dtype=torch.float32) or model.float()) and "
            "pass --fp16 or --bf16 for mixed precision with fp32 master weights."
        )


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the `tensors` that hold a NaN or inf on any process (each process passes its own local parts; under
    `torch.distributed` every process must call it: it gathers)."""
    found = []
    if tensors:
        # One device-to-host copy for all of them, not one per tensor.
        device = next(iter(tensors.values())).device
        finite = torch.stack([t.isfinite().all().to(device) for t in tensors.values()]).tolist()
        found = [name for name, ok in zip(tensors, finite) if not ok]
    on_any = {name for names in gather_object(found) for name in names}
    return [name for name in tensors if name in on_any] + sorted(on_any - set(tensors))


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN or inf values `tensor` holds (this process's part of it)."""
    return int((~torch.isfinite(local_part(tensor))).sum())


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that hold a NaN or inf, on any process (see `non_finite`)."""
    return non_finite({name: local_part(p) for name, p in model.named_parameters() if p.requires_grad})


def divergence_advice(args) -> str:
    """What to change when a run diverges, for its `TrainingArguments`."""
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    return (
        f"({precision}, learning_rate={args.learning_rate}). Lower --learning_rate (or raise --warmup_steps), keep "
        "--max_grad_norm at 1.0, prefer --bf16 to --fp16, and check that the model trains in fp32 master weights "
        "(load it with dtype=torch.float32) and that the labels are valid positions."
    )


class NumericsCallback(TrainerCallback):
    """Checks the numerics of a `transformers.Trainer` run.

    - When training starts, before any callback changes a weight (`SparsityCallback` runs these checks before it
      prunes, whatever the order of the callbacks): no trainable parameter may be fp16/bf16 (`check_master_weights`).
    - At every log: the loss and `grad_norm` must be finite; otherwise `NonFiniteLossError` says at which step
      and what to change. Set `TrainingArguments(logging_nan_inf_filter=False)` so the logged loss is the real
      one (the filter replaces NaN losses by the running mean); `grad_norm` is checked either way.
    - Before every checkpoint, log and evaluation, and when training ends: every trainable parameter must be finite.
      A non-finite loss makes the weights non-finite at its optimizer step (fp16 steps the gradient scaler skips
      leave them as they were), so no checkpoint of a diverged run is written, and the finite ones stay.

    Example:

    ```python
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[NumericsCallback()])
    ```
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.check_before_training(model)

    def check_before_training(self, model: nn.Module) -> None:
        """The checks made when training starts. `SparsityCallback` runs before the user's callbacks (so that its
        logs reach the reporting integrations) and prunes when training starts: it calls this before it changes any
        weight."""
        check_master_weights(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        bad = {k: logs[k] for k in ("loss", "grad_norm") if _not_finite(logs.get(k))}
        if bad:
            raise NonFiniteLossError(f"training diverged at step {state.global_step}: {bad} {divergence_advice(args)}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # The Trainer's DefaultFlowCallback, which runs before the user's callbacks, has decided what this step does.
        if model is not None and (control.should_save or control.should_log or control.should_evaluate):
            self._check_weights(args, state, model, control)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (control.should_save or control.should_log or control.should_evaluate):
            self._check_weights(args, state, model, control)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._check_weights(args, state, model, control)

    def _check_weights(self, args, state, model: nn.Module, control) -> None:
        names = non_finite_parameters(model)
        if not names:
            return
        checkpoint = f"checkpoint-{state.global_step}"
        stopped = f"stopped before {checkpoint} was written" if control.should_save else "stopped"
        raise NonFiniteLossError(
            f"training diverged by step {state.global_step}: {len(names)} trainable parameter(s) hold NaN or inf "
            f"(first: {names[0]}); {stopped}, so the checkpoints already in {args.output_dir} hold the last finite "
            f"weights (resume from the latest of them) {divergence_advice(args)}"
        )


def _not_finite(value) -> bool:
    if value is None:
        return False
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
