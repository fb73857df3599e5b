"""`SparsityConfig`: what to prune, how, and when."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

CRITERIA = ("magnitude", "wanda", "sparsegpt", "learned")
"""Pruning criteria known to the library (see `hf_sparse.criteria`). "wanda" and "sparsegpt" need calibration data."""


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Parses an "N:M" sparsity pattern into `(n, m)`: keep at most `n` of every `m` consecutive weights."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if match is None:
        raise ValueError(f"sparsity_pattern must look like 'N:M' (for example '2:4'); got {pattern!r}.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"sparsity_pattern {pattern!r} must satisfy 0 < N < M; got N={n}, M={m}.")
    return n, m


@dataclass
class SparsityConfig:
    """Configuration of N:M (default 2:4) semi-structured pruning.

    The same object drives `SparsityCallback`, `hf_sparse.prune_` and the recipe's command line
    (through `transformers.HfArgumentParser`).

    Example:

    ```python
    >>> from hf_sparse import SparsityConfig
    >>> config = SparsityConfig(sparsity_pattern="2:4", exclude_modules=[r".*\\.attention\\.output\\.dense"])
    >>> config.n, config.m
    (2, 4)
    ```
    """

    sparsity_pattern: str = field(
        default="2:4",
        metadata={
            "help": "N:M pattern: keep at most N of every M consecutive weights along the input dimension "
            "(the layout sparse tensor cores need). NVIDIA GPUs accelerate 2:4."
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to prune: full-match regular expressions or names (a name also matches as the last "
            "dotted components, e.g. 'query' matches 'bert.encoder.layer.0.attention.self.query'). Default: every "
            "nn.Linear inside the model's repeated transformer blocks; embeddings and task heads are never pruned "
            "by default."
        },
    )
    exclude_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules never to prune, matched like target_modules. Applied after target_modules."},
    )
    criterion: str = field(
        default="magnitude",
        metadata={
            "choices": list(CRITERIA),
            "help": f"Which weights to keep in each group. One of: {', '.join(CRITERIA)}. magnitude: the largest |w|. "
            "wanda: the largest |w| * ||x_j||_2 (input column norm over calibration tokens). sparsegpt: the mask and "
            "weight update of SparseGPT (second-order, the kept weights are changed to compensate). wanda and "
            "sparsegpt run the calibration data through the model block by block, so later blocks see the pruned "
            "earlier ones. learned: masks trained by hf_sparse.learn_masks (MaskLLM-style) and given to "
            "SparsityCallback(masks=...), which holds them; never computed here.",
        },
    )
    calibration_samples: int = field(
        default=128,
        metadata={
            "help": "Sequences of calibration data that wanda/sparsegpt run through the model (the first batches "
            "of the data given, or of the Trainer's training data)."
        },
    )
    calibration_batch_size: int = field(
        default=16,
        metadata={"help": "Batch size for calibration when the data is a dataset or a list of examples."},
    )
    sparsegpt_damping: float = field(
        default=0.01,
        metadata={
            "help": "SparseGPT: fraction of the mean diagonal of the Hessian X^T X added to its diagonal "
            "before inversion (higher is more stable, lower follows the data more closely)."
        },
    )
    sparsegpt_block_size: int = field(
        default=128,
        metadata={
            "help": "SparseGPT: columns processed together (lazy batch updates); a multiple of M. Changes speed, "
            "not the result beyond rounding."
        },
    )
    sequential_calibration: bool = field(
        default=False,
        metadata={
            "help": "wanda/sparsegpt: calibrate each block group by group (layers that take the same input: "
            "query/key/value, the attention output, the feed-forward input, the feed-forward output), each group "
            "after the earlier groups of its block are pruned, so every layer sees the inputs it will have in the "
            "pruned model. Costs one partial forward pass per group instead of per block."
        },
    )
    sparsegpt_update_bias: bool = field(
        default=False,
        metadata={
            "help": "sparsegpt: also update each layer's bias (the weight of a constant input, never pruned) to "
            "absorb the pruning error."
        },
    )
    sparsegpt_refit: bool = field(
        default=False,
        metadata={
            "help": "sparsegpt: after the masks are chosen, solve each row's kept weights exactly (the least-squares "
            "fit of the dense layer's output on the calibration inputs); SparseGPT's single pass only approximates "
            "it. Costs one batched solve per layer."
        },
    )
    sparsegpt_admm_steps: int = field(
        default=0,
        metadata={
            "help": "sparsegpt: if > 0, also search each layer's mask by that many ADMM steps (the mask forms "
            "gradually while the weights are fitted; 30 is a good start) and keep whichever mask, SparseGPT's or "
            "ADMM's, refits to the lower output error. Implies sparsegpt_refit."
        },
    )
    mask_start_step: int = field(
        default=0,
        metadata={
            "help": "Optimizer step at which masks are first computed. 0 prunes when training starts (as in "
            "PyTorch's 2:4 BERT tutorial); a later step trains densely until then."
        },
    )
    mask_update_every: int | None = field(
        default=None,
        metadata={
            "help": "Recompute the masks every this many optimizer steps after mask_start_step, scoring the kept "
            "weights as trained and the pruned ones at the values they had when pruned (as torch.ao's "
            "WeightNormSparsifier does), so pruned weights can come back. Costs one copy of the targeted weights. "
            "None keeps the first masks for the whole run."
        },
    )
    mask_freeze_step: int | None = field(
        default=None,
        metadata={"help": "Stop recomputing masks from this optimizer step on (with mask_update_every)."},
    )
    swap_at_end: bool = field(
        default=False,
        metadata={
            "help": "When training ends, swap the trained 2:4 layers for fast cuSPARSELt kernels "
            "(hf_sparse.swap_to_semi_structured_) and run the model's forward through CUDA graphs, so the "
            "Trainer's final evaluate()/predict() use the fast path. Needs fp16/bf16 weights on an NVIDIA GPU of "
            "compute capability >= 8.0; elsewhere it logs why and leaves the model as it is. Checkpoints saved "
            "afterwards are still ordinary dense ones."
        },
    )
    log_per_layer: bool = field(
        default=True,
        metadata={"help": "Add per-layer sparsity to the Trainer's logs whenever masks are (re)computed."},
    )

    def __post_init__(self):
        _check_types(self)
        self.n, self.m = parse_pattern(self.sparsity_pattern)
        self.sparsity_pattern = f"{self.n}:{self.m}"
        self.target_modules = _as_pattern_list("target_modules", self.target_modules)
        self.exclude_modules = _as_pattern_list("exclude_modules", self.exclude_modules)
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}; got {self.criterion!r}.")
        if self.criterion == "learned" and self.mask_update_every:
            raise ValueError(
                "criterion='learned' masks come from hf_sparse.learn_masks and cannot be recomputed during training; "
                f"leave mask_update_every at None (got {self.mask_update_every})."
            )
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be an integer >= 1; got {self.calibration_samples!r}.")
        if not isinstance(self.calibration_batch_size, int) or self.calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size must be an integer >= 1; got {self.calibration_batch_size!r}.")
        if not isinstance(self.sparsegpt_damping, (int, float)) or not 0 < self.sparsegpt_damping < 1:
            raise ValueError(
                f"sparsegpt_damping must be a number in (0, 1), e.g. 0.01; got {self.sparsegpt_damping!r}."
            )
        if (
            not isinstance(self.sparsegpt_block_size, int)
            or self.sparsegpt_block_size < self.m
            or self.sparsegpt_block_size % self.m
        ):
            raise ValueError(
                f"sparsegpt_block_size must be a positive multiple of M={self.m} (e.g. 128); "
                f"got {self.sparsegpt_block_size!r}."
            )
        if not isinstance(self.sparsegpt_admm_steps, int) or self.sparsegpt_admm_steps < 0:
            raise ValueError(
                f"sparsegpt_admm_steps must be an integer >= 0 (0: off, 30 is a good start); "
                f"got {self.sparsegpt_admm_steps!r}."
            )
        if not isinstance(self.mask_start_step, int) or self.mask_start_step < 0:
            raise ValueError(f"mask_start_step must be an integer >= 0; got {self.mask_start_step!r}.")
        if self.mask_update_every is not None and (
            not isinstance(self.mask_update_every, int) or self.mask_update_every < 1
        ):
            raise ValueError(f"mask_update_every must be None or an integer >= 1; got {self.mask_update_every!r}.")
        if self.mask_freeze_step is not None:
            if self.mask_update_every is None:
                raise ValueError(
                    f"mask_freeze_step={self.mask_freeze_step} has no effect without mask_update_every; "
                    "set mask_update_every (steps between mask updates) or drop mask_freeze_step."
                )
            if not isinstance(self.mask_freeze_step, int) or self.mask_freeze_step < self.mask_start_step:
                raise ValueError(
                    f"mask_freeze_step must be an integer >= mask_start_step ({self.mask_start_step}); "
                    f"got {self.mask_freeze_step!r}."
                )

    def mask_due(self, step: int) -> bool:
        """Whether masks are (re)computed once `step` optimizer steps have been taken."""
        if step == self.mask_start_step:
            return True
        if self.mask_update_every is None or step < self.mask_start_step:
            return False
        if self.mask_freeze_step is not None and step > self.mask_freeze_step:
            return False
        return (step - self.mask_start_step) % self.mask_update_every == 0

    def updates_after(self, step: int) -> bool:
        """Whether masks will be recomputed at some step after `step`."""
        if self.mask_update_every is None:
            return step < self.mask_start_step
        return self.mask_freeze_step is None or step + 1 <= self.mask_freeze_step

    def criterion_options(self) -> dict:
        """The settings beyond `criterion` that decided the masks (empty for magnitude), as checkpoints record them.

        Example:

        ```python
        >>> SparsityConfig(criterion="wanda").criterion_options()
        {'calibration_samples': 128, 'sequential_calibration': False}
        ```
        """
        if self.criterion == "magnitude":
            return {}
        names = ["calibration_samples", "sequential_calibration"]
        if self.criterion == "sparsegpt":
            names += ["sparsegpt_damping", "sparsegpt_update_bias", "sparsegpt_refit", "sparsegpt_admm_steps"]
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict:
        return asdict(self)


_INTEGER_FIELDS = (
    "calibration_samples",
    "calibration_batch_size",
    "sparsegpt_block_size",
    "sparsegpt_admm_steps",
    "mask_start_step",
    "mask_update_every",
    "mask_freeze_step",
)
_BOOL_FIELDS = (
    "sequential_calibration",
    "sparsegpt_update_bias",
    "sparsegpt_refit",
    "swap_at_end",
    "log_per_layer",
)


def _check_types(config: SparsityConfig) -> None:
    """Refuses values Python would silently take for another type: `True` for a step (it is an int equal to 1),
    a float step, or a string where a flag is expected."""
    for name in _INTEGER_FIELDS:
        value = getattr(config, name)
        if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__}).")
    if isinstance(config.sparsegpt_damping, bool):
        raise ValueError(f"sparsegpt_damping must be a number in (0, 1), e.g. 0.01; got {config.sparsegpt_damping!r}.")
    for name in _BOOL_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r} ({type(value).__name__}).")


def _as_pattern_list(name: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a string or a list of strings; got {value!r}.")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{name} entry {pattern!r} is not a valid regular expression: {err}.") from None
    return list(value)
