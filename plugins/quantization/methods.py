"""Quantizers behind `int4(method=...)` and `int8(method=...)`: one grid abstraction, RTN, AWQ, GPTQ, outliers.

Every function works on one float32 weight [N, K] (K padded to the group size) on the device it lives on and returns
integer codes plus the scales / zero points *as the artifact stores them* (rounded to the model's dtype before the
codes are chosen), so the packed module reproduces exactly what was optimised.

- `Grid`: the number format. int4 group-wise, w = (q - z) * s, q in [0, 15], with a float zero (the kernels' native
  form), an integer zero in [0, 15] (exactly compressed-tensors' asymmetric int4) or z = 8 (symmetric); int8
  per-output-channel symmetric, w = q * s, q in [-127, 127].
- AWQ (Lin et al., 2023, arXiv:2306.00978): per input channel a scale s = mean|x|^a (a searched on a grid) moves
  quantization precision to the channels with large activations; W <- W diag(s) and the previous op divides its
  output by s (see calibrate.py for where it can be folded); then a per-group clipping ratio is searched that
  minimises the group's output error on calibration activations. The scale search minimises the summed output MSE
  of the linears that share the input (AutoAWQ minimises the error of the whole attention/MLP block instead).
- GPTQ (Frantar et al., 2022, arXiv:2210.17323): columns are quantized in order and each column's rounding error is
  spread over the not yet quantized columns through the inverse Hessian H = X^T X of the calibration inputs (lazy
  batches of 128 columns, 1% damping, groups fitted on the already-updated weights when reached; natural column
  order, no act-order, so groups stay contiguous as the kernels need).
- Dense-and-sparse (SpQR, arXiv:2306.03078; SqueezeLLM, arXiv:2306.07629): per output row the `k` weights with the
  largest |w - group mean| (times the input channel's RMS when calibrated) are taken out of the dense part (they
  no longer stretch their group's range) and kept exactly: the sparse value is w - dequant(dense) at that position.
  A fixed count per row keeps the layout static (the skeleton for loading needs no data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

AWQ_GRID = 20  # scale exponents 0, 0.05, ..., 0.95
CLIP_GRID = 20  # clipping ratios 1.0, 0.975, ..., 0.525 (AWQ: max_shrink 0.5)
GPTQ_BLOCK = 128
GPTQ_DAMP = 0.01


@dataclass(frozen=True)
class Grid:
    bits: int  # 4 or 8
    group_size: int  # int4: 32/64/128; int8: 0 (one group per row)
    zero: str  # int4: "float" | "int" | "symmetric"; int8: "symmetric"
    dtype: torch.dtype  # what scales and zeros are stored in

    @property
    def qmin(self) -> int:
        return 0 if self.bits == 4 else -127

    @property
    def qmax(self) -> int:
        return 15 if self.bits == 4 else 127

    def group(self, k: int) -> int:
        return self.group_size or k

    def _stored(self, t: torch.Tensor, positive: bool = False) -> torch.Tensor:
        if positive:
            t = t.clamp(min=torch.finfo(self.dtype).tiny)
        return t.to(self.dtype).float()

    def fit(self, wg: torch.Tensor, valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """wg [..., gs] -> (scale, zero) [...] over the `valid` entries (all when None), rounded as stored."""
        if valid is None:
            lo, hi = wg.amin(-1), wg.amax(-1)
        else:
            lo = torch.where(valid, wg, torch.full_like(wg, float("inf"))).amin(-1)
            hi = torch.where(valid, wg, torch.full_like(wg, float("-inf"))).amax(-1)
            empty = ~valid.any(-1)
            lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
        if self.bits == 8:
            s = self._stored(torch.maximum(hi, -lo).clamp(min=1e-12) / 127.0, positive=True)
            return s, torch.zeros_like(s)
        if self.zero == "symmetric":
            s = self._stored(torch.maximum(hi / 7.0, -lo / 8.0).clamp(min=1e-8), positive=True)
            return s, torch.full_like(s, 8.0)
        if self.zero == "int":  # the grid must contain 0 for an integer zero point in [0, 15]
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            s = self._stored(((hi - lo) / 15.0).clamp(min=1e-8), positive=True)
            return s, torch.round(-lo / s).clamp(0, 15)
        s = ((hi - lo) / 15.0).clamp(min=1e-8)
        z = -lo / s
        return self._stored(s, positive=True), self._stored(z)

    def codes(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.round(w / s + z).clamp(self.qmin, self.qmax)

    @staticmethod
    def dequant(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (q - z) * s

    def fake_quant(self, w: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Quantize-dequantize [N, K] (K a multiple of the group) with min/max (RTN) parameters."""
        n, k = w.shape
        wg = w.reshape(n, -1, self.group(k))
        s, z = self.fit(wg, None if valid is None else valid.reshape(wg.shape))
        return self.dequant(self.codes(wg, s[..., None], z[..., None]), s[..., None], z[..., None]).reshape(n, k)


