"""The GEMMs a swap decides on: single `nn.Linear` layers, and sibling layers that read one input fused into one GEMM
(query/key/value), found in a model; and the feed-forward blocks whose GELU a layer can run in its epilogue.

`swap_to_semi_structured_` (in `swap.py`) asks the policy (`policy.py`) what each unit becomes; this module only
finds them and reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import SparsityConfig
from ..masks import is_nm
from ..selection import select_layers

DEFAULT_FUSE_GROUPS: tuple[tuple[str, ...], ...] = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
"""Sibling `nn.Linear` names fused into one GEMM by default (self-attention projections reading one input)."""
GELU_BLOCKS: tuple[tuple[str, str, str], ...] = (
    ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),  # BERT, RoBERTa, ELECTRA, ViT, ...
    ("lin1", "activation", "lin2"),  # DistilBERT's feed-forward block
)
"""Feed-forward blocks whose GELU a swap can run in the first layer's epilogue: (first layer, its activation, the
layer that reads the activation), as suffixes of module names under one block."""
GELU_TYPES = frozenset(
    {"GELU", "GELUActivation", "NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation",
     "AccurateGELUActivation"}
)  # fmt: skip
"""Activation module types that are GELU (exact or tanh-approximated: in an e4m3 output, whose rounding step is 6%,
the two differ by at most 5e-4)."""


def is_gelu(module: nn.Module) -> bool:
    """Whether `module` is a GELU activation (`GELU_TYPES`; not clipped or sigmoid-approximated variants)."""
    return type(module).__name__ in GELU_TYPES


def is_exact_gelu(module: nn.Module) -> bool:
    """Whether `module` is the exact (erf) GELU, the one the CUTLASS kernel computes in its epilogue (an fp16 output
    would show the tanh approximation's difference)."""
    return type(module).__name__ in ("GELU", "GELUActivation") and getattr(module, "approximate", "none") == "none"


@dataclass(frozen=True)
class GeluAfter:
    """The GELU after a layer that starts a `GELU_BLOCKS` block: its module's name, whether it is the exact (erf)
    GELU, and the name of the layer that reads it."""

    activation: str
    exact: bool
    next_layer: str


@dataclass
class Unit:
    """One GEMM to decide on: a single layer, or sibling layers fused along the output dimension; `gelu`: the GELU
    after a single layer that starts a feed-forward block."""

    parent: nn.Module
    parent_name: str
    attrs: list[str]
    layers: list[nn.Linear]
    gelu: GeluAfter | None = None

    @property
    def single(self) -> bool:
        return len(self.layers) == 1

    @property
    def name(self) -> str:
        base = f"{self.parent_name}." if self.parent_name else ""
        if len(self.attrs) == 1:
            return base + self.attrs[0]
        return base + "{" + ",".join(self.attrs) + "}"

    @property
    def members(self) -> list[str]:
        """The module names of its layers."""
        return [f"{self.parent_name}.{a}" if self.parent_name else a for a in self.attrs]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(m.out_features for m in self.layers), self.layers[0].in_features

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].weight.device

    @property
    def has_bias(self) -> bool:
        return self.layers[0].bias is not None

    @property
    def weight(self) -> torch.Tensor:
        if len(self.layers) == 1:
            return self.layers[0].weight.detach()
        return torch.cat([m.weight.detach() for m in self.layers], dim=0)

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        if len(self.layers) == 1:
            return self.layers[0].bias.detach()
        return torch.cat([m.bias.detach() for m in self.layers], dim=0)

    @property
    def dense_bytes(self) -> int:
        return sum(m.weight.numel() * m.weight.element_size() for m in self.layers)


