"""Which weights to zero: magnitude, Wanda (|W| x input-activation norm, arXiv:2306.11695) and SparseGPT (one-shot
OBS reconstruction in column blocks, arXiv:2301.00774), unstructured or N:M.

All functions work on one weight matrix (out, in) in float32 and return (new weight, kept mask). They are pure: the
plugin decides where the statistics come from and what replaces the layer."""
from __future__ import annotations

import torch

from hf_accel.errors import AccelError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "2:4" -> (2, 4) (keep N of every M consecutive input weights)."""
    if pattern == "unstructured":
        return None
    n, _, m = pattern.partition(":")
    return int(n), int(m)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive input columns (True = kept)."""
    out, cols = score.shape
    groups = score.reshape(out, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out, cols)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Zero the `sparsity` fraction of lowest scores, per output row (Wanda's comparison group) or per matrix."""
    if per_row:
        k = int(score.shape[1] * sparsity)
        keep = torch.ones_like(score, dtype=torch.bool)
        if k:
            keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
        return keep
    k = int(score.numel() * sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[score.flatten().topk(k, largest=False).indices] = False
    return keep.reshape(score.shape)


def score_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, act_norm: torch.Tensor | None):
    """Magnitude (act_norm None) or Wanda (|W| * ||x_j||_2) pruning: no weight update, only a mask."""
    score = weight.abs()
    if act_norm is not None:
        score = score * act_norm.to(score)[None, :]
    if nm is not None:
        keep = nm_mask(score, *nm)
    else:
        keep = unstructured_mask(score, sparsity, per_row=act_norm is not None)
    return weight * keep, keep


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
              blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's `fasterprune` (IST-DASLab/sparsegpt): prune column by column inside blocks of `blocksize`,
    choosing by w^2 / [H^-1]_jj^2 and spreading each pruned weight's error over the not-yet-pruned columns
    through the Cholesky factor of the inverse Hessian (H = 2 X^T X / n from calibration inputs).

    `weight` may stack several layers that read the same input (q/k/v): rows are independent given H."""
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(cols, device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(6):
        Hd = H.clone()
        Hd[idx, idx] += percdamp * (10 ** attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            if torch.isfinite(Hinv).all():
                break
    else:
        raise AccelError("SparseGPT: the calibration Hessian is not positive definite even with strong dampening; "
                         "use more calibration samples (samples=...) or method=wanda")
    keep = torch.ones_like(W, dtype=torch.bool)
    n_prune_of = None if nm is None else (nm[1] - nm[0], nm[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if n_prune_of is None:
            tmp = W1 ** 2 / d1[None, :] ** 2
            k = int(tmp.numel() * sparsity)
            pruned1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                pruned1.view(-1)[tmp.flatten().topk(k, largest=False).indices] = True
        else:
            pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if n_prune_of is not None and i % n_prune_of[1] == 0:
                tmp = W1[:, i : i + n_prune_of[1]] ** 2 / d1[i : i + n_prune_of[1]][None, :] ** 2
                pruned1.scatter_(1, i + tmp.topk(n_prune_of[0], dim=1, largest=False).indices, True)
            q = w.masked_fill(pruned1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~pruned1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep
