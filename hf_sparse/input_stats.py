"""Running statistics of a linear layer's inputs over calibration tokens: what Wanda (squared norms) and SparseGPT
(the Hessian `sum x x^T`, and with dense targets `sum x_d x^T`) are computed from (`hf_sparse.calibration`)."""

from __future__ import annotations

import torch


class InputStats:
    """Running statistics of a linear layer's inputs over the calibration tokens (padding excluded).

    Wanda needs `sq_norms`, the sum of squared inputs per feature. SparseGPT needs `hessian`, the sum of `x x^T`;
    with `constant_input`, over the inputs with a 1 appended (the bias is the weight of that input). With `paired`,
    also `cross`, the sum of `x_d x^T` of the dense model's inputs `x_d` against the pruned model's `x` (`add_pair`).
    """

    def __init__(
        self, in_features: int, hessian: bool, device: torch.device, constant_input: bool = False, paired: bool = False
    ):
        self.tokens = 0
        self.unmatched = False
        self.constant_input = constant_input and hessian
        size = in_features + self.constant_input
        self.sq_norms = None if hessian else torch.zeros(in_features, device=device, dtype=torch.float32)
        self.hessian = torch.zeros(size, size, device=device, dtype=torch.float32) if hessian else None
        self.cross = torch.zeros(size, size, device=device, dtype=torch.float32) if hessian and paired else None
        self.device = device

    def _tokens(self, x: torch.Tensor, token_masks: list[torch.Tensor]) -> torch.Tensor:
        x = x.detach().reshape(-1, x.shape[-1])
        # the stream (encoder or decoder) whose number of tokens the inputs have
        token_mask = next((mask for mask in token_masks if mask.numel() == x.shape[0]), None)
        if token_mask is not None:
            x = x[token_mask.reshape(-1).to(x.device)]
        elif any(not bool(mask.all()) for mask in token_masks):
            self.unmatched = True  # the batch has padding, but these inputs cannot be told where it is
        x = x.to(self.device, torch.float32)
        if self.constant_input:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        return x

    def add(self, x: torch.Tensor, token_masks: list[torch.Tensor]) -> None:
        x = self._tokens(x, token_masks)
        self.tokens += x.shape[0]
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)
        else:
            self.sq_norms += (x * x).sum(dim=0)

    def add_pair(self, x: torch.Tensor, dense_x: torch.Tensor, token_masks: list[torch.Tensor]) -> None:
        """Adds the pruned model's inputs `x` and the dense model's `dense_x` at the same tokens."""
        x, dense_x = self._tokens(x, token_masks), self._tokens(dense_x, token_masks)
        self.tokens += x.shape[0]
        self.hessian.addmm_(x.T, x)
        self.cross.addmm_(dense_x.T, x)

    def finite(self) -> bool:
        """Whether the statistics are finite: a NaN or inf input (at a real token), or inputs whose squares overflow
        float32, make the sums of squares (Wanda's norms, the Hessian's diagonal) non-finite."""
        squares = self.sq_norms if self.hessian is None else torch.diagonal(self.hessian)
        return bool(torch.isfinite(squares).all()) and (self.cross is None or bool(torch.isfinite(self.cross).all()))


def non_finite_message(name: str, index: int, stat: InputStats, calls: list, masks: list) -> str:
    """Why the statistics of layer `name` stopped being finite on calibration batch `index`."""
    inputs = [stat._tokens(x, masks) for x in calls]
    where = f"the calibration inputs of {name} on calibration batch {index}"
    if all(bool(torch.isfinite(x).all()) for x in inputs):
        largest = max(float(x.abs().max()) for x in inputs if x.numel())
        return (
            f"{where} are so large (up to {largest:.3g}) that their squares overflow float32: scale the data, or "
            "check the model's weights and normalisation layers before this layer. Nothing was pruned."
        )
    return (
        f"{where} hold NaN or inf values, the first layer (in forward order) whose inputs do; the calibration data is "
        f"finite, so the model produced them ({calls[0].dtype} activations): non-finite weights before this layer, or "
        "an overflow of its dtype (run calibration in float32). Nothing was pruned."
    )
