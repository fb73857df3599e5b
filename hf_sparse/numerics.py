"""`NumericsCallback`: refuse half-precision master weights before the first step, and stop on a NaN or inf loss.

A checkpoint stored in fp16 (common on the Hub) loads in fp16 under transformers 5 unless `dtype` is given, and
the Trainer then trains it in pure fp16: the gradients overflow, `grad_norm` is NaN from the first logged step,
the logged loss reads 0 (the Trainer's `logging_nan_inf_filter` hides NaN losses), and the run only dies at
evaluation. This callback fails before the first step instead, and at the first non-finite log, with the fix.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import TrainerCallback

HALF_DTYPES = (torch.float16, torch.bfloat16)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf loss or gradient norm."""


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


class NumericsCallback(TrainerCallback):
    """Checks the numerics of a `transformers.Trainer` run.

    - When training starts, before any callback changes a weight (`SparsityCallback` runs these checks before it
      prunes, whatever the order of the callbacks): no trainable parameter may be fp16/bf16 (`check_master_weights`).
    - At every log: the loss and `grad_norm` must be finite; otherwise `NonFiniteLossError` says at which step
      and what to change. Set `TrainingArguments(logging_nan_inf_filter=False)` so the logged loss is the real
      one (the filter replaces NaN losses by the running mean); `grad_norm` is checked either way.

    Example:

    ```python
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[NumericsCallback()])
    ```
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.check_before_training(model)

    def check_before_training(self, model: nn.Module) -> None:
        """The checks made when training starts. `SparsityCallback` runs first (so that its logs reach the reporting
        integrations) and prunes when training starts: it calls this before it changes any weight."""
        check_master_weights(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        bad = {k: logs[k] for k in ("loss", "grad_norm") if _not_finite(logs.get(k))}
        if not bad:
            return
        precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
        raise NonFiniteLossError(
            f"training diverged at step {state.global_step}: {bad} ({precision}, learning_rate="
            f"{args.learning_rate}). Lower --learning_rate (or raise --warmup_steps), keep --max_grad_norm at 1.0, "
            "prefer --bf16 to --fp16, and check that the model trains in fp32 master weights (load it with "
            "dtype=torch.float32) and that the labels are valid positions."
        )


def _not_finite(value) -> bool:
    if value is None:
        return False
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
