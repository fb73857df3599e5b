"""N:M mask math: computing masks from scores, and checking that weights are exactly N:M.

Groups are `m` consecutive elements along the last (input) dimension of a weight, the layout that sparse
tensor cores and cuSPARSELt expect for the left operand of `W @ x`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_groupable(tensor: torch.Tensor, m: int, name: str) -> None:
    if tensor.dim() < 1 or tensor.shape[-1] % m != 0:
        raise ValueError(
            f"{name}: the last (input) dimension of a tensor of shape {tuple(tensor.shape)} is not divisible by "
            f"M={m}; N:M groups run along the input dimension. Exclude this layer or pick another M."
        )


@torch.no_grad()
def nm_mask_from_scores(scores: torch.Tensor, n: int = 2, m: int = 4, name: str = "tensor") -> torch.Tensor:
    """Boolean mask keeping the `n` highest scores of every `m` consecutive elements along the last dimension.

    Ties are broken towards the lower index, so the result is deterministic on every device.

    Args:
        scores: importance of each weight (for magnitude pruning, `weight.abs()`), any float dtype and device.
        n: elements kept per group.
        m: group size.
        name: what to call the tensor in error messages (a layer name, usually).

    Example:

    ```python
    >>> nm_mask_from_scores(torch.tensor([[0.1, -3.0, 2.0, 0.5]]).abs())
    tensor([[False,  True,  True, False]])
    ```
    """
    _check_groupable(scores, m, name)
    if not torch.is_floating_point(scores):
        scores = scores.float()
    if torch.isnan(scores).any():
        raise ValueError(f"{name}: scores contain NaN; a mask cannot be computed from NaN weights or activations.")
    groups = scores.reshape(-1, m)
    # Stable sort: among equal scores the lower index comes first, whatever the device.
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask.reshape(scores.shape)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4, name: str = "weight") -> torch.Tensor:
    """Magnitude N:M mask of `weight`: keep the `n` largest |w| of every `m` consecutive weights along the input
    dimension. A weight that already is N:M gets the mask of its nonzeros (pruning it again changes nothing)."""
    return nm_mask_from_scores(weight.detach().abs(), n, m, name)


def group_counts(nonzero: torch.Tensor) -> torch.Tensor:
    """Nonzeros per group of a `[groups, m]` boolean tensor. Adding the m columns is several times faster on CPU
    than `sum(dim=1)`, whose reduction over 4 elements per row dominates checking and saving large models."""
    columns = nonzero.to(torch.uint8).unbind(dim=1)
    total = columns[0].clone()
    for column in columns[1:]:
        total += column
    return total


@torch.no_grad()
def groups_over(weight: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """How many groups of `m` consecutive weights (along the last dimension) hold more than `n` nonzeros; -1 when
    the last dimension does not split into groups of `m`. The one N:M check: `is_nm` and the checkpoint checks
    use it."""
    if weight.dim() < 1 or weight.shape[-1] % m != 0:
        return -1
    return int((group_counts(weight.reshape(-1, m) != 0) > n).sum())


def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of `m` consecutive weights along the last dimension holds at most `n` nonzeros."""
    return groups_over(weight, n, m) == 0


@dataclass
class LayerSparsity:
    """Sparsity of one layer's weight, as reported by `sparsity_report`."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    is_nm: bool

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@torch.no_grad()
def layer_sparsity(name: str, weight: torch.Tensor, n: int = 2, m: int = 4) -> LayerSparsity:
    return LayerSparsity(
        name=name,
        shape=tuple(weight.shape),
        numel=weight.numel(),
        zeros=int((weight == 0).sum()),
        is_nm=is_nm(weight, n, m),
    )


class SparsityReport(list):
    """What `sparsity_report` returns: a list of `LayerSparsity` rows (iterate, index and filter it as any list)
    that prints as a table, one line per layer and a total.

    Example:

    ```python
    >>> masks = prune_(model)   # BERT-base for question answering
    >>> print(sparsity_report(model))
    layer                                                  shape  sparsity  N:M
    bert.encoder.layer.0.attention.self.query            768x768    50.00%  yes
    ...
    qa_outputs                                             2x768     0.00%  NO
    total                                             84,936,192    50.00%  72/73
    ```
    """

    def __str__(self) -> str:
        return format_report(self)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython and Jupyter display it as the table too
        printer.text(str(self) if not cycle else "SparsityReport(...)")

    @property
    def sparsity(self) -> float:
        """Share of exact zeros over all the weights of the report's layers."""
        return total_sparsity(self)


def sparsity_report(model: torch.nn.Module, n: int = 2, m: int = 4, layers: list[str] | None = None) -> SparsityReport:
    """Per-layer N:M check of a model's `nn.Linear` weights (or of the named modules' weights).

    Args:
        model: any module.
        n, m: the pattern to check.
        layers: fully qualified module names to check; default: every `nn.Linear`.

    Returns:
        A `SparsityReport`: a list of `LayerSparsity` rows that prints as a table.

    Example:

    ```python
    >>> report = sparsity_report(model)
    >>> print(report)                             # the table
    >>> [r.name for r in report if not r.is_nm]   # layers that are not exactly 2:4
    ```
    """
    modules = dict(model.named_modules())
    if layers is None:
        layers = [name for name, module in modules.items() if isinstance(module, torch.nn.Linear)]
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"sparsity_report: no module named {missing[:5]} in {type(model).__name__}.")
    return SparsityReport(layer_sparsity(name, modules[name].weight, n, m) for name in layers)


def total_sparsity(rows: list[LayerSparsity]) -> float:
    """Share of exact zeros over all the weights of a `sparsity_report`."""
    return sum(r.zeros for r in rows) / max(sum(r.numel for r in rows), 1)


def format_report(rows: list[LayerSparsity]) -> str:
    """A plain-text table of a `sparsity_report`: shape, share of zeros and N:M check per layer, then the total
    (weights, share of zeros, layers that are N:M)."""
    if not rows:
        return "(no layers)"
    width = max(len(r.name) for r in rows)
    lines = [f"{'layer':<{width}}  {'shape':>14}  {'sparsity':>8}  N:M"]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<{width}}  {shape:>14}  {r.sparsity:8.2%}  {'yes' if r.is_nm else 'NO'}")
    total, nm = sum(r.numel for r in rows), sum(r.is_nm for r in rows)
    lines.append(f"{'total':<{width}}  {total:>14,}  {total_sparsity(rows):8.2%}  {nm}/{len(rows)}")
    return "\n".join(lines)
