"""Learned N:M masks (MaskLLM-style, Fang et al. 2024): each group of M weights along the input dimension chooses
one of the C(M, N) patterns that keep N of them; the choice is a categorical distribution whose logits are trained
end to end with the `transformers.Trainer` through a Gumbel-softmax relaxation, while the weights stay frozen.

The user's model is never changed: `MaskLearner` wraps it and runs it with `torch.func.functional_call` on the
weights times the (soft) masks, so the model holds no parametrization or hook at any time. `learn_masks` trains the
logits and returns the hard masks (each group's most likely pattern), to hold through a recovery fine-tuning with
`SparsityCallback(SparsityConfig(criterion="learned"), masks=masks)` or to apply with `prune_`-style zeroing.

    masks = learn_masks(model, train_dataset, TrainingArguments("learn", max_steps=500, learning_rate=0.05))
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[SparsityCallback(SparsityConfig(criterion="learned"), masks=masks)])
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback

from .config import SparsityConfig
from .masks import nm_mask
from .selection import select_layers

logger = logging.getLogger(__name__)


def patterns(n: int = 2, m: int = 4) -> torch.Tensor:
    """The `(C(m, n), m)` float tensor of every way to keep `n` of `m` weights (1.0 = kept), in a fixed order."""
    rows = [[1.0 if i in kept else 0.0 for i in range(m)] for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


@dataclass
class MaskLearningConfig:
    """How the mask logits are initialised and relaxed (see `MaskLearner`)."""

    prior_strength: float = field(
        default=3.0,
        metadata={"help": "Initial logit of each group's prior pattern (the others start at 0): how strongly the "
                  "learning starts from the prior masks (magnitude by default, or the masks given)."},
    )  # fmt: skip
    temperature_start: float = field(
        default=4.0, metadata={"help": "Gumbel-softmax temperature at the first step (soft, exploring masks)."}
    )
    temperature_end: float = field(
        default=0.05, metadata={"help": "Temperature at the last step (near one-hot masks); annealed exponentially."}
    )
    gumbel_noise: float = field(
        default=1.0, metadata={"help": "Scale of the Gumbel noise added to the logits while training (0: none)."}
    )

    def __post_init__(self):
        if not 0 < self.temperature_end <= self.temperature_start:
            raise ValueError(
                f"MaskLearningConfig needs 0 < temperature_end <= temperature_start; got {self.temperature_end} and "
                f"{self.temperature_start}."
            )
        if self.gumbel_noise < 0:
            raise ValueError(f"MaskLearningConfig.gumbel_noise must be 0 or more; got {self.gumbel_noise}.")

    def temperature(self, progress: float) -> float:
        """The temperature at `progress` (0 at the first step, 1 at the last) of the learning."""
        progress = min(max(progress, 0.0), 1.0)
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** progress


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class MaskLearner(nn.Module):
    """`model` run on `weight x mask` for each of `layers`, the masks drawn from learned logits over the N:M patterns.

    In training mode each group's mask is a Gumbel-softmax sample: `softmax((logits + g) / temperature)` over the
    patterns (`g` Gumbel noise times `config.gumbel_noise`), weighted into one soft mask. In eval mode it is the most
    likely pattern, exactly N:M. Only the logits are parameters of the learner that require gradients: the model's own
    parameters are frozen while `learn_masks` trains it and given back as they were.

    Args:
        model: the model (its forward takes the batches, e.g. with `labels` for the language-model loss).
        layers: the layers to learn masks for, by name in `model` (`select_layers(model, config).targets`).
        prior: each layer's starting mask (boolean, N:M); its pattern starts with logit `config.prior_strength`.
        n, m: the pattern.
        config: initialisation and relaxation.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Linear],
        prior: dict[str, torch.Tensor],
        n: int = 2,
        m: int = 4,
        config: MaskLearningConfig | None = None,
    ):
        super().__init__()
        self.model, self.layers, self.n, self.m = model, dict(layers), n, m
        self.config = config or MaskLearningConfig()
        self.temperature = self.config.temperature_start
        self.register_buffer("patterns", patterns(n, m), persistent=False)
        self.logits = nn.ParameterDict()
        for name, layer in self.layers.items():
            if name not in prior:
                raise ValueError(f"MaskLearner: no prior mask for {name}; give one for every layer.")
            weight = layer.weight
            if weight.shape[1] % m:
                raise ValueError(f"MaskLearner: {name} has {weight.shape[1]} input features, not a multiple of {m}.")
            self.logits[_key(name)] = nn.Parameter(self._prior_logits(name, prior[name].to(weight.device)))

    def _prior_logits(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        groups = mask.reshape(mask.shape[0], -1, self.m).float()
        if not torch.all(groups.sum(-1) == self.n):
            raise ValueError(f"MaskLearner: the prior mask of {name} does not keep exactly {self.n} of every "
                             f"{self.m} weights; give an exact N:M mask (e.g. hf_sparse.masks.nm_mask).")  # fmt: skip
        chosen = (groups @ self.patterns.to(groups.device).t()) == self.n  # the group's pattern
        return chosen.float() * self.config.prior_strength

    def soft_mask(self, name: str) -> torch.Tensor:
        """The mask `layers[name]`'s weight is multiplied by: a relaxed sample in training, the hard mask in eval."""
        logits = self.logits[_key(name)]
        weights = self.layers[name].weight
        if self.training:
            noise = self.config.gumbel_noise
            if noise:
                uniform = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-10)
                logits = logits - noise * torch.log(-torch.log(uniform))
            mask = torch.softmax(logits / self.temperature, dim=-1) @ self.patterns.to(logits.dtype)
        else:
            mask = self.patterns[logits.argmax(-1)]  # the hard mask, as `hard_masks`
        return mask.reshape(weights.shape).to(weights.dtype)

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Each layer's boolean mask: every group's most likely pattern (exactly N:M). Raises RuntimeError, naming the
        layer, where its logits are not finite (a diverged learning would otherwise give every group pattern 0)."""
        broken = [name for name in self.layers if not torch.isfinite(self.logits[_key(name)]).all()]
        if broken:
            raise RuntimeError(f"MaskLearner: the mask logits of {broken[:3]} are not finite (the learning diverged); "
                               "lower the learning rate.")  # fmt: skip
        with torch.no_grad():
            return {
                name: (self.patterns[self.logits[_key(name)].argmax(-1)] > 0).reshape(layer.weight.shape)
                for name, layer in self.layers.items()
            }

    def forward(self, *args, **kwargs):
        weights = {f"{name}.weight": layer.weight * self.soft_mask(name) for name, layer in self.layers.items()}
        return torch.func.functional_call(self.model, weights, args, kwargs, strict=False, tie_weights=True)


class MaskLearningCallback(TrainerCallback):
    """Anneals a `MaskLearner`'s temperature over the run (exponentially, `MaskLearningConfig.temperature`) and logs
    it with the share of groups whose most likely pattern differs from the prior's (`mask_changed`)."""

    def __init__(self, learner: MaskLearner, prior: dict[str, torch.Tensor]):
        self.learner, self.prior = learner, prior

    def on_step_begin(self, args, state, control, **kwargs):
        progress = state.global_step / max(state.max_steps - 1, 1)
        self.learner.temperature = self.learner.config.temperature(progress)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["mask_temperature"] = round(self.learner.temperature, 5)
            logs["mask_changed"] = round(changed_share(self.learner.hard_masks(), self.prior, self.learner.m), 5)


