"""`MultiLayoutLinear`: a 2:4 layer that holds its weight in two kernels' compressed layouts (a decode kernel's and a
prefill kernel's, say) and runs each token-count bucket on the kernel the policy chose for it.

`swap_to_semi_structured_` installs it where the policy decides a layer holds a second compressed layout (`Holds.TWO`
in `policy.py`: the memory rule left room for it, and it runs some tuned token counts faster than the layer's kernel
or a dense copy would). Each layout lives in the layer its own kernel builds (`Kernel.layer`), kept here as a child
module that emits no state of its own; this module only routes a call to one of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .kernels.base import DENSE_NAME, Kernel, LayerSpec, Run, token_bucket
from .layers import SwappedLinear, copy_bias, nearest_bucket


class MultiLayoutLinear(SwappedLinear):
    """`x @ W.T + b` for a 2:4 weight held in several kernels' layouts, each call run by the kernel of its token-count
    bucket.

    Built by `swap_to_semi_structured_`; `state_dict()` emits the dense `weight` (exactly decompressed from the first
    layout) and `bias`, so checkpoints stay ordinary; `load_state_dict` recompresses every layout.

    Args:
        kernels: the kernels whose layouts the layer holds, the layer's own kernel first (it runs the buckets that
            name no held kernel).
        spec: what the layer holds and runs (`spec.runs`: bucket -> the `Run` of one of `kernels`).
    """

    def __init__(self, kernels: Sequence[Kernel], spec: LayerSpec):
        super().__init__(spec.weight, spec.bias, name=spec.name, emits_state=spec.emits_state)
        self.runs: dict[int, Run] = dict(spec.runs)
        self.first = kernels[0].name
        self.layouts = nn.ModuleDict()
        for kernel in kernels:
            own = {b: r for b, r in spec.runs.items() if r.kernel == kernel.name}
            layer = kernel.layer(dataclasses.replace(spec, runs=own, keep_dense=False, emits_state=False))
            if layer is None:
                raise ValueError(f"{self.label}: the {kernel.label} built no layer to hold its layout.")
            layer.emits_state = False  # this layer emits the weight once, for every layout
            self.layouts[kernel.name] = layer

    @property
    def dtype(self) -> torch.dtype:
        return self.layouts[self.first].dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, decompressed from the first layout on each access (use it sparingly)."""
        return self.layouts[self.first].weight

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layouts.values())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layouts={'+'.join(self.layouts)}"
        )

    def cast_problem(self, fn) -> str | None:
        """Why `model._apply(fn)` would be refused by one of the layouts, or None (see `swap.guard_casts`)."""
        return next((p for p in (layer.cast_problem(fn) for layer in self.layouts.values()) if p), None)

    def layer_for(self, tokens: int) -> nn.Module:
        """The layout's layer that runs a call of `tokens` rows: its bucket's kernel, else the nearest tuned bucket's,
        else the layer's own kernel."""
        bucket = token_bucket(tokens)
        run = self.runs.get(bucket) or (self.runs[nearest_bucket(self.runs, bucket)] if self.runs else None)
        name = self.first if run is None or run.kernel == DENSE_NAME else run.kernel
        return self.layouts[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_dtype(x)
        return self.layer_for(x.numel() // self.in_features if x.numel() else 0)(x)

    def set_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """Replaces the weight (or the rows `rows` of it) with a dense 2:4 tensor, recompressing every layout. All or
        nothing: where a layout refuses or fails (a shape or 2:4 check, a device error), the layouts changed before it
        are put back to the weight and bias they held, and the error is raised."""
        with torch.no_grad():
            previous = self.weight.detach().clone()
            previous_bias = None if self.bias is None else self.bias.detach().clone()
        changed = []
        try:
            for layer in self.layouts.values():
                changed.append(layer)
                layer.set_weight_(weight, bias, rows)
        except Exception:
            for layer in changed:
                layer.set_weight_(previous, previous_bias)
            raise
        copy_bias(self, bias, rows)