@dataclass
class Quantized:
    """Result for one weight: codes [N, Kp] (float, integral), scale/zero [N, G], outliers [N, k] or None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    outlier_index: Optional[torch.Tensor] = None  # int32 column indices, ascending per row
    outlier_value: Optional[torch.Tensor] = None  # float32: w - dequant(dense) at those positions

    def dequantize(self, grid: Grid) -> torch.Tensor:
        n, kp = self.codes.shape
        gs = grid.group(kp)
        w = grid.dequant(self.codes.reshape(n, -1, gs), self.scale[..., None], self.zero[..., None]).reshape(n, kp)
        if self.outlier_index is not None:
            w = w.scatter_add(1, self.outlier_index.long(), self.outlier_value)
        return w


def outlier_count(fraction: float, in_features: int) -> int:
    """Outliers kept per output row for a fraction of the weights (at least one when the fraction is > 0)."""
    return 0 if fraction <= 0 else max(1, math.ceil(fraction * in_features))


def select_outliers(w: torch.Tensor, grid: Grid, k: int, in_features: int,
                    act_rms: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Boolean [N, Kp] mask of the k per row with the largest |w - group centre| (x the input channel's RMS)."""
    if k == 0:
        return None
    n, kp = w.shape
    gs = grid.group(kp)
    wg = w.reshape(n, -1, gs)
    centre = 0.0 if grid.bits == 8 or grid.zero == "symmetric" else wg.mean(-1, keepdim=True)  # not moved by one outlier
    score = (wg - centre).abs().reshape(n, kp)
    if act_rms is not None:
        score = score * act_rms[None, :kp]
    score[:, in_features:] = -1.0  # never a padding column
    idx = score.topk(k, dim=1).indices
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)


def _finish(w: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, grid: Grid,
            mask: Optional[torch.Tensor]) -> Quantized:
    out = Quantized(codes, s, z)
    if mask is not None:
        dense = out.dequantize(grid)
        k = int(mask[0].sum())
        idx = mask.nonzero()[:, 1].reshape(w.shape[0], k)  # nonzero() is row-major: ascending per row
        out.outlier_index = idx.to(torch.int32)
        out.outlier_value = (w.gather(1, idx) - dense.gather(1, idx)).to(grid.dtype).float()
    return out


