"""Distillation from the dense model while a pruned model recovers, with the ordinary `transformers.Trainer`.

The Trainer calls `compute_loss_func(outputs, labels, num_items_in_batch)` after the student's forward pass, without
the inputs. `DistillationLoss` therefore keeps a forward pre-hook on the student that remembers the keyword
arguments of its latest call, and runs the teacher on exactly those inputs when the Trainer asks for the loss.
The teacher is an in-memory copy of the dense model taken before pruning (`copy.deepcopy(model)`); nothing is
written to disk. When the Trainer shards the student with FSDP2, the teacher is sharded the same way on its first
use (`shard_teacher`), so each rank holds 1/world of it rather than a full replica.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ._distributed import is_sharded, shard_like_

logger = logging.getLogger(__name__)

_NOT_FOR_TEACHER = {"labels", "label", "label_ids", "start_positions", "end_positions", "num_items_in_batch"}
HIDDEN_LOSSES = ("mse", "cosine", "normalized_mse", "similarity")
HIDDEN_LAYERS = ("last", "all", "mean_pooled")


class _NoLabelsWarning(logging.Filter):
    """Drops the Trainer's per-step warning that `compute_loss_func` gets `labels=None`: distillation needs no
    labels, and question-answering models keep theirs (start/end positions) in the inputs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`compute_loss_func` is defined but `labels=None`" not in record.getMessage()


_NO_LABELS_WARNING = _NoLabelsWarning()


def _get(outputs, key):
    if isinstance(outputs, dict):  # ModelOutput is a dict
        return outputs.get(key)
    return getattr(outputs, key, None)


def _logit_keys(outputs) -> list[str]:
    keys = outputs.keys() if isinstance(outputs, dict) else []
    return [k for k in keys if k.endswith("logits") and isinstance(outputs[k], torch.Tensor)]


def _usable(mask: torch.Tensor | None, values: torch.Tensor) -> bool:
    return mask is not None and mask.shape == values.shape[: mask.dim()]


