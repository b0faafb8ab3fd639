"""2:4 sparse weights (two kept values in every group of four consecutive inputs): compressed storage, plain-torch
reference, Triton decode kernels (M = 1..64 rows, any M correct), the op `hf_accel::sparse24_linear`.

Format (what `prune(pattern=2:4)` saves; `Sparse24Linear.weight` / `.weight_meta`), W dense [N, K], K % 8 == 0:
- `values` [N, K/2] in the model dtype: value i of a row belongs to group g = i // 2 (dense columns 4g..4g+3);
  values 2g, 2g+1 are the group's kept weights in increasing column order.
- `meta` uint8 [N, K/8]: the position 0..3 of value i inside its group in bits 2·(i % 4) of byte i // 4. So byte b
  describes groups 2b (bits 0-3: p0 | p1 << 2) and 2b+1 (bits 4-7); always p0 < p1 (also for groups with fewer than
  two nonzeros: the missing ones are stored as kept zeros at the lowest free positions).
Bytes per weight: 0.5 (bf16 values) + 0.0625 (meta) = 0.5625x dense bf16.

Kernels (each checked against `sparse24_linear_ref` under TRITON_INTERPRET=1, tests/test_sparse24_kernel.py). The
values are read as int32 words, one word = one group's pair (little-endian: v0 = low half, v1 = high half), so a
[BLOCK_N, BKG] word tile (BKG = BLOCK_K/4 groups) is one contiguous, vectorisable load per row and is read once.
- `_s24_mma`, kind "mma" (the default for every M <= DOT_M when K % 32 == 0; measured reasons in kernels/NOTES.md):
  the meta is read as int32 words (8 groups' nibbles each: a meta row must be whole words), the tile is expanded in
  registers to the dense [BLOCK_N, 4·BKG] bf16/fp16 tile by masks and shifts (`_expand_24`: ~15 integer
  instructions per group, no per-entry selects), put in column order by joins and in-thread reshapes, and fed to one
  tl.dot per step as the MMA's A operand ("swap AB": W rows fill the MMA's M, x^T [4·BKG, BLOCK_M] is one contiguous
  tile, BLOCK_M >= 16, padding rows zero-filled). Everything it loads goes through the cp.async pipeline
  (num_stages). Split-K is reduced inside the kernel (`_fixup`: the last program of each tile adds the partials)
  unless MMA_FIXUP is off or a CUDA graph is captured before any counters exist.
The older kernels (kept: K % 32 != 0, comparisons) load the meta byte of group g at g // 2 (2-D pointer grid) and
read x as four "planes" x_j[m, g] = x[m, 4g + j]; y = sum_g sum_j d_j[n, g] x_j[m, g] with the dense plane
d_j[n, g] = W[n, 4g + j] = v0 if p0 == j, v1 if p1 == j, else 0. bf16 -> fp32 is integer work only (v0 = word << 16,
v1 = word & 0xFFFF0000, bitcast); fp16 converts. fp32 accumulation, one rounding at the store.
- `_s24_bgemv`, kind "xsel" (M = 1..4 when K % 32 != 0): never builds the dense tile: for each kept value it
  selects the x element its position names (two selects each) and does 2 FMAs per group and row. BLOCK_M rows of x
  per program reuse each loaded tile ([BLOCK_M, BLOCK_N, BKG] fp32 accumulator, or reduced every step: acc3=False).
- `_s24_bgemv`, kind "planes" (M = 5..15): the four dense planes once per tile (6 selects per group), 4 FMAs per
  group and row.
- `_s24_dot`, kind "dot" (M = 16..64): the four planes as 16-bit patterns are the A operand of four dots per step
  (measured 7.7% of copy bandwidth on the H200: x and meta loads outside the pipeline, 16-bit shared stores).
- Split-K of the older kernels: fp32 partials [S, M, N], then `_base.splitk_reduce` (adds the bias).
- M > DOT_M (64): decompress to a dense weight (torch), then cuBLAS; the pruning module uses the semi-structured
  (cuSPARSELt / CUTLASS) path for prefill instead.
Tails: any N (rows past N re-read row 0 and are not stored); any K % 8 == 0 (groups past K masked). K % 8 != 0 is
refused by `compress_24`. Known difference from the reference: "xsel" never reads the x entries at pruned
positions, so an inf/NaN there does not propagate (the dense product's 0 * inf would).

Launch configurations: `TUNED` (device, M bucket, N, K) -> {"kernel": one of KINDS, LaunchConfig fields}, the fastest
of `scripts/bench_prune.py`'s sweep on the 8B shapes (measured on an H200); elsewhere `default_config`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ._base import (DOT_M, HAS_TRITON, SIBLING, LaunchConfig, device_key, dot, flatten, interpreting, m_bucket,
                    sm_count, split_plan, splitk_reduce, use_triton)


# ---------------------------------------------------------------------------------------------------------------
# format: compress / decompress, plain-torch reference
# ---------------------------------------------------------------------------------------------------------------
def compress_24(weight: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, K/2], meta uint8 [N, K/8]) of a 2:4-sparse weight [N, K] (format: module docstring).

    Without `keep`, the nonzeros of `weight` define the pattern: every group of 4 consecutive columns must hold at
    most 2 nonzeros (groups with fewer store zeros at their lowest free positions). With `keep` (bool [N, K]), it
    must keep exactly 2 of every 4 and `weight` must be zero wherever it is False. Anything else raises ValueError
    (a dense or wrongly pruned weight cannot be stored 2:4)."""
    if weight.dim() != 2:
        raise ValueError(f"2:4 compressed storage takes a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out, cols = weight.shape
    if cols % 8:
        raise ValueError(f"2:4 compressed storage needs in_features divisible by 8, got {cols}")
    groups = weight.reshape(out, cols // 4, 4)
    nz = groups != 0
    if keep is None:
        counts = nz.sum(-1)
        bad = counts > 2
        if bad.any():
            r, g = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"weight is not 2:4 sparse: {int(bad.sum())} of {counts.numel()} groups of 4 consecutive "
                             f"inputs hold more than 2 nonzeros (first: row {r}, columns {4 * g}..{4 * g + 3}); "
                             "prune it first, e.g. prune(pattern=2:4)")
        score = nz.to(torch.int8) * 4 + torch.tensor([3, 2, 1, 0], dtype=torch.int8, device=weight.device)
    else:
        if keep.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(keep.shape)} != weight shape {tuple(weight.shape)}")
        kg = keep.reshape(out, cols // 4, 4).bool()
        if not (kg.sum(-1) == 2).all():
            raise ValueError("the 2:4 mask must keep exactly 2 of every 4 consecutive inputs")
        if (nz & ~kg).any():
            raise ValueError(f"weight has {int((nz & ~kg).sum())} nonzeros where the 2:4 mask prunes")
        score = kg.to(torch.int8)
    pos = score.topk(2, dim=-1).indices.sort(dim=-1).values  # (out, g, 2), p0 < p1
    values = groups.gather(-1, pos).reshape(out, cols // 2)
    p = pos.reshape(out, cols // 8, 4).to(torch.uint8)
    meta = p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)
    return values.contiguous(), meta.contiguous()


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] weight (values' dtype), zeros where pruned. Exact."""
    out, half = values.shape
    if meta.shape != (out, half // 4) or half % 4:
        raise ValueError(f"2:4 meta must be [N, K/8] = {(out, half // 4)} for values {tuple(values.shape)}, "
                         f"got {tuple(meta.shape)}")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=meta.device)
    pos = ((meta[..., None] >> shifts) & 3).reshape(out, half // 2, 2).long()
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(out, half // 2, 2))
    return dense.reshape(out, half * 2)


def sparse24_linear_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ W.T + bias with W = decompress_24(values, meta), in x's dtype."""
    return F.linear(x, decompress_24(values, meta).to(x.dtype), None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    _dot = dot

    @triton.jit
    def _pair_f32(w, IS_BF16: tl.constexpr):
        """int32 words (one group's two kept values) -> (v0, v1) in fp32."""
        if IS_BF16:
            v0 = (w << 16).to(tl.float32, bitcast=True)
            v1 = (w & -65536).to(tl.float32, bitcast=True)  # 0xFFFF0000
        else:
            v0 = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            v1 = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return v0, v1

    @triton.jit
    def _s24_bgemv(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, M, N, G, STEPS, stride_xm, stride_vn, stride_mn, stride_ym,
                   IS_BF16: tl.constexpr, XSEL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                   SPLIT: tl.constexpr, ACC3: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BKG: tl.constexpr):
        """Batched GEMV on CUDA cores: program (n, m, s) covers BLOCK_N rows of W, BLOCK_M rows of x and STEPS
        blocks of BKG groups (4·BKG inputs) starting at s·STEPS·BKG. v_ptr: the values as int32 words [N, G]."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)  # rows past N re-read row 0 (in bounds) instead of masking every load
        rm_in = tl.where(rm < M, rm, 0)
        rg = tl.arange(0, BKG)
        g_first = pid_k * STEPS * BKG  # even (BKG is), so group g's meta nibble is picked by rg's parity
        w_ptrs = v_ptr + rn_in[:, None].to(tl.int64) * stride_vn + (g_first + rg)[None, :]
        mt_ptrs = m_ptr + rn_in[:, None].to(tl.int64) * stride_mn + ((g_first + rg) // 2)[None, :]
        shift = ((rg % 2) * 4)[None, :]
        x_ptrs = x_ptr + rm_in[:, None].to(tl.int64) * stride_xm + (4 * (g_first + rg))[None, :]  # plane 0
        if ACC3:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BKG], dtype=tl.float32)
        else:
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in range(0, STEPS):
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                mb = tl.load(mt_ptrs, eviction_policy="evict_first")
                x0 = tl.load(x_ptrs)
                x1 = tl.load(x_ptrs + 1)
                x2 = tl.load(x_ptrs + 2)
                x3 = tl.load(x_ptrs + 3)
            else:
                g_in = (g_first + step * BKG + rg) < G
                w = tl.load(w_ptrs, mask=g_in[None, :], other=0, eviction_policy="evict_first")
                mb = tl.load(mt_ptrs, mask=g_in[None, :], other=0, eviction_policy="evict_first")
                x0 = tl.load(x_ptrs, mask=g_in[None, :], other=0.0)
                x1 = tl.load(x_ptrs + 1, mask=g_in[None, :], other=0.0)
                x2 = tl.load(x_ptrs + 2, mask=g_in[None, :], other=0.0)
                x3 = tl.load(x_ptrs + 3, mask=g_in[None, :], other=0.0)
            t = mb.to(tl.int32) >> shift
            p0 = t & 3
            p1 = (t >> 2) & 3
            v0, v1 = _pair_f32(w, IS_BF16)
            x0 = x0.to(tl.float32)[:, None, :]
            x1 = x1.to(tl.float32)[:, None, :]
            x2 = x2.to(tl.float32)[:, None, :]
            x3 = x3.to(tl.float32)[:, None, :]
            if XSEL:  # p0 < p1: p0 in {0, 1, 2}, p1 in {1, 2, 3}
                xa = tl.where((p0 == 0)[None, :, :], x0, tl.where((p0 == 1)[None, :, :], x1, x2))
                xb = tl.where((p1 == 3)[None, :, :], x3, tl.where((p1 == 2)[None, :, :], x2, x1))
                part = v0[None, :, :] * xa + v1[None, :, :] * xb
            else:
                d0 = tl.where(p0 == 0, v0, 0.0)
                d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, 0.0))
                d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, 0.0))
                d3 = tl.where(p1 == 3, v1, 0.0)
                part = d0[None, :, :] * x0 + d1[None, :, :] * x1 + d2[None, :, :] * x2 + d3[None, :, :] * x3
            if ACC3:
                acc += part
            else:
                acc2 += tl.sum(part, axis=2)
            w_ptrs += BKG
            mt_ptrs += BKG // 2
            x_ptrs += 4 * BKG
        if ACC3:
            y = tl.sum(acc, axis=2)
        else:
            y = acc2
        ok = (rm < M)[:, None] & (rn < N)[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                y += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(y_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :], y, mask=ok)

    @triton.jit
    def _s24_dot(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, M, N, G, STEPS, stride_xm, stride_vn, stride_mn, stride_ym,
                 HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BKG: tl.constexpr, INTERPRET: tl.constexpr):
        """Tensor cores: acc[n, m] += sum_j d_j[n, g] x_j^T[g, m], the dense planes built as 16-bit patterns in x's
        dtype (exact: they are the stored values or zero)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)
        rm_in = tl.where(rm < M, rm, 0)
        rg = tl.arange(0, BKG)
        g_first = pid_k * STEPS * BKG
        w_ptrs = v_ptr + rn_in[:, None].to(tl.int64) * stride_vn + (g_first + rg)[None, :]
        mt_ptrs = m_ptr + rn_in[:, None].to(tl.int64) * stride_mn + ((g_first + rg) // 2)[None, :]
        shift = ((rg % 2) * 4)[None, :]
        x_ptrs = x_ptr + rm_in[None, :].to(tl.int64) * stride_xm + (4 * (g_first + rg))[:, None]  # [BKG, BM]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        xdt = x_ptr.dtype.element_ty
        for step in range(0, STEPS):
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                mb = tl.load(mt_ptrs, eviction_policy="evict_first")
                x0 = tl.load(x_ptrs)
                x1 = tl.load(x_ptrs + 1)
                x2 = tl.load(x_ptrs + 2)
                x3 = tl.load(x_ptrs + 3)
            else:
                g_in = (g_first + step * BKG + rg) < G
                w = tl.load(w_ptrs, mask=g_in[None, :], other=0, eviction_policy="evict_first")
                mb = tl.load(mt_ptrs, mask=g_in[None, :], other=0, eviction_policy="evict_first")
                x0 = tl.load(x_ptrs, mask=g_in[:, None], other=0.0)
                x1 = tl.load(x_ptrs + 1, mask=g_in[:, None], other=0.0)
                x2 = tl.load(x_ptrs + 2, mask=g_in[:, None], other=0.0)
                x3 = tl.load(x_ptrs + 3, mask=g_in[:, None], other=0.0)
            t = mb.to(tl.int32) >> shift
            p0 = t & 3
            p1 = (t >> 2) & 3
            hi = w >> 16
            d0 = tl.where(p0 == 0, w, 0).to(tl.int16).to(xdt, bitcast=True)
            d1 = tl.where(p0 == 1, w, tl.where(p1 == 1, hi, 0)).to(tl.int16).to(xdt, bitcast=True)
            d2 = tl.where(p0 == 2, w, tl.where(p1 == 2, hi, 0)).to(tl.int16).to(xdt, bitcast=True)
            d3 = tl.where(p1 == 3, hi, 0).to(tl.int16).to(xdt, bitcast=True)
            acc = _dot(d0, x0, acc, INTERPRET)
            acc = _dot(d1, x1, acc, INTERPRET)
            acc = _dot(d2, x2, acc, INTERPRET)
            acc = _dot(d3, x3, acc, INTERPRET)
            w_ptrs += BKG
            mt_ptrs += BKG // 2
            x_ptrs += 4 * BKG
        ok = (rn < N)[:, None] & (rm < M)[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn_in).to(tl.float32)[:, None]
            tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=ok)
        else:
            tl.store(y_ptr + (pid_k * M + rm[None, :]).to(tl.int64) * N + rn[:, None], acc, mask=ok)


    @triton.jit
    def _expand_24(w, nib):
        """Group words w = v0 | v1 << 16 and position nibbles nib = p0 | p1 << 2 (int32, one shape) -> the group's
        four dense 16-bit entries as two words, lo = d0 | d1 << 16 and hi = d2 | d3 << 16, by masks and shifts
        (no per-entry selects). Valid nibbles: 4 (p 0,1), 8 (0,2), 12 (0,3), 9 (1,2), 13 (1,3), 14 (2,3); a
        masked group (w = 0) gives zeros whatever its nibble.
        lo keeps v1 too only for (0,1), nothing for (2,3), else v0 alone, moved up 16 bits when p0 = 1 (odd nib);
        hi keeps what lo does not, moved down 16 bits when p1 = 2 (bit 2 of nib clear; for (0,1) hi is 0)."""
        keep_lo = tl.where(nib == 4, -1, tl.where(nib == 14, 0, 0xFFFF))
        lo = (w & keep_lo) << ((nib << 4) & 16)
        hi = ((w & ~keep_lo).to(tl.uint32, bitcast=True) >> ((~nib << 2) & 16).to(tl.uint32))
        return lo, hi.to(tl.int32, bitcast=True)

    @triton.jit
    def _nibbles(mw, BLOCK_N: tl.constexpr, BKG: tl.constexpr):
        """Meta words [BLOCK_N, BKG // 8] (int32: 8 groups' nibbles each, group 8c + i in bits 4i..4i+3) -> the
        nibbles [BLOCK_N, BKG] in group order: constant shifts, then an in-thread interleave. tl.join appends the new
        axis last (fastest), so order(n0..n7) = join(order(evens), order(odds)), recursively."""
        n0 = mw & 15
        n1 = (mw >> 4) & 15
        n2 = (mw >> 8) & 15
        n3 = (mw >> 12) & 15
        n4 = (mw >> 16) & 15
        n5 = (mw >> 20) & 15
        n6 = (mw >> 24) & 15
        n7 = (mw >> 28) & 15
        tree = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
        return tree.reshape(BLOCK_N, BKG)

    @triton.jit
    def _dense_tile(w, mw, BLOCK_N: tl.constexpr, BKG: tl.constexpr, XDT: tl.constexpr):
        """Words [BLOCK_N, BKG] and meta words [BLOCK_N, BKG // 8] (int32) -> the dense [BLOCK_N, 4·BKG] tile in XDT
        (bit patterns: exact). Joins and in-thread reshapes only: dense columns 4g..4g+3 are group g's."""
        lo, hi = _expand_24(w, _nibbles(mw, BLOCK_N, BKG))
        pairs = tl.join(lo, hi).reshape(BLOCK_N, 2 * BKG)  # word t: dense columns 2t (low half), 2t + 1
        halves = tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16)).reshape(BLOCK_N, 4 * BKG)
        return halves.to(XDT, bitcast=True)

    @triton.jit
    def _fixup(p_ptr, b_ptr, out_ptr, cnt, tile_offs, rn, rn_in, rm, ok, M, N, stride_ym, HAS_BIAS: tl.constexpr,
               SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """Split-K without a second launch (the CUTLASS semaphore pattern): after its partial is stored, a program
        counts itself in (barrier, then one acq_rel atomic at GPU scope); the one that arrives last reads all
        partials past L1 (.cg: other SMs wrote them), sums them in split order, adds the bias, stores the output
        and resets the counter for the next launch."""
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(p_ptr + s * M * N + tile_offs, mask=ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn_in).to(tl.float32)[:, None]
            tl.store(out_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None],
                     total.to(out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _s24_mma(x_ptr, v_ptr, m_ptr, b_ptr, y_ptr, M, N, G, STEPS, stride_xm, stride_vn, stride_mn, stride_ym,
                 out_ptr, cnt_ptr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BKG: tl.constexpr, FIXUP: tl.constexpr,
                 XPAD: tl.constexpr, X_AS_A: tl.constexpr, INTERPRET: tl.constexpr):
        """Tensor cores on the decompressed tile: acc[n, m] += W[n, k-block] @ x^T[k-block, m], W's tile expanded
        in registers from contiguous word and meta-byte loads (`_dense_tile`) and fed as the MMA's A operand ("swap
        AB": W rows fill the MMA's M dimension, the few x rows its N, padded to BLOCK_M >= 16 by re-reading row 0).
        x^T is one contiguous [4·BKG, BLOCK_M] tile per step (vector loads along K). SPLIT > 1: y_ptr holds fp32
        partials [SPLIT, M, N]; with FIXUP the last program of each output tile to arrive (per-tile counters at
        cnt_ptr, zero between launches) adds them in split order and writes out_ptr [M, N] itself: no second
        launch, and the same sum whichever program arrives last.
        X_AS_A (kind "mma_xa"): the unswapped product acc^T[m, n] += x[m, k] @ W^T[k, n] instead, W^T the B operand:
        on sm_90 a B operand lives in shared memory, so wgmma (BLOCK_M >= 64) need not wait for register operands
        after every instruction, and below 64 rows Triton uses mma.sync with x in registers."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)
        rm_in = tl.where(rm < M, rm, 0)
        rg = tl.arange(0, BKG)
        rc = tl.arange(0, BKG // 8)
        rk = tl.arange(0, 4 * BKG)
        g_first = pid_k * STEPS * BKG  # a multiple of 8: meta word g_first // 8 starts the step
        w_ptrs = v_ptr + rn_in[:, None].to(tl.int64) * stride_vn + (g_first + rg)[None, :]
        mt_ptrs = m_ptr + rn_in[:, None].to(tl.int64) * stride_mn + (g_first // 8 + rc)[None, :]
        # XPAD (M % BLOCK_M != 0): padding rows zero-filled by the copy, not fetched (M = 1: 1/16 of the x traffic)
        if X_AS_A:
            x_ptrs = x_ptr + rm_in[:, None].to(tl.int64) * stride_xm + (4 * g_first + rk)[None, :]  # [BM, 4·BKG]
            x_rows = (rm < M)[:, None] | (not XPAD)
            x_k = rk[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            x_ptrs = x_ptr + rm_in[None, :].to(tl.int64) * stride_xm + (4 * g_first + rk)[:, None]  # [4·BKG, BM]
            x_rows = (rm < M)[None, :] | (not XPAD)
            x_k = rk[:, None]
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        xdt = x_ptr.dtype.element_ty
        for step in range(0, STEPS):
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                mb = tl.load(mt_ptrs, eviction_policy="evict_first")
                xt = tl.load(x_ptrs, mask=x_rows, other=0.0)
            else:
                g0 = g_first + step * BKG
                w = tl.load(w_ptrs, mask=(g0 + rg < G)[None, :], other=0, eviction_policy="evict_first")
                mb = tl.load(mt_ptrs, mask=(g0 + 8 * rc < G)[None, :], other=0, eviction_policy="evict_first")
                xt = tl.load(x_ptrs, mask=(4 * g0 + x_k < 4 * G) & x_rows, other=0.0)
            if X_AS_A:
                acc = _dot(xt, tl.trans(_dense_tile(w, mb, BLOCK_N, BKG, xdt)), acc, INTERPRET)
            else:
                acc = _dot(_dense_tile(w, mb, BLOCK_N, BKG, xdt), xt, acc, INTERPRET)
            w_ptrs += BKG
            mt_ptrs += BKG // 8
            x_ptrs += 4 * BKG
        if X_AS_A:
            acc = tl.trans(acc)  # once, after the loop: the epilogue is the same for both operand orders
        ok = (rn < N)[:, None] & (rm < M)[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn_in).to(tl.float32)[:, None]
            tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=ok)
        else:
            tile_offs = rm[None, :].to(tl.int64) * N + rn[:, None]
            tl.store(y_ptr + pid_k * M * N + tile_offs, acc, mask=ok)
            if FIXUP:
                _fixup(y_ptr, b_ptr, out_ptr, cnt_ptr + pid_m * tl.num_programs(0) + pid_n, tile_offs, rn, rn_in, rm,
                       ok, M, N, stride_ym, HAS_BIAS, SPLIT, BLOCK_N, BLOCK_M)


# ---------------------------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------------------------
KINDS = ("mma", "mma_xa", "xsel", "planes", "dot", "dense")
# default when in_features % 32 != 0 (no "mma"): "xsel" up to 4 rows, "planes" up to 15, "dot" from 16
XSEL_MAX_M = 4
DOT_MIN_M = 16
# (device, M bucket, N, K) -> {"kernel": one of KINDS, LaunchConfig fields}; filled from the GPU sweep of
# scripts/bench_prune.py (its "tuned_sparse24" list). An H200 falls back to H100 entries (_base.SIBLING).
TUNED: dict = {  # bench_prune's sweep on one H200, 2026-12-01 (benchmarks/results/bench_prune.json, tuned_sparse24)
    ('h200', 32, 4096, 4096): {'kernel': 'mma', 'block_n': 64, 'block_k': 128, 'block_m': 32, 'num_warps': 4, 'num_stages': 4, 'split_k': 4},
    ('h200', 16, 4096, 4096): {'kernel': 'mma', 'block_n': 64, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 4, 'split_k': 4},
    ('h200', 1, 4096, 4096): {'kernel': 'mma', 'block_n': 64, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 4, 'split_k': 4},
    ('h200', 32, 1024, 4096): {'kernel': 'mma_xa', 'block_n': 64, 'block_k': 128, 'block_m': 64, 'num_warps': 4, 'num_stages': 3, 'split_k': 8},
    ('h200', 16, 1024, 4096): {'kernel': 'mma', 'block_n': 32, 'block_k': 256, 'block_m': 16, 'num_warps': 2, 'num_stages': 3, 'split_k': 8},
    ('h200', 1, 1024, 4096): {'kernel': 'xsel', 'block_n': 4, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'split_k': 2},
    ('h200', 32, 14336, 4096): {'kernel': 'mma', 'block_n': 64, 'block_k': 128, 'block_m': 32, 'num_warps': 4, 'num_stages': 4},
    ('h200', 16, 14336, 4096): {'kernel': 'mma', 'block_n': 64, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 4},
    ('h200', 1, 14336, 4096): {'kernel': 'xsel', 'block_n': 4, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h200', 32, 4096, 14336): {'kernel': 'mma', 'block_n': 64, 'block_k': 128, 'block_m': 32, 'num_warps': 4, 'num_stages': 4, 'split_k': 4},
    ('h200', 16, 4096, 14336): {'kernel': 'mma', 'block_n': 64, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 4, 'split_k': 4},
    ('h200', 1, 4096, 14336): {'kernel': 'mma', 'block_n': 64, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 4, 'split_k': 4},
}


def _split_for(programs: int, steps: int, sms: int) -> int:
    split = 1
    while programs * split < 2 * sms and split < 8 and steps >= 2 * split:
        split *= 2
    return split


def _split_for_warps(programs: int, warps: int, steps: int, sms: int, per_sm: int = 6) -> int:
    """Split-K for the "mma" kernel: doubled (at most 8, >= 2 steps per split) until the grid holds `per_sm` warps
    per SM. At 60% of copy bandwidth an H200 SM must expand ~8.6 dense weights per clock, ~55 lane-instructions
    (1.7 warp-instructions) per clock at 6.5 per weight: one warp per scheduler with this loop's dependent chains
    and MMA waits would be short of that, so q/o and down (64-128 programs) get split 4, k/v 8; gate/up (224
    programs of 4 warps) none. per_sm = 6 is an estimate to check against the sweep's split 1 / 2 candidates."""
    split = 1
    while programs * warps * split < per_sm * sms and split < 8 and steps >= 2 * split:
        split *= 2
    return split


def _mma_default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    """BLOCK_M: x rows padded to 16 (the MMA's N; M = 1 pays only tensor-core time). BLOCK_N 64 / 4 warps (one
    wgmma warpgroup) where N gives >= 1.5 programs per SM (gate/up: 224), else 32 rows / 2 warps (mma.sync) for
    M <= 16 (q/o, down, k/v: 128 programs before split-K); x^T is re-read from L2 by every program, 1.78·BM/BN
    of the weight bytes, so BLOCK_N stays >= 2·BLOCK_M. 256 dense columns per step (BKG 64), 3 stages of
    cp.async; SASS (triton 3.6, sm_90): 6.1-7.0 lane-instructions per dense weight, no spills (kernels/NOTES.md)."""
    groups = k // 4
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    if block_m <= 16 and -(-n // 64) < 1.5 * sms:
        block_n, warps = 32, 2
    else:
        block_n, warps = 64, 4
    bkg = min(64 if block_m <= 32 else 32, max(8, triton.next_power_of_2(groups)))
    programs = -(-n // block_n) * -(-m // block_m)
    split = _split_for_warps(programs, warps, -(-groups // bkg), sms)
    return LaunchConfig(block_n=block_n, block_k=4 * bkg, block_m=block_m, num_warps=warps, num_stages=3,
                        split_k=split)


def _bgemv_default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    groups = k // 4
    block_m = max(1, min(16, triton.next_power_of_2(m)))
    block_n = 8 if block_m <= 2 else 4
    bkg = min(128 if block_m <= 2 else 64, max(2, triton.next_power_of_2(groups)))
    split = _split_for(-(-n // block_n) * -(-m // block_m), -(-groups // bkg), sms)
    return LaunchConfig(block_n=block_n, block_k=4 * bkg, block_m=block_m, num_warps=4, split_k=split)


def _dot_default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    """Tile sizes from the sm_90 SASS (triton 3.9, compile only): loop instructions per dense weight 9.1 for
    [BN 128, BM 16, 8 warps], 10.9 for [64, 16, 4 warps], 14.6 for [64, 32, BKG 32, 4 warps]; [64, 32, BKG 64,
    4 warps] spills (255 registers)."""
    groups = k // 4
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    if block_m == 16:
        block_n, bkg, warps = (128, 64, 8) if -(-n // 128) * 2 >= sms else (64, 64, 4)
    else:
        block_n, bkg, warps = 64, 32, 4
    bkg = min(bkg, max(16, triton.next_power_of_2(groups)))
    split = _split_for(-(-n // block_n) * -(-m // block_m), -(-groups // bkg), sms)
    return LaunchConfig(block_n=block_n, block_k=4 * bkg, block_m=block_m, num_warps=warps, num_stages=2,
                        split_k=split)


_DEFAULTS = {"mma": _mma_default, "mma_xa": _mma_default, "xsel": _bgemv_default, "planes": _bgemv_default,
             "dot": _dot_default}


def default_config(m: int, n: int, k: int, sms: int) -> tuple[str, LaunchConfig | None]:
    """The untuned choice: "mma" for every M <= DOT_M when in_features % 32 == 0, else "xsel" (M <= 4), "planes"
    (M < 16), "dot" (M <= DOT_M); "dense" above DOT_M."""
    if m > DOT_M:
        return "dense", None
    if mma_supported(k):
        return "mma", _mma_default(m, n, k, sms)
    if m >= DOT_MIN_M:
        return "dot", _dot_default(m, n, k, sms)
    return ("xsel" if m <= XSEL_MAX_M else "planes"), _bgemv_default(m, n, k, sms)


def choose(m: int, n: int, k: int, device: torch.device) -> tuple[str, LaunchConfig | None]:
    key = device_key(device)
    for dev in (key, SIBLING.get(key)):
        hit = TUNED.get((dev, m_bucket(m), n, k))
        if hit is not None:
            hit = dict(hit)
            kind = hit.pop("kernel")
            return kind, (LaunchConfig(**hit) if hit else None)
    return default_config(m, n, k, sm_count(device))


def _check(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> None:
    n, half = values.shape
    if x2.shape[1] != 2 * half or meta.shape != (n, half // 4) or meta.dtype != torch.uint8 or half % 4:
        raise ValueError(f"sparse24: x [M, {x2.shape[1]}], values {tuple(values.shape)}, meta {tuple(meta.shape)} "
                         f"{meta.dtype} do not describe one [N, K] weight (values [N, K/2], meta uint8 [N, K/8])")
    if values.stride(-1) != 1 or meta.stride(-1) != 1 or values.stride(0) % 2 or values.data_ptr() % 4:
        raise ValueError("sparse24: values and meta must be row-contiguous, values rows 4-byte aligned")


# "mma" with split-K: the last program of each output tile adds the partials (no second launch). Counters are
# shared per device: launches on one device must not overlap (one stream), else set this False (two launches).
MMA_FIXUP = True
_TILE_COUNTERS: dict = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's zeroed int32 tile counters (>= tiles), or None while a CUDA graph is being captured and none
    exist yet (a buffer made then would live in the graph's pool): that launch reduces in a second kernel."""
    buf = _TILE_COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(4096, tiles), dtype=torch.int32, device=device)
        _TILE_COUNTERS[device] = buf
    return buf


def mma_supported(k: int) -> bool:
    """The "mma" kernel reads the meta as int32 words (8 groups each), so a meta row must be whole words."""
    return k % 32 == 0


def _launcher(kernel, grid, compile_only: bool):
    """kernel[grid], or its compile-only warmup (same argument specialisation, nothing launched)."""
    return functools.partial(kernel.warmup, grid=grid) if compile_only else kernel[grid]


def sparse24_launch(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],
                    kind: str, cfg: LaunchConfig | None = None, out: torch.Tensor | None = None,
                    compile_only: bool = False) -> torch.Tensor | None:
    """One launch of `kind` (one of KINDS but "dense") on x2 [M, K] -> [M, N] (x2's dtype). compile_only: compile
    the kernel for exactly these arguments (Triton's warmup: into its on-disk cache) and launch nothing."""
    _check(x2, values, meta)
    m, k = x2.shape
    n = values.shape[0]
    if kind not in KINDS[:-1]:
        raise ValueError(f"sparse24: unknown kernel kind {kind!r}; accepted: {', '.join(KINDS[:-1])}")
    if cfg is None:
        cfg = _DEFAULTS[kind](m, n, k, sm_count(x2.device))
    groups = k // 4
    bkg = cfg.block_k // 4
    mma = kind in ("mma", "mma_xa")
    min_bkg = 8 if mma else 2
    if bkg < min_bkg or bkg & (bkg - 1) or cfg.block_k % 4:
        raise ValueError(f"sparse24: block_k must be 4 x a power of two >= {min_bkg} for {kind}, got {cfg.block_k}")
    if mma and not mma_supported(k):
        raise ValueError(f"sparse24: the mma kernel needs in_features % 32 == 0 (whole meta words), got {k}")
    steps, split = split_plan(groups, bkg, cfg.split_k)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    dst = y if split == 1 else torch.empty(split, m, n, device=x2.device, dtype=torch.float32)
    words = values.view(torch.int32)  # [N, K/4]: one word = one group's two values
    mt = meta.view(torch.int32) if mma else meta  # [N, K/32]: one word = 8 groups' positions
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    common = dict(HAS_BIAS=bias is not None, EVEN=groups == split * steps * bkg, SPLIT=split,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BKG=bkg, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    args = (x2, words, mt, bias if bias is not None else words, dst, m, n, groups, steps, x2.stride(0),
            words.stride(0), mt.stride(0), y.stride(0))
    run = functools.partial(_launcher, grid=grid, compile_only=compile_only)
    if mma:
        fixup = split > 1 and MMA_FIXUP
        counters = _tile_counters(x2.device, grid[0] * grid[1]) if fixup and not compile_only else None
        fixup = fixup and (counters is not None or compile_only)
        run(_s24_mma)(*args, y, counters if counters is not None else words, FIXUP=fixup, XPAD=m % cfg.block_m != 0,
                      X_AS_A=kind == "mma_xa", INTERPRET=interpreting(), **common)
        if fixup:
            return None if compile_only else y
    elif kind == "dot":
        run(_s24_dot)(*args, INTERPRET=interpreting(), **common)
    else:
        run(_s24_bgemv)(*args, IS_BF16=x2.dtype == torch.bfloat16, XSEL=kind == "xsel", ACC3=cfg.acc3, **common)
    if compile_only:
        return None
    if split > 1:
        splitk_reduce(dst, bias, y)
    return y


def sparse24_linear_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    x2 = flatten(x)
    m, n = x2.shape[0], values.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    kind, cfg = choose(m, n, x2.shape[1], x2.device)
    if kind == "dense":
        y = F.linear(x2, decompress_24(values, meta), bias)
    else:
        y = sparse24_launch(x2, values, meta, bias, kind, cfg)
    return y.view(*x.shape[:-1], n)


def kernel_supported(x: torch.Tensor, values: torch.Tensor) -> bool:
    """The op runs a Triton kernel for this input (else the torch reference)."""
    return use_triton(x) and values.dtype == x.dtype


# ---------------------------------------------------------------------------------------------------------------
# the op: one opaque node for torch.compile; Triton on CUDA (and under TRITON_INTERPRET=1), the reference elsewhere
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("hf_accel::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ W.T + bias, W the 2:4 sparse weight stored as (values, meta) (format: module docstring)."""
    if kernel_supported(x, values):
        return sparse24_linear_triton(x, values, meta, None if bias is None else bias.to(x.dtype))
    return sparse24_linear_ref(x, values, meta, bias)


@sparse24_linear.register_fake
def _(x, values, meta, bias):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _setup(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(values, meta)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):  # gradients for x and bias (the weights are frozen)
    values, meta = ctx.saved_tensors
    gx = grad @ decompress_24(values, meta).to(grad.dtype)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return gx, None, None, gb


sparse24_linear.register_autograd(_backward, setup_context=_setup)