def _clean(w: torch.Tensor, grid: Grid, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Outliers replaced by the centre of their group's other weights, so they no longer set its range."""
    if mask is None:
        return w
    n, kp = w.shape
    gs = grid.group(kp)
    wg, valid = w.reshape(n, -1, gs), ~mask.reshape(n, -1, gs)
    if grid.bits == 8 or grid.zero == "symmetric":
        centre = torch.zeros_like(wg[..., :1])
    else:
        lo = torch.where(valid, wg, torch.full_like(wg, float("inf"))).amin(-1, keepdim=True)
        hi = torch.where(valid, wg, torch.full_like(wg, float("-inf"))).amax(-1, keepdim=True)
        centre = torch.where(valid.any(-1, keepdim=True), (lo + hi) / 2, torch.zeros_like(lo))
    return torch.where(valid, wg, centre).reshape(n, kp)


# -- round to nearest (optionally HQQ zeros, optionally AWQ clipping) ------------------------------------------
def quantize_rtn(w: torch.Tensor, grid: Grid, mask: Optional[torch.Tensor] = None, hqq: bool = False,
                 clip: Optional[torch.Tensor] = None) -> Quantized:
    """Min/max (or HQQ-refined) parameters per group of the cleaned weight; `clip` [N, G] shrinks each range."""
    n, kp = w.shape
    gs = grid.group(kp)
    wc = _clean(w, grid, mask)
    wg = wc.reshape(n, -1, gs)
    if clip is not None:
        amax = wg.abs().amax(-1, keepdim=True) * clip[..., None]
        wg = torch.maximum(torch.minimum(wg, amax), -amax)
    s, z = grid.fit(wg)
    if hqq and grid.bits == 4 and grid.zero != "symmetric":
        from .int4 import _hqq_zero

        s32 = s
        z = _hqq_zero(wg, s32, -wg.amin(-1) / s32)
        z = torch.round(z).clamp(0, 15) if grid.zero == "int" else grid._stored(z)
    codes = grid.codes(wg, s[..., None], z[..., None]).reshape(n, kp)
    return _finish(w, codes, s, z, grid, mask)


# -- AWQ ----------------------------------------------------------------------------------------------------------
# Output errors are measured through the calibration inputs' second moment G = X^T X / T (the same statistic GPTQ
# uses): ||X D^T||^2 / T = sum((D G) * D) for a weight error D, so no activation rows need to be kept.
@torch.no_grad()
def awq_search_scale(weights: list[torch.Tensor], gram: torch.Tensor, x_absmean: torch.Tensor, grid: Grid
                     ) -> tuple[torch.Tensor, float, float]:
    """Per-input-channel scale s for linears sharing one input (second moment `gram` [K, K]): argmin over a of
    sum_i ||x W_i^T - x (Q(W_i diag(s)) diag(1/s))^T||^2 with s = x_absmean^a normalised (a = 0: no scaling).
    Returns (s, best a, relative loss improvement over a = 0)."""
    best, best_a, base = None, 0.0, None
    best_s = torch.ones_like(x_absmean)
    for i in range(AWQ_GRID):
        a = i / AWQ_GRID
        s = x_absmean.clamp(min=1e-4).pow(a)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w in weights:
            d = w - grid.fake_quant(_pad_cols(w * s[None], grid))[:, : w.shape[1]] / s[None]
            loss += float(((d @ gram) * d).sum())
        if base is None:
            base = loss
        if best is None or loss < best:
            best, best_a, best_s = loss, a, s
    return best_s, best_a, (1 - best / base) if base else 0.0


@torch.no_grad()
def awq_search_clip(w: torch.Tensor, gram: torch.Tensor, grid: Grid, mask: Optional[torch.Tensor] = None,
                    rows_per_step: int = 1024) -> torch.Tensor:
    """Per (row, group) clipping ratio in [0.5, 1] minimising the group's output error (gram [Kp, Kp])."""
    n, kp = w.shape
    gs = grid.group(kp)
    ng = kp // gs
    wc = _clean(w, grid, mask)
    blocks = torch.stack([gram[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(ng)])  # [G, gs, gs]
    best_ratio = torch.ones(n, ng, device=w.device)
    for r0 in range(0, n, rows_per_step):
        wg = wc[r0:r0 + rows_per_step].reshape(-1, ng, gs)
        amax0 = wg.abs().amax(-1, keepdim=True)
        best_err = None
        for i in range(CLIP_GRID):
            ratio = 1 - i / CLIP_GRID * 0.5
            amax = amax0 * ratio
            cw = torch.maximum(torch.minimum(wg, amax), -amax)
            s, z = grid.fit(cw)
            d = wg - grid.dequant(grid.codes(cw, s[..., None], z[..., None]), s[..., None], z[..., None])
            err = (torch.einsum("ngk,gkl->ngl", d, blocks) * d).sum(-1)  # [rows, G]
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[r0:r0 + rows_per_step] = torch.where(better, ratio, best_ratio[r0:r0 + rows_per_step])
    return best_ratio


def _pad_cols(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    k = w.shape[1]
    gs = grid.group(k)
    kp = -(-k // gs) * gs
    return torch.nn.functional.pad(w, (0, kp - k)) if kp != k else w


# -- GPTQ ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, mask: Optional[torch.Tensor] = None,
                  damp: float = GPTQ_DAMP) -> Quantized:
    """GPTQ on w [N, Kp] with H [Kp, Kp] (padding / never-active columns are dead: H_jj = 1, w_j = 0)."""
    n, kp = w.shape
    gs = grid.group(kp)
    W = w.clone()
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:  # not positive definite even with damping: damp harder
        H.diagonal().add_(0.1 * torch.mean(torch.diag(H)))
        L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    codes = torch.zeros_like(W)
    final = torch.zeros_like(W) if mask is not None else None  # each outlier's (updated) weight when quantized
    S = torch.zeros(n, kp // gs, device=w.device)
    Z = torch.zeros_like(S)
    valid = None if mask is None else ~mask
    if grid.group_size == 0:  # one group per row: parameters from the whole (original) row up front
        s, z = grid.fit(W, valid)
        S[:, 0], Z[:, 0] = s, z
    block = max(GPTQ_BLOCK, gs) if grid.group_size else GPTQ_BLOCK
    for i1 in range(0, kp, block):
        i2 = min(i1 + block, kp)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        H1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // gs
            if grid.group_size and col % gs == 0:
                vg = None if valid is None else valid[:, col:col + gs]
                S[:, g], Z[:, g] = grid.fit(W1[:, i:i + gs], vg)
            wcol = W1[:, i]
            q = grid.codes(wcol, S[:, g], Z[:, g])
            dq = grid.dequant(q, S[:, g], Z[:, g])
            if mask is not None:
                dq = torch.where(mask[:, col], wcol, dq)  # an outlier is kept exactly: no error to spread
                final[:, col] = wcol
            codes[:, col] = q
            err = (wcol - dq) / H1[i, i]
            W1[:, i:].addr_(err, H1[i, i:], alpha=-1.0)  # one launch per column (the loop is launch-bound on GPUs)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return _finish(final if mask is not None else w, codes, S, Z, grid, mask)