def changed_share(masks: dict[str, torch.Tensor], prior: dict[str, torch.Tensor], m: int) -> float:
    """The share of the groups of `m` weights whose mask in `masks` differs from the prior's."""
    total, differ = 0, 0
    for name, mask in masks.items():
        groups = (mask != prior[name].to(mask.device)).reshape(mask.shape[0], -1, m)
        differ += int(groups.any(-1).sum())
        total += groups.shape[0] * groups.shape[1]
    return differ / max(total, 1)


def learn_masks(
    model: nn.Module,
    train_dataset,
    args,
    config: SparsityConfig | None = None,
    learning: MaskLearningConfig | None = None,
    prior: dict[str, torch.Tensor] | None = None,
    data_collator=None,
    compute_loss_func=None,
    callbacks: list | None = None,
) -> dict[str, torch.Tensor]:
    """Learns an N:M mask for every layer `config` selects by training the pattern logits of a `MaskLearner` with a
    `transformers.Trainer` (the model's weights frozen), and returns the hard masks by layer name. `model` comes back
    with its weights, `requires_grad` flags and train/eval mode as they were (on the Trainer's device, where the
    Trainer moved it): hold the masks through a recovery fine-tuning with
    `SparsityCallback(SparsityConfig(criterion="learned"), masks=masks)`, which applies them when training starts.

    Args:
        model: the dense model (a causal LM: the batches carry `labels` and the loss is its language-model loss,
            unless `compute_loss_func` says otherwise, e.g. `DistillationLoss(teacher, model)`).
        train_dataset: what the Trainer trains on (tokenized).
        args: the Trainer's `TrainingArguments` (`max_steps`, `learning_rate` of the logits, ...); used as given but
            with `remove_unused_columns=False` (the learner's forward takes the model's arguments).
        config: the pattern and the layers (`SparsityConfig.target_modules`); default `SparsityConfig()`.
        learning: initialisation and relaxation; default `MaskLearningConfig()`.
        prior: starting masks by layer name (e.g. from `prune_` with SparseGPT on a copy); default magnitude masks.
        data_collator, compute_loss_func, callbacks: passed to the Trainer.

    Example:

    ```python
    >>> from transformers import DataCollatorForLanguageModeling, TrainingArguments
    >>> masks = learn_masks(model, tokenized, TrainingArguments("learn", max_steps=500, learning_rate=0.05),
    ...                     data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    ```
    """
    from transformers import Trainer

    if getattr(args, "gradient_checkpointing", False):
        raise ValueError(
            "learn_masks: gradient_checkpointing=True would recompute the forward pass during the backward one, "
            "after the masked weights were swapped back out (torch.func.functional_call), and learn from the wrong "
            "weights; train without it (lower the batch size or the sequence length to fit)."
        )
    config = config or SparsityConfig()
    layers = select_layers(model, config).targets
    if not layers:
        raise ValueError("learn_masks: the SparsityConfig selects no layer of this model; set target_modules.")
    prior = prior or {name: nm_mask(layer.weight, config.n, config.m, name) for name, layer in layers.items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    learner = MaskLearner(model, layers, prior, config.n, config.m, learning)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        trainer = Trainer(
            model=learner,
            args=dataclasses.replace(args, remove_unused_columns=False),
            train_dataset=train_dataset,
            data_collator=data_collator,
            compute_loss_func=compute_loss_func,
            callbacks=[MaskLearningCallback(learner, prior), *(callbacks or [])],
        )  # fmt: skip
        trainer.train()
        masks = learner.hard_masks()
        logger.info("hf-sparse: learned %s masks for %d layer(s); %.2f%% of the groups differ from the prior.",
                    f"{config.n}:{config.m}", len(masks), 100 * changed_share(masks, prior, config.m))  # fmt: skip
        return masks
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