def named_linears(
    model: nn.Module, layers: SparsityConfig | Iterable[str] | None
) -> tuple[dict[str, nn.Linear], bool]:
    """The candidate layers, and whether the user named them (then every one must be 2:4)."""
    modules = dict(model.named_modules())
    if layers is None:
        return {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}, False
    if isinstance(layers, SparsityConfig):
        if (layers.n, layers.m) != (2, 4):
            raise ValueError(
                f"semi-structured kernels run 2:4 sparsity only; the config's sparsity_pattern is "
                f"{layers.sparsity_pattern!r}."
            )
        return dict(select_layers(model, layers).targets), True
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing[:5]} in {type(model).__name__}.")
    not_linear = [n for n in names if not isinstance(modules[n], nn.Linear)]
    if not_linear:
        raise ValueError(
            f"modules {not_linear[:5]} are not nn.Linear ({type(modules[not_linear[0]]).__name__}); "
            "only nn.Linear layers can be swapped."
        )
    return {n: modules[n] for n in names}, True


def _split(name: str) -> tuple[str, str]:
    parent, _, attr = name.rpartition(".")
    return parent, attr


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the submodule `name` of `model`, and its attribute name there."""
    parent_name, attr = _split(name)
    return (model.get_submodule(parent_name) if parent_name else model), attr


def fusable(model: nn.Module, linears: dict[str, nn.Linear], fuse_groups: Sequence[Sequence[str]]) -> list[Unit]:
    """The one q/k/v grouping rule: siblings named by one of `fuse_groups` (all present, in that order) under the
    same parent, reading one input of the same size, dtype and device, all with or all without bias. Parents of
    cross-attention read two inputs (query from one, key/value from another) and are never fused."""
    modules = dict(model.named_modules())
    by_parent: dict[str, dict[str, nn.Linear]] = {}
    for name, layer in linears.items():
        parent_name, attr = _split(name)
        by_parent.setdefault(parent_name, {})[attr] = layer
    units = []
    for parent_name, attrs in by_parent.items():
        holder = modules[parent_name] if parent_name else model
        if "cross" in type(holder).__name__.lower():
            continue
        for group in fuse_groups:
            if not all(a in attrs for a in group):
                continue
            members = [attrs[a] for a in group]
            first = members[0]
            same = all(
                m.in_features == first.in_features
                and m.weight.dtype == first.weight.dtype
                and m.weight.device == first.weight.device
                and (m.bias is None) == (first.bias is None)
                for m in members
            )
            if same:
                units.append(Unit(holder, parent_name, list(group), members))
    return units


def find_units(
    model: nn.Module, linears: dict[str, nn.Linear], fuse_groups: Sequence[Sequence[str]]
) -> tuple[list[Unit], list[Unit]]:
    """Splits the candidate layers into the 2:4 units (fusing sibling groups) and the layers that are not 2:4, each in
    the order of `linears`."""
    modules = dict(model.named_modules())
    nm = {name: is_nm(layer.weight.detach(), 2, 4) for name, layer in linears.items()}
    units = fusable(model, {n: layer for n, layer in linears.items() if nm[n]}, fuse_groups)
    taken = {member for u in units for member in u.members}

    def single(name: str, layer: nn.Linear) -> Unit:
        parent_name, attr = _split(name)
        return Unit(modules[parent_name] if parent_name else model, parent_name, [attr], [layer], _gelu_after(name))

    def _gelu_after(name: str) -> GeluAfter | None:
        for activation, next_layer in block_names(name):
            module = modules.get(activation)
            if module is not None and is_gelu(module):
                return GeluAfter(activation, is_exact_gelu(module), next_layer)
        return None

    units += [single(n, layer) for n, layer in linears.items() if nm[n] and n not in taken]
    not_nm = [single(n, layer) for n, layer in linears.items() if not nm[n]]
    order = {name: i for i, name in enumerate(linears)}
    return sorted(units, key=lambda u: order[u.members[0]]), sorted(not_nm, key=lambda u: order[u.members[0]])


def block_names(name: str) -> list[tuple[str, str]]:
    """(the activation's name, the next layer's name) of each `GELU_BLOCKS` block that layer `name` starts."""
    return [
        (name[: len(name) - len(first)] + act, name[: len(name) - len(first)] + second)
        for first, act, second in GELU_BLOCKS
        if name == first or name.endswith("." + first)
    ]
