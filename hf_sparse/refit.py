"""Fitting a layer's kept weights under a fixed N:M mask, and searching a mask by fitting: the least-squares refit
of SparseGPT's weights (`refit_kept`) and the ADMM mask search (`admm_mask`, Boža 2024), both on the calibration
Hessian. `hf_sparse.criteria.sparsegpt_prune_` runs them with `refit=True` or `admm_steps > 0`."""

from __future__ import annotations

import logging

import torch

from .masks import nm_mask_from_scores

logger = logging.getLogger(__name__)


def output_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """`sum ||(W_dense - W_pruned) x||^2` over the calibration inputs whose `x x^T` sum to `hessian`."""
    diff = dense - pruned
    return torch.einsum("ij,jk,ik->", diff, hessian, diff).item()


def check_refit_method(method: str, name: str) -> None:
    if method not in ("auto", "cholesky", "cg"):
        raise ValueError(f"{name}: refit method must be 'auto', 'cholesky' or 'cg'; got {method!r}.")


CG_MIN_KEPT = 1024
"""On a GPU, `refit_kept` solves rows that keep at least this many weights by conjugate gradients: one batched
Cholesky factorisation per row costs `k^3 / 3` and runs far below the GPU's matmul speed (a 4096x14336 layer: 38.6 s
on an H100), while each conjugate-gradient step is one `rows x size x size` matmul for all rows at once."""