def _teacher_variance(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Variance of the teacher's hidden-state values `(B, T, H)` over the counted positions: the scale that
    `normalized_mse` divides each layer's squared error by."""
    values = t[mask.to(t.device).bool()] if _usable(mask, t) else t
    return values.var(unbiased=False).clamp(min=torch.finfo(values.dtype).tiny)


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` (or the model a peft wrapper holds) predicts the next token, as the Trainer decides when it
    shifts labels: its class is one of transformers' causal LMs (GPT2LMHeadModel too, not only `*ForCausalLM`), or
    its config says it is a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    inner = getattr(getattr(model, "base_model", None), "model", None)  # peft: PeftModel.base_model.model
    names = {type(m).__name__ for m in (model, inner) if isinstance(m, nn.Module)}
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    config = getattr(model, "config", None)
    return (
        bool(names & causal) or any(n.endswith("ForCausalLM") for n in names) or bool(getattr(config, "is_decoder", 0))
    )


class DistillationLoss:
    """Loss that pulls a (pruned) student towards its dense teacher; pass it as `Trainer(compute_loss_func=...)`.

    The loss is a weighted sum of
    - `logits_weight` x the KL divergence from the teacher's to the student's softened distributions
      (temperature `temperature`, scaled by T^2), for every output whose name ends in "logits" (`logits`, or
      `start_logits` and `end_logits` for question answering), averaged over the counted positions (below);
    - `hidden_weight` x the distance between hidden states (`hidden_loss`: "mse" or "cosine" = 1 - cosine per
      token; for sentence embeddings also "similarity" = the cosine distance plus the mean squared difference of
      the in-batch cosine-similarity matrices, as in similarity-preserving distillation, Tung & Mori 2019; or
      "normalized_mse" = each layer's mean squared error divided by the variance of the teacher's hidden states of
      that layer, the SquareHead loss of Kurtic et al. 2023 that Neural Magic's Sparse-Llama recipe distills
      with), of the last layer (`hidden_layers="last"`, the `last_hidden_state` of a base model) or of every
      layer (`"all"`, which makes both models return `hidden_states`), averaged over the layers and the counted
      positions; or between the sentence embeddings (`"mean_pooled"`: the mean of the last hidden states over the
      attention mask, as sentence-transformers pools), averaged over sequences;
    - `task_weight` x the task loss: the model's own `loss` when it computed one (e.g. from `start_positions`),
      else cross-entropy of `logits` against the `labels` the Trainer passes (shifted for causal LMs).

    The counted positions: for a causal LM given `labels` (as the Trainer passes them for language modeling, SFT and
    `hf_sparse.lm.teacher_generations`), the positions that predict a labelled token (`labels[p + 1] != -100`), so
    that padding, prompt tokens and the boundaries of packed sequences are left out as the language-model loss
    leaves them out; for an encoder-decoder given `labels`, the decoder positions whose label is not -100; otherwise
    the non-padding positions of the attention mask (all positions without one).

    The Trainer does not divide a `compute_loss_func` loss by the gradient accumulation steps (it expects it
    normalized over the accumulated batch). Where it passes `num_items_in_batch` (the labelled tokens of the whole
    accumulated batch, when the batches carry `labels`), the logit and hidden-state terms of causal LMs and
    encoder-decoders are sums over the counted positions divided by it, exactly as the language-model loss is;
    otherwise they are means divided by `gradient_accumulation_steps`: pass
    `gradient_accumulation_steps=args.gradient_accumulation_steps`.

    Args:
        teacher: the dense model (e.g. `copy.deepcopy(model)` before pruning); put in eval mode, frozen, and moved
            to the student's device on first use.
        student: the model the Trainer trains (the module itself, not a DDP wrapper).
        temperature: softmax temperature of the logit distillation.
        logits_weight, hidden_weight, task_weight: weights of the three terms (at least one must be > 0).
        hidden_loss: "mse", "cosine", "normalized_mse" or (sentence embeddings only) "similarity".
        hidden_layers: "last", "all" or "mean_pooled".
        gradient_accumulation_steps: the Trainer's `gradient_accumulation_steps`.
        shard_teacher: when the student turns out FSDP2-sharded (as `accelerate launch` with `fsdp_version: 2`
            leaves it), shard the teacher's blocks the same way on first use, so each rank holds 1/world of it and
            gathers one block at a time; False keeps a full replica on every rank.

    Example:

    ```python
    >>> import copy
    >>> from transformers import Trainer
    >>> from hf_sparse import DistillationLoss, SparsityCallback
    >>> teacher = copy.deepcopy(model)          # dense; SparsityCallback prunes `model` when training starts
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[SparsityCallback()],
    ...                   compute_loss_func=DistillationLoss(teacher, model, task_weight=1.0))
    ```
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        temperature: float = 2.0,
        logits_weight: float = 1.0,
        hidden_weight: float = 0.0,
        task_weight: float = 0.0,
        hidden_loss: str = "mse",
        hidden_layers: str = "last",
        gradient_accumulation_steps: int = 1,
        shard_teacher: bool = True,
    ):
        if teacher is student:
            raise ValueError("teacher and student are the same module; pass a dense copy (copy.deepcopy(model)).")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}.")
        for name, value in (("logits_weight", logits_weight), ("hidden_weight", hidden_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0; got {value!r}.")
        if task_weight < 0 or logits_weight + hidden_weight + task_weight <= 0:
            raise ValueError(
                f"weights must be >= 0 and not all zero; got logits_weight={logits_weight}, "
                f"hidden_weight={hidden_weight}, task_weight={task_weight}."
            )
        if hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {list(HIDDEN_LOSSES)}; got {hidden_loss!r}.")
        if hidden_layers not in HIDDEN_LAYERS:
            raise ValueError(f"hidden_layers must be one of {list(HIDDEN_LAYERS)}; got {hidden_layers!r}.")
        if hidden_loss == "similarity" and hidden_layers != "mean_pooled":
            raise ValueError(
                "hidden_loss='similarity' compares sentence embeddings across a batch: use it with "
                f"hidden_layers='mean_pooled' (got {hidden_layers!r})."
            )
        if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be an integer >= 1; got {gradient_accumulation_steps}."
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.temperature = float(temperature)
        self.logits_weight = float(logits_weight)
        self.hidden_weight = float(hidden_weight)
        self.task_weight = float(task_weight)
        self.hidden_loss = hidden_loss
        self.hidden_layers = hidden_layers
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.shard_teacher = shard_teacher
        self._teacher_sharded: bool | None = None  # decided on first use, once the Trainer has wrapped
        self._causal = _is_causal_lm(student)
        self._seq2seq = bool(getattr(getattr(student, "config", None), "is_encoder_decoder", False))
        self._inputs: tuple[tuple, dict] | None = None
        self._handle = student.register_forward_pre_hook(self._remember, with_kwargs=True)
        trainer_logger = logging.getLogger("transformers.trainer")
        if _NO_LABELS_WARNING not in trainer_logger.filters:
            trainer_logger.addFilter(_NO_LABELS_WARNING)

    def _remember(self, module, args, kwargs):
        if self.hidden_weight > 0 and self.hidden_layers == "all":
            kwargs = {**kwargs, "output_hidden_states": True}
        self._inputs = (args, kwargs)
        return args, kwargs

    def remove(self) -> None:
        """Removes the hook from the student (the loss cannot be used afterwards)."""
        self._handle.remove()

    @torch.no_grad()
    def teacher_outputs(self, args: tuple, kwargs: dict):
        """The teacher's outputs on the student's inputs."""
        device = next((v.device for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if self._teacher_sharded is None:
            if self.shard_teacher and shard_like_(self.teacher, self.student):
                logger.info("hf-sparse: distillation teacher sharded with FSDP2 like the student.")
            self._teacher_sharded = any(is_sharded(p) for p in self.teacher.parameters())
        if device is not None and not self._teacher_sharded and next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_TEACHER}
        return self.teacher(*args, **kwargs)

    def __call__(self, outputs, labels=None, num_items_in_batch=None) -> torch.Tensor:
        if self._inputs is None:
            raise RuntimeError(
                "DistillationLoss was called before the student ran: it must be given the student module the "
                "Trainer trains (DistillationLoss(teacher, student=model))."
            )
        args, kwargs = self._inputs
        self._inputs = None
        teacher = self.teacher_outputs(args, kwargs)
        mask, denominator = self._counted(kwargs, labels, num_items_in_batch)
        terms = []
        if self.logits_weight > 0:
            keys = _logit_keys(outputs)
            if not keys:
                if self.hidden_weight == 0 and self.task_weight == 0:
                    raise ValueError(
                        f"the student's outputs have no logits (keys: {list(outputs.keys())}); distill hidden "
                        "states instead (hidden_weight > 0, logits_weight=0)."
                    )
            else:
                kl = sum(self._kl(outputs[k], teacher[k], mask, denominator) for k in keys) / len(keys)
                terms.append(self.logits_weight * kl)
        if self.hidden_weight > 0:
            terms.append(self.hidden_weight * self._hidden(outputs, teacher, mask, denominator))
        loss = sum(terms) if terms else None
        if self.task_weight > 0:
            task = self._task(outputs, labels, num_items_in_batch, kwargs)
            loss = self.task_weight * task if loss is None else loss + self.task_weight * task
        return loss

    def _counted(self, kwargs: dict, labels, num_items_in_batch) -> tuple[torch.Tensor | None, object]:
        """The positions `(B, T)` that the logit and hidden-state terms count, and what their sums are divided by
        (None: the mean over those positions, divided by the accumulation steps). See the class docstring."""
        if labels is not None and (self._causal or self._seq2seq) and labels.dim() == 2:
            mask = labels != -100
            if self._causal:  # position p predicts token p + 1
                mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
            return mask, num_items_in_batch
        return kwargs.get("attention_mask"), None

    def _reduce(self, values: torch.Tensor, mask, denominator) -> torch.Tensor:
        """Per-position values `(B, T)` reduced over the counted positions (see `_counted`)."""
        if not _usable(mask, values):
            return values.mean() / self.gradient_accumulation_steps
        mask = mask.to(values.device, values.dtype)
        if denominator is None:
            return (values * mask).sum() / mask.sum().clamp(min=1.0) / self.gradient_accumulation_steps
        return (values * mask).sum() / denominator

    def _kl(self, student: torch.Tensor, teacher: torch.Tensor, mask, denominator) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(student.float() / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher.float() / t, dim=-1)
        per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
        return self._reduce(per_position, mask, denominator) * t * t

    def _hidden(self, outputs, teacher, mask, denominator) -> torch.Tensor:
        if self.hidden_layers == "mean_pooled":
            s, t = _get(outputs, "last_hidden_state"), _get(teacher, "last_hidden_state")
            if s is None or t is None:
                raise ValueError(
                    "hidden_layers='mean_pooled' needs `last_hidden_state` in the outputs (a base model)."
                )
            weights = torch.ones(s.shape[:2], device=s.device) if mask is None else mask.to(s.device).float()
            weights = (weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)).unsqueeze(-1)
            s, t = (s.float() * weights).sum(dim=1), (t.float() * weights).sum(dim=1)
            return self._pooled(s, t) / self.gradient_accumulation_steps
        if self.hidden_layers == "all":
            pairs = list(zip(_get(outputs, "hidden_states") or (), _get(teacher, "hidden_states") or ()))
        else:
            s = _get(outputs, "last_hidden_state")
            if s is None and _get(outputs, "hidden_states") is not None:
                s, t = outputs["hidden_states"][-1], teacher["hidden_states"][-1]
            else:
                t = _get(teacher, "last_hidden_state")
            pairs = [(s, t)] if s is not None and t is not None else []
        if not pairs:
            raise ValueError(
                "hidden-state distillation needs `last_hidden_state` (a base model) or `hidden_states` in the "
                "outputs; use hidden_layers='all' for task models, which then return hidden_states."
            )
        total = 0.0
        for s, t in pairs:
            s, t = s.float(), t.float()
            if self.hidden_loss == "cosine":
                per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
            else:
                per_token = (s - t).pow(2).mean(dim=-1)
                if self.hidden_loss == "normalized_mse":
                    per_token = per_token / _teacher_variance(t, mask)
            total = total + self._reduce(per_token, mask, denominator)
        return total / len(pairs)

    def _pooled(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The distance between sentence embeddings `(B, H)`."""
        if self.hidden_loss == "mse":
            return (s - t).pow(2).mean()
        if self.hidden_loss == "normalized_mse":
            return (s - t).pow(2).mean() / _teacher_variance(t, None)
        cosine = (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
        if self.hidden_loss == "cosine":
            return cosine
        # "similarity": also match the in-batch cosine-similarity matrix, the structure retrieval ranks by
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        return cosine + (s @ s.T - t @ t.T).pow(2).mean()

    def _task(self, outputs, labels, num_items_in_batch, inputs=None) -> torch.Tensor:
        loss = _get(outputs, "loss")
        if loss is not None:
            if _only_ignored_answers(outputs, inputs or {}):
                # every row is a distillation-only input (answer positions the QA head ignores): its loss is a mean
                # over nothing (NaN); the task has nothing to say about this batch
                return torch.zeros((), device=loss.device, dtype=loss.dtype)
            return loss / self.gradient_accumulation_steps
        logits = _get(outputs, "logits")
        if labels is None or logits is None:
            raise ValueError(
                "task_weight > 0 but the model returned no loss and there are no labels with logits; set "
                "task_weight=0 or give the Trainer labelled data."
            )
        if self._causal:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        flat = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), reduction="sum"
        )
        if num_items_in_batch is not None:  # already counted over the whole accumulated batch
            return flat / num_items_in_batch
        count = (labels != -100).sum().clamp(min=1)
        return flat / count / self.gradient_accumulation_steps


def _only_ignored_answers(outputs, inputs) -> bool:
    """Whether every answer position of a question-answering batch is one the QA head's loss ignores (at or past the
    sequence length: `hf_sparse.squad.distillation_features`)."""
    start, logits = inputs.get("start_positions"), _get(outputs, "start_logits")
    if start is None or logits is None:
        return False
    return bool((start >= logits.shape[-1]).all())