@torch.no_grad()
def refit_kept(
    dense: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    damping: float = 0.01,
    name: str = "weight",
    start: torch.Tensor | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """The exact least-squares weights under a mask: each row's kept weights that best reproduce the dense row.

    Row `r` with kept inputs `S` solves `(H_SS + λI) w_S = (H w_r + λ w_r)_S`, the minimum of
    `||X (w_r - w)||^2 + λ||w - w_r||_S^2` over the weights that are zero outside `S` (`H = X^T X`, λ = `damping`
    times the mean diagonal). The damping pulls the kept weights toward their dense values, not toward zero: where
    the calibration inputs leave directions unseen (fewer tokens than inputs), those keep the dense weights, as
    magnitude pruning does, instead of losing them.

    Two solvers give the same weights: "cholesky" gathers `H_SS` per row and factorises it (rows in batches, at most
    ~256 MiB of gathered matrices at a time); "cg" runs Jacobi-preconditioned conjugate gradients on all rows at once
    until every row's preconditioned residual is 1e-4 of its right-hand side's (on the real Hessians of a fine-tuned
    MiniLM the output error then matches Cholesky's to about six digits). "auto" takes "cg" on a GPU for rows of
    `CG_MIN_KEPT` or more kept weights, else "cholesky".

    Args:
        dense: `(rows, size)` float32 dense weights (with a bias column last, when the bias is fitted too).
        hessian: `(size, size)` float32 `X^T X`, no zero diagonal entries.
        keep: `(rows, cols)` boolean mask with the same count per row; columns `cols..size` (a bias) always kept.
        damping: as `sparsegpt_damping`.
        name: the layer, for error messages.
        start: "cg": the weights to start from (e.g. SparseGPT's); default `dense` under the mask.
        method: "auto", "cholesky" or "cg".

    Returns:
        The `(rows, size)` refit weights, zero outside the mask.
    """
    rows, size = dense.shape
    kept = torch.cat([keep, keep.new_ones(rows, size - keep.shape[1])], dim=1)
    per_row = kept.sum(dim=1)
    if (per_row != per_row[0]).any():
        raise ValueError(f"{name}: every row of the mask must keep the same number of weights to refit them.")
    check_refit_method(method, name)
    k = int(per_row[0])
    if method == "auto":
        method = "cg" if hessian.device.type == "cuda" and k >= CG_MIN_KEPT else "cholesky"
    ridge = damping * torch.diag(hessian).mean()
    H = hessian + ridge * torch.eye(size, device=hessian.device)
    target = dense @ hessian + ridge * dense  # row r: (H w_r + λ w_r)^T
    if method == "cg":
        return _conjugate_gradients(H, target, kept, dense if start is None else start, name)
    index = kept.nonzero()[:, 1].reshape(rows, -1)  # row-major: each row's kept columns, in order
    fitted = torch.zeros_like(dense)
    chunk = max(1, (256 << 20) // (4 * k * k))
    for first in range(0, rows, chunk):
        rows_index = index[first : first + chunk]
        H_kept = H[rows_index[:, :, None], rows_index[:, None, :]]
        lower, info = torch.linalg.cholesky_ex(H_kept)
        if (info != 0).any():
            raise RuntimeError(
                f"{name}: the Hessian restricted to the kept inputs is not positive definite; "
                "raise sparsegpt_damping or give more calibration samples."
            )
        solved = torch.cholesky_solve(torch.gather(target[first : first + chunk], 1, rows_index)[:, :, None], lower)
        fitted[first : first + chunk].scatter_(1, rows_index, solved.squeeze(2))
    return fitted


def _conjugate_gradients(
    H: torch.Tensor, target: torch.Tensor, kept: torch.Tensor, start: torch.Tensor, name: str, tol: float = 1e-4
) -> torch.Tensor:
    """Solves `(H w)_S = target_S` for every row's kept set `S` at once (`H` damped, symmetric positive definite) by
    Jacobi-preconditioned conjugate gradients, from `start` under the mask, until each row's preconditioned residual
    is `tol` of its right-hand side's (a stop that does not depend on the start, so a better start only saves steps).
    At most `min(10 * size, 2000)` steps, with a warning if that was not enough. A row with non-finite values comes
    out non-finite (as from Cholesky) without holding the other rows back."""
    mask = kept.to(H.dtype)
    inverse_diag = 1.0 / torch.diag(H)[None, :]
    tiny = torch.finfo(H.dtype).tiny
    w = torch.where(kept, start.to(H.dtype), 0.0)
    reference = ((target * mask) ** 2 * inverse_diag).sum(dim=1)  # the residual's measure at w = 0
    goal = reference * tol**2
    residual = (target - w @ H) * mask
    z = residual * inverse_diag
    direction = z.clone()
    rz = (residual * z).sum(dim=1)
    limit = min(10 * kept.shape[1], 2000)
    for step in range(limit):
        if ((rz <= goal) | ~torch.isfinite(rz)).all():  # non-finite rows do not hold the others back
            logger.debug("hf-sparse: %s: refit by %d conjugate-gradient steps.", name, step)
            return torch.where(kept, w, 0.0)
        product = (direction @ H) * mask
        curvature = (direction * product).sum(dim=1)
        alpha = torch.where(curvature > 0, rz / curvature, torch.zeros_like(rz))
        w += alpha[:, None] * direction
        residual -= alpha[:, None] * product
        z = residual * inverse_diag
        rz_next = (residual * z).sum(dim=1)
        direction = z + (rz_next / rz.clamp_min(tiny))[:, None] * direction
        rz = rz_next
    logger.warning(
        "hf-sparse: %s: the refit stopped after %d conjugate-gradient steps short of its tolerance (worst row's "
        "residual %.2g of its target, asked %.2g); its weights are still closer to the optimum than where they "
        "started.",
        name,
        limit,
        torch.nan_to_num(rz / reference.clamp_min(tiny), nan=0.0, posinf=0.0).max().sqrt().item(),
        tol,
    )
    return torch.where(kept, w, 0.0)


@torch.no_grad()
def admm_mask(
    dense: torch.Tensor, hessian: torch.Tensor, n: int = 2, m: int = 4, steps: int = 30, name: str = "weight"
) -> torch.Tensor:
    """An N:M mask searched by ADMM: the weights are fitted while a growing penalty pulls them onto N:M.

    Each step minimises `||X (w_dense - W)||^2 + ρ ||W - Z + U||^2` in closed form (one eigendecomposition of the
    Hessian serves every step), projects `W + U` onto N:M by magnitude (`Z`) and accumulates the difference in `U`;
    ρ grows from 0.1 to ~200 times the mean diagonal, so the mask forms gradually instead of in one left-to-right
    pass (Boža, "Fast and Optimal Weight Update for Pruned Large Language Models", 2024).

    Args:
        dense: `(rows, size)` float32 dense weights; columns past the mask's (a bias) are never pruned.
        hessian: `(size, size)` float32 `X^T X`, no zero diagonal entries.
        n, m: the pattern.
        steps: ADMM steps.
        name: the layer, for error messages.

    Returns:
        The `(rows, cols)` boolean mask, `cols` the largest multiple of `m` up to `size`.
    """
    cols = dense.shape[1] // m * m
    scale = torch.diag(hessian).mean()
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian / scale)
    target = dense @ (hessian / scale)
    rho, growth = 0.1, 2000.0 ** (1.0 / max(steps - 1, 1))
    Z, U = dense.clone(), torch.zeros_like(dense)
    keep = None
    for _ in range(steps):
        W = ((target + rho * (Z - U)) @ eigenvectors / (eigenvalues + rho)[None, :]) @ eigenvectors.T
        Z = W + U
        keep = nm_mask_from_scores(Z[:, :cols].abs(), n, m, name)
        Z[:, :cols] *= keep
        U += W - Z
        rho *= growth
    return keep
