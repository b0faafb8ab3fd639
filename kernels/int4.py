"""int4 weight-only, group-wise asymmetric (W4A16): packing, plain-torch reference, Triton kernels, the op.

Values: `q` in [0, 15] per weight, per (row, group of G consecutive k) a `scale` s and a float `zero` z:
    w[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]
K is padded with zero weights to a multiple of G (`in_features` keeps the true K; x is never padded).

Packing (`pack_int4`), chosen for the kernel: `qweight` int32 [N, Kp / 8], row-major. Each group of G weights of
a row is G/8 words; nibble i (bits 4i..4i+3) of word j of group g holds k = g*G + i*(G/8) + j. So "plane" i of a
group (nibble i of every word) is a *contiguous* run of G/8 weights: the kernel extracts plane i from whole 32-bit
words with a shift and an and/or (no byte unpacking) and multiplies it by a contiguous slice of x (vector loads);
a group's words are one contiguous 16/32/64-byte run (16-byte loads).

Kernels:
- `_int4_gemv` (batch 1): a [BLOCK_N, GROUPS, G/8] tile of words per step. Nibble -> float without the conversion
  unit (16 conversions/clock/SM on Hopper would cap int4 at ~2 TB/s): (nibble << 16) | 0x43000000 is the fp32
  value 128 + q, exactly. Per group the kernel sums (128 + q) * x and applies the group's scale and zero once:
      sum_k s (q - z) x  =  s * (sum_k (128 + q) x  -  (128 + z) * sum_k x)
  so each weight costs a shift, an and/or and one FMA; scale, zero and sum_k x once per group.
- `_int4_dot` (batches 2..64): the dequantised tile (bf16) is the MMA's A operand, x^T the B operand; one dot per
  plane.
- `_int4_dequant`: to x.dtype for the prefill path (then cuBLAS).
Measured on the H100 and what was tried after (a chunk-interleaved layout that was slower on triton 3.6):
kernels/NOTES.md.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ._base import (HAS_TRITON, LaunchConfig, bgemv_default, choose, dot, flatten, interpreting, sm_count, split_plan,
                    splitk_reduce, use_triton)

GROUP_SIZES = (32, 64, 128)


# ---------------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------------
def padded_k(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """q: integers in [0, 15], [N, Kp] with Kp a multiple of group_size -> int32 [N, Kp / 8] (layout above)."""
    n, kp = q.shape
    if kp % group_size or group_size % 8:
        raise ValueError(f"pack_int4: K={kp} must be a multiple of group_size={group_size} (itself a multiple of 8)")
    planes = q.to(torch.int64).reshape(n, kp // group_size, 8, group_size // 8)  # [N, group, i, j]
    shifts = (4 * torch.arange(8, device=q.device, dtype=torch.int64)).view(1, 1, 8, 1)
    words = (planes << shifts).sum(dim=2)  # [N, group, j], < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).reshape(n, kp // 8)


def unpack_int4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of pack_int4: int32 [N, Kp / 8] -> uint8 [N, Kp]."""
    n, kw = qweight.shape
    words = qweight.to(torch.int64).reshape(n, kw * 8 // group_size, 1, group_size // 8)
    shifts = (4 * torch.arange(8, device=qweight.device, dtype=torch.int64)).view(1, 1, 8, 1)
    return ((words >> shifts) & 0xF).to(torch.uint8).reshape(n, kw * 8)


# ---------------------------------------------------------------------------------------------------------------
# plain-torch reference
# ---------------------------------------------------------------------------------------------------------------
def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = qweight.shape[0]
    q = unpack_int4(qweight, group_size).reshape(n, -1, group_size).to(torch.float32)
    w = (q - zeros.to(torch.float32)[:, :, None]) * scales.to(torch.float32)[:, :, None]
    return w.reshape(n, -1)[:, :in_features].to(dtype)


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bias: Optional[torch.Tensor], group_size: int, in_features: int) -> torch.Tensor:
    w = int4_dequantize(qweight, scales, zeros, group_size, in_features, x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    _dot = dot

    @triton.jit
    def _plane(w, I: tl.constexpr):
        """Nibble I of every int32 word -> fp32 128 + q (exact): the nibble moved to bits 16..19 under 0x43000000."""
        if I < 4:
            b = w << (16 - 4 * I)
        elif I == 4:
            b = w
        else:
            b = w >> (4 * I - 16)
        return ((b & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _int4_gemv(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, NG, stride_xm, stride_ym,
                   G: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                   BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        WPG: tl.constexpr = G // 8  # words per group = weights per plane per group
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.where(rn < N, rn, 0)  # rows past N re-read row 0 (in bounds) instead of masking every load
        rg = tl.arange(0, GROUPS)
        rj = tl.arange(0, WPG)
        row = rn_in.to(tl.int64) * (NG * WPG)
        w_ptrs = w_ptr + row[:, None, None] + rg[None, :, None] * WPG + rj[None, None, :]  # [BN, GROUPS, WPG]
        sz_offs = rn_in[:, None].to(tl.int64) * NG + rg[None, :]  # [BN, GROUPS]
        x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + rg[:, None] * G + rj[None, :]  # plane 0, [GROUPS, WPG]
        acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
        for g0 in range(0, NG, GROUPS):
            if EVEN:  # NG % GROUPS == 0 and K == NG * G
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                s = tl.load(s_ptr + sz_offs).to(tl.float32)
                z = tl.load(z_ptr + sz_offs).to(tl.float32)
            else:
                g_in = (g0 + rg) < NG
                w = tl.load(w_ptrs, mask=g_in[None, :, None], other=0, eviction_policy="evict_first")
                s = tl.load(s_ptr + sz_offs, mask=g_in[None, :], other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sz_offs, mask=g_in[None, :], other=0.0).to(tl.float32)
            t = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
            xsum = tl.zeros([GROUPS, WPG], dtype=tl.float32)
            for i in tl.static_range(8):
                if EVEN:
                    xi = tl.load(x_ptrs + i * WPG).to(tl.float32)
                else:
                    kk = (g0 + rg[:, None]) * G + i * WPG + rj[None, :]
                    xi = tl.load(x_ptrs + i * WPG, mask=kk < K, other=0.0).to(tl.float32)
                t += _plane(w, i) * xi[None, :, :]
                xsum += xi
            acc += s * (tl.sum(t, axis=2) - (128.0 + z) * tl.sum(xsum, axis=1)[None, :])
            w_ptrs += GROUPS * WPG
            sz_offs += GROUPS
            x_ptrs += GROUPS * G
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn_in).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _int4_dot(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, NG, stride_xm, stride_ym,
                  G: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  INTERPRET: tl.constexpr):
        WPG: tl.constexpr = G // 8
        BKW: tl.constexpr = BLOCK_K // 8  # words per row per step; BLOCK_K is a multiple of G
        GPS: tl.constexpr = BLOCK_K // G  # groups per step
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)
        rm_in = tl.where(rm < M, rm, 0)
        rw = tl.arange(0, BKW)
        gw = rw // WPG  # group of each word column (within the step)
        kw = gw * G + rw % WPG  # k of plane 0 of each word column (within the step)
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * (NG * WPG) + rw[None, :]  # [BN, BKW]
        sz_offs = rn_in[:, None].to(tl.int64) * NG + gw[None, :]  # [BN, BKW], repeats within a group
        x_ptrs = x_ptr + rm_in[None, :].to(tl.int64) * stride_xm + kw[:, None]  # [BKW, BM] = x^T, plane 0
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, NG * G, BLOCK_K):
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                s = tl.load(s_ptr + sz_offs).to(tl.float32)
                z = tl.load(z_ptr + sz_offs).to(tl.float32)
            else:
                g_in = (k0 // G + gw) < NG
                w = tl.load(w_ptrs, mask=g_in[None, :], other=0, eviction_policy="evict_first")
                s = tl.load(s_ptr + sz_offs, mask=g_in[None, :], other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sz_offs, mask=g_in[None, :], other=0.0).to(tl.float32)
            zs = (128.0 + z) * s
            for i in tl.static_range(8):
                if EVEN:
                    xt = tl.load(x_ptrs + i * WPG)
                else:
                    xt = tl.load(x_ptrs + i * WPG, mask=(k0 + kw + i * WPG < K)[:, None], other=0.0)
                a = (_plane(w, i) * s - zs).to(xt.dtype)
                acc = _dot(a, xt, acc, INTERPRET)
            w_ptrs += BKW
            sz_offs += GPS
            x_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_in).to(tl.float32)[:, None]
        y_ptrs = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (rm < M)[None, :])

    @triton.jit
    def _int4_dequant(w_ptr, s_ptr, z_ptr, out_ptr, N, K, NG, G: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUPS: tl.constexpr):
        """out[n, k] for k < K, one [BLOCK_N, GROUPS] block of groups per program, written plane by plane."""
        WPG: tl.constexpr = G // 8
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rg = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        rj = tl.arange(0, WPG)
        ok = (rn < N)[:, None] & (rg < NG)[None, :]
        w = tl.load(w_ptr + rn[:, None, None].to(tl.int64) * (NG * WPG) + rg[None, :, None] * WPG + rj[None, None, :],
                    mask=ok[:, :, None], other=0)
        s = tl.load(s_ptr + rn[:, None].to(tl.int64) * NG + rg[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None].to(tl.int64) * NG + rg[None, :], mask=ok, other=0.0).to(tl.float32)
        zs = (128.0 + z) * s
        for i in tl.static_range(8):
            k = rg[None, :, None] * G + i * WPG + rj[None, None, :]
            v = _plane(w, i) * s[:, :, None] - zs[:, :, None]
            tl.store(out_ptr + rn[:, None, None].to(tl.int64) * K + k, v.to(out_ptr.dtype.element_ty),
                     mask=ok[:, :, None] & (k < K))


    @triton.jit
    def _int4_bgemv(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, NG, STEPS, stride_xm, stride_ym,
                    G: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr,
                    ACC3: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BKW: tl.constexpr):
        """v3 GEMV (kernels/NOTES.md, "Next"): a 2-D [BLOCK_N, BKW] tile of words, contiguous along dim 1 (the
        layout order is unambiguous), BLOCK_M rows of x per program reusing each decoded tile, the scale and zero
        applied per word after the 8 planes: s * (sum_i (128 + q_i) x_i - (128 + z) * sum_i x_i). With SPLIT > 1,
        program (n, m, s) covers STEPS steps of K and writes fp32 partials [SPLIT, M, N] (reduced by
        `_base.splitk_reduce`)."""
        WPG: tl.constexpr = G // 8
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        KW = NG * WPG  # words per row
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)
        rm_in = tl.where(rm < M, rm, 0)
        rw = tl.arange(0, BKW)
        w_first = pid_k * STEPS * BKW
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * KW + (w_first + rw)[None, :]  # [BN, BKW]
        x_row = x_ptr + rm_in[:, None].to(tl.int64) * stride_xm  # [BM, 1]
        sz_row = rn_in[:, None].to(tl.int64) * NG  # [BN, 1]
        if ACC3:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BKW], dtype=tl.float32)
        else:
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in range(0, STEPS):
            gw = w_first + step * BKW + rw  # global word index along the row
            grp = gw // WPG
            kx = grp * G + gw % WPG  # k of plane 0 of each word
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                s = tl.load(s_ptr + sz_row + grp[None, :]).to(tl.float32)
                z = tl.load(z_ptr + sz_row + grp[None, :]).to(tl.float32)
            else:
                w_ok = gw < KW
                w = tl.load(w_ptrs, mask=w_ok[None, :], other=0, eviction_policy="evict_first")
                s = tl.load(s_ptr + sz_row + grp[None, :], mask=w_ok[None, :], other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sz_row + grp[None, :], mask=w_ok[None, :], other=0.0).to(tl.float32)
            t = tl.zeros([BLOCK_M, BLOCK_N, BKW], dtype=tl.float32)
            xs = tl.zeros([BLOCK_M, BKW], dtype=tl.float32)
            for i in tl.static_range(8):
                if EVEN:
                    xi = tl.load(x_row + (kx + i * WPG)[None, :]).to(tl.float32)
                else:
                    xi = tl.load(x_row + (kx + i * WPG)[None, :], mask=((kx + i * WPG < K) & (gw < KW))[None, :],
                                 other=0.0).to(tl.float32)
                t += _plane(w, i)[None, :, :] * xi[:, None, :]
                xs += xi
            part = s[None, :, :] * (t - (128.0 + z)[None, :, :] * xs[:, None, :])
            if ACC3:
                acc += part
            else:
                acc2 += tl.sum(part, axis=2)
            w_ptrs += BKW
        if ACC3:
            y = tl.sum(acc, axis=2)  # [BM, BN]
        else:
            y = acc2
        ok = (rm < M)[:, None] & (rn < N)[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                y += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
        else:  # fp32 partials [SPLIT, M, N], contiguous
            tl.store(y_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :], y, mask=ok)


    # -- v4 "gemv2": dequantise and multiply-add on packed bf16 pairs (kernels/NOTES.md, "int4 GEMV v4") ----------
    @triton.jit
    def _bf16_rne(a, b):
        """Bits (int32, low 16 zero) of bf16(a + b) rounded once to nearest even, a and b fp32: what one bf16x2
        add/fma lane computes when a is its (exact) product. TwoSum gives the fp32 sum s and its exact error e; s
        rounds to bf16 like a + b does except at an exact bf16 midpoint, where e (not the parity) decides."""
        s = a + b
        bp = s - a
        ap = s - bp
        e = (a - ap) + (b - bp)
        bits = s.to(tl.int32, bitcast=True)
        lo = bits & 0xFFFF
        tie_up = tl.where(e == 0.0, ((bits >> 16) & 1) == 1, (e > 0.0) == (s > 0.0))
        up = (lo > 0x8000) | ((lo == 0x8000) & tie_up)
        return (bits & -65536) + tl.where(up, 65536, 0)

    @triton.jit
    def _lo(p):
        """Low bf16 of a bf16x2 word as fp32 (exact)."""
        return (p << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _hi(p):
        """High bf16 of a bf16x2 word as fp32 (exact)."""
        return (p & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _join(lo_bits, hi_bits):
        """Two results of _bf16_rne -> one bf16x2 word (lo in bits 0..15)."""
        return hi_bits | ((lo_bits >> 16) & 0xFFFF)

    @triton.jit
    def _sub2(a, b, ASM: tl.constexpr):
        """a - b on bf16x2 words (sub.rn.bf16x2; here always exact: small integers)."""
        if ASM:
            return tl.inline_asm_elementwise("sub.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return _join(_bf16_rne(_lo(a), -_lo(b)), _bf16_rne(_hi(a), -_hi(b)))

    @triton.jit
    def _add2(a, b, ASM: tl.constexpr):
        """a + b on bf16x2 words, each lane rounded once (add.rn.bf16x2)."""
        if ASM:
            return tl.inline_asm_elementwise("add.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return _join(_bf16_rne(_lo(a), _lo(b)), _bf16_rne(_hi(a), _hi(b)))

    @triton.jit
    def _fma2(a, b, c, ASM: tl.constexpr):
        """a * b + c on bf16x2 words, each lane rounded once (fma.rn.bf16x2, sm_90). The emulation relies on
        a * b being exact in fp32: here a is an integer below 256 in magnitude (8 bits) and b a bf16 (8 bits)."""
        if ASM:
            return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return _join(_bf16_rne(_lo(a) * _lo(b), _lo(c)), _bf16_rne(_hi(a) * _hi(b), _hi(c)))

    @triton.jit
    def _mul2(a, b, ASM: tl.constexpr):
        """a * b on bf16x2 words, each lane rounded once (mul.rn.bf16x2); a * b exact in fp32 (see _fma2)."""
        if ASM:
            return tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return _join(_bf16_rne(_lo(a) * _lo(b), -0.0), _bf16_rne(_hi(a) * _hi(b), -0.0))

    @triton.jit
    def _nib2(w, I: tl.constexpr, ASM: tl.constexpr):
        """Nibbles I and I + 4 of every word as a bf16x2 word (128 + q, 128 + q'): ((w >> 4I) & 0x000F000F) |
        0x43004300, one LOP3 (the compiler splits the and/or into two when it sees them)."""
        if I == 0:
            v = w
        else:
            v = w >> (4 * I)
        if ASM:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r", [v],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return (v & 0x000F000F) | 0x43004300

    @triton.jit
    def _zero_pair(zf, ASM: tl.constexpr):
        """fp32 zero point z -> bf16x2 word with both lanes 128 + rne(z) (exact for -128 < z < 127.5)."""
        if ASM:
            t = zf + 128.0
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,r", [t], dtype=tl.int32,
                                             is_pure=True, pack=1)
        r = ((zf + 128.0) + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds to an integer, ties to even
        b = r.to(tl.int32, bitcast=True) & -65536
        return b | ((b >> 16) & 0xFFFF)

    @triton.jit
    def _x_pair(xlo, xhi):
        """Two bf16 tiles -> bf16x2 words (xlo in bits 0..15)."""
        lo = xlo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi = xhi.to(tl.int16, bitcast=True).to(tl.int32) << 16
        return hi | lo

    @triton.jit
    def _ld16(ptrs, ASM: tl.constexpr):
        """A bf16 tile -> fp32. ASM: as inline-PTX loads, which the layout passes do not anchor, so the tile is
        loaded directly in the layout its consumer needs (a tl.load of these [GROUPS, BN] scales gets its own
        layout and a shared-memory conversion with barriers every step)."""
        if ASM:
            b = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs], dtype=tl.int16,
                                          is_pure=True, pack=1)
            return b.to(tl.bfloat16, bitcast=True).to(tl.float32)
        return tl.load(ptrs).to(tl.float32)

    @triton.jit
    def _x_pair2(x_ptrs, kx, K, I: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr):
        """x of nibbles I and I + 4 of every word column as bf16x2 words."""
        if EVEN:
            xl = tl.load(x_ptrs + I * WPG)
            xh = tl.load(x_ptrs + (I + 4) * WPG)
        else:
            xl = tl.load(x_ptrs + I * WPG, mask=kx + I * WPG < K, other=0.0)
            xh = tl.load(x_ptrs + (I + 4) * WPG, mask=kx + (I + 4) * WPG < K, other=0.0)
        return _x_pair(xl, xh)

    @triton.jit
    def _int4_gemv2(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, NG, stride_xm, stride_ym,
                    G: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUPS: tl.constexpr, CHAIN: tl.constexpr, ASM: tl.constexpr):
        """v4 GEMV, one x row per program row (grid (N / BLOCK_N, M)): a [GROUPS, BLOCK_N, G/8] tile of words per
        step. Groups before rows on purpose: Triton 3.6 orders the two non-contiguous dimensions by position, so
        the threads spread over groups and words and every thread keeps all BLOCK_N rows of its words, reusing its
        packed x for each (rows across threads, as in v1, would send x through shared memory).
        Per word, one lop3 per pair of nibbles (i, i + 4): ((w >> 4i) & 0x000F000F) | 0x43004300 = two bf16
        128 + q; one bf16x2 subtract of 128 + rne(z) (exact) gives q - zi for both; one bf16x2 fma accumulates
        (q - zi) * x with x packed as (x[i], x[i + 4]) pairs. After CHAIN fmas a bf16x2 accumulator is flushed
        to fp32 (both lanes), and per word the group's scale and the zero's fractional part are applied in fp32:
            acc += s * (sum_pairs (q - zi) x  +  (zi - z) * sum_word x)
        (sum_word x: the word's 8 x as a bf16x2 add tree, shared by the BLOCK_N rows). ASM: the bf16x2 ops as
        inline PTX (sm_90); else the same roundings emulated in fp32 (bit-identical, the interpreter's path)."""
        WPG: tl.constexpr = G // 8
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.where(rn < N, rn, 0)
        rg = tl.arange(0, GROUPS)
        rj = tl.arange(0, WPG)
        row = rn_in.to(tl.int64) * (NG * WPG)
        w_ptrs = w_ptr + rg[:, None, None] * WPG + row[None, :, None] + rj[None, None, :]  # [GROUPS, BN, WPG]
        sz_offs = rg[:, None] + rn_in[None, :] * NG  # [GROUPS, BN], int32: N * NG < 2^31 (host check)
        x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + rg[:, None] * G + rj[None, :]  # nibble 0, [GROUPS, WPG]
        acc = tl.zeros([GROUPS, BLOCK_N, WPG], dtype=tl.float32)
        for g0 in range(0, NG, GROUPS):
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                sf = _ld16(s_ptr + sz_offs, ASM)
                zf = _ld16(z_ptr + sz_offs, ASM)
                kx = rg[:, None] * G  # unused
            else:
                g_in = (g0 + rg) < NG
                w = tl.load(w_ptrs, mask=g_in[:, None, None], other=0, eviction_policy="evict_first")
                sz_in = tl.where(g_in[:, None], sz_offs, sz_offs - (g0 + rg[:, None]))  # past NG: group 0
                sf = tl.where(g_in[:, None], _ld16(s_ptr + sz_in, ASM), 0.0)
                zf = tl.where(g_in[:, None], _ld16(z_ptr + sz_in, ASM), 0.0)
                kx = (g0 + rg[:, None]) * G + rj[None, :]
            xp0 = _x_pair2(x_ptrs, kx, K, 0, WPG, EVEN)[:, None, :]
            xp1 = _x_pair2(x_ptrs, kx, K, 1, WPG, EVEN)[:, None, :]
            xp2 = _x_pair2(x_ptrs, kx, K, 2, WPG, EVEN)[:, None, :]
            xp3 = _x_pair2(x_ptrs, kx, K, 3, WPG, EVEN)[:, None, :]
            xs2 = _add2(_add2(xp0, xp1, ASM), _add2(xp2, xp3, ASM), ASM)
            xsum = _lo(xs2) + _hi(xs2)  # [GROUPS, 1, WPG] fp32: the word's 8 x (rounded in bf16 on the way)
            zp = _zero_pair(zf, ASM)[:, :, None]  # [GROUPS, BN, 1]
            corr = ((_lo(zp) - 128.0) - zf[:, :, None])  # zi - z, exact
            # CHAIN fmas per bf16x2 accumulator, then both lanes to fp32 (t); a chain starts with a multiply
            p = _mul2(_sub2(_nib2(w, 0, ASM), zp, ASM), xp0, ASM)  # nibbles 0 and 4
            if CHAIN == 1:
                t = _lo(p) + _hi(p)
                p = _mul2(_sub2(_nib2(w, 1, ASM), zp, ASM), xp1, ASM)  # 1 and 5
            else:
                p = _fma2(_sub2(_nib2(w, 1, ASM), zp, ASM), xp1, p, ASM)
            if CHAIN == 1:
                t += _lo(p) + _hi(p)
            if CHAIN == 2:
                t = _lo(p) + _hi(p)
            if CHAIN <= 2:
                p = _mul2(_sub2(_nib2(w, 2, ASM), zp, ASM), xp2, ASM)  # 2 and 6
            else:
                p = _fma2(_sub2(_nib2(w, 2, ASM), zp, ASM), xp2, p, ASM)
            if CHAIN == 1:
                t += _lo(p) + _hi(p)
                p = _mul2(_sub2(_nib2(w, 3, ASM), zp, ASM), xp3, ASM)  # 3 and 7
            else:
                p = _fma2(_sub2(_nib2(w, 3, ASM), zp, ASM), xp3, p, ASM)
            if CHAIN == 4:
                t = _lo(p) + _hi(p)
            else:
                t += _lo(p) + _hi(p)
            acc += sf[:, :, None] * (t + corr * xsum)
            w_ptrs += GROUPS * WPG
            sz_offs += GROUPS
            x_ptrs += GROUPS * G
        y = tl.sum(tl.sum(acc, axis=2), axis=0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn_in).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


# ---------------------------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------------------------
TUNED: dict = {}  # filled from tuned.py


def _fmt(group_size: int) -> str:
    return f"int4g{group_size}"


def _gemv_default(group_size: int):
    def default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
        groups = max(1, min(1024 // group_size, triton.next_power_of_2(-(-k // group_size))))  # <= 512 B per row
        block_n = 16
        while block_n > 2 and -(-n // block_n) < 2 * sms:
            block_n //= 2
        words = block_n * groups * group_size // 8
        return LaunchConfig(block_n=block_n, block_k=groups * group_size, num_warps=max(1, min(4, words // 128)))

    return default


def _dot_default(group_size: int):
    def default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
        block_m = max(16, min(64, triton.next_power_of_2(m)))
        block_n = 32 if -(-n // 32) >= sms else 16
        return LaunchConfig(block_n=block_n, block_k=max(128, group_size), block_m=block_m, num_warps=4)

    return default


def int4_gemv(x2, qweight, scales, zeros, bias, group_size: int, cfg: LaunchConfig | None = None, out=None):
    """One program row per x row (block_m is 1): each row of x streams the weights (L2 may catch repeats)."""
    m, k = x2.shape
    n, ng = scales.shape
    cfg = cfg or _gemv_default(group_size)(m, n, k, sm_count(x2.device))
    groups = cfg.block_k // group_size
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    grid = (triton.cdiv(n, cfg.block_n), m)
    _int4_gemv[grid](x2, qweight, scales, zeros, bias if bias is not None else scales, y, n, k, ng,
                     x2.stride(0), y.stride(0), G=group_size, HAS_BIAS=bias is not None,
                     EVEN=ng % groups == 0 and k == ng * group_size, BLOCK_N=cfg.block_n, GROUPS=groups,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


GEMV2_CHAIN = 4  # bf16x2 fmas per accumulator before its flush to fp32 (kernels/NOTES.md, "int4 GEMV v4": error)


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def gemv2_asm(device: torch.device) -> bool:
    """The inline-PTX path: CUDA on sm_90+ (sub/add.rn.bf16x2 need sm_90), never under the interpreter."""
    return device.type == "cuda" and not interpreting() and _sm90(device.index if device.index is not None else
                                                                   torch.cuda.current_device())


def int4_gemv2(x2, qweight, scales, zeros, bias, group_size: int, cfg: LaunchConfig | None = None, out=None,
               asm: bool | None = None, chain: int = GEMV2_CHAIN):
    """The v4 GEMV (packed bf16x2 dequantisation and multiply-add): one program row per x row, cfg.block_k /
    group_size groups per row per step (a power of 2). Experimental: only a tuned entry / LaunchConfig selects it."""
    m, k = x2.shape
    n, ng = scales.shape
    cfg = cfg or LaunchConfig(block_n=8, block_k=4096, num_warps=4)
    groups = max(1, cfg.block_k // group_size)
    asm = gemv2_asm(x2.device) if asm is None else asm
    assert n * ng < 2**31, "int4_gemv2: scale offsets are int32"
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    grid = (triton.cdiv(n, cfg.block_n), m)
    _int4_gemv2[grid](x2, qweight, scales, zeros, bias if bias is not None else scales, y, n, k, ng,
                      x2.stride(0), y.stride(0), G=group_size, HAS_BIAS=bias is not None,
                      EVEN=ng % groups == 0 and k == ng * group_size, BLOCK_N=cfg.block_n, GROUPS=groups, CHAIN=chain,
                      ASM=asm, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def int4_bgemv(x2, qweight, scales, zeros, bias, group_size: int, cfg: LaunchConfig | None = None, out=None):
    """The v3 kernel: block_m rows of x per program (decode batches 1..16), optional split-K. cfg.block_k is in
    weights (block_k / 8 words per step; any multiple of 8, independent of the group)."""
    m, k = x2.shape
    n, ng = scales.shape
    cfg = cfg or bgemv_default(m, n, sm_count(x2.device), block_k=512)
    bkw = max(1, cfg.block_k // 8)
    kw = ng * group_size // 8
    steps, split = split_plan(kw, bkw, cfg.split_k)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    even = k == ng * group_size and kw == split * steps * bkw
    dst = y if split == 1 else torch.empty(split, m, n, device=x2.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _int4_bgemv[grid](x2, qweight, scales, zeros, bias if bias is not None else scales, dst, m, n, k, ng, steps,
                      x2.stride(0), y.stride(0), G=group_size, HAS_BIAS=bias is not None, EVEN=even, SPLIT=split,
                      ACC3=cfg.acc3, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BKW=bkw,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        splitk_reduce(dst, bias, y)
    return y


def int4_dot(x2, qweight, scales, zeros, bias, group_size: int, cfg: LaunchConfig | None = None, out=None):
    m, k = x2.shape
    n, ng = scales.shape
    cfg = cfg or _dot_default(group_size)(m, n, k, sm_count(x2.device))
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _int4_dot[grid](x2, qweight, scales, zeros, bias if bias is not None else scales, y, m, n, k, ng,
                    x2.stride(0), y.stride(0), G=group_size, HAS_BIAS=bias is not None,
                    EVEN=(ng * group_size) % cfg.block_k == 0 and k == ng * group_size,
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, INTERPRET=interpreting(),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def int4_dequant(qweight, scales, zeros, group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    n, ng = scales.shape
    out = torch.empty(n, in_features, device=qweight.device, dtype=dtype)
    groups = max(1, 256 // group_size)
    grid = (triton.cdiv(n, 16), triton.cdiv(ng, groups))
    _int4_dequant[grid](qweight, scales, zeros, out, n, in_features, ng, G=group_size, BLOCK_N=16, GROUPS=groups,
                        num_warps=4)
    return out


def int4_linear_triton(x, qweight, scales, zeros, bias, group_size: int, in_features: int) -> torch.Tensor:
    x2 = flatten(x)
    m = x2.shape[0]
    n = qweight.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    kind, cfg = choose(TUNED, _fmt(group_size), m, n, x2.shape[1], x2.device, _gemv_default(group_size),
                       _dot_default(group_size))
    if kind == "gemv":
        y = int4_gemv(x2, qweight, scales, zeros, bias, group_size, cfg)
    elif kind == "gemv2":  # experimental v4, only where a tuned entry names it
        y = int4_gemv2(x2, qweight, scales, zeros, bias, group_size, cfg)
    elif kind == "bgemv":
        y = int4_bgemv(x2, qweight, scales, zeros, bias, group_size, cfg)
    elif kind == "dot":
        y = int4_dot(x2, qweight, scales, zeros, bias, group_size, cfg)
    else:
        y = F.linear(x2, int4_dequant(qweight, scales, zeros, group_size, in_features, x2.dtype), bias)
    return y.view(*x.shape[:-1], n)


@torch.library.custom_op("hf_accel::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: Optional[torch.Tensor], group_size: int, in_features: int) -> torch.Tensor:
    """y = x @ W.T + bias, W the int4 group-wise weight (see the module docstring for the layout)."""
    if use_triton(x):
        return int4_linear_triton(x, qweight, scales, zeros, bias, group_size, in_features)
    return int4_linear_ref(x, qweight, scales, zeros, bias, group_size, in_features)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, bias, group_size, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _int4_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bias, group_size, in_features = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.meta = (group_size, in_features, bias is not None)


def _int4_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    group_size, in_features, has_bias = ctx.meta
    gx = grad @ int4_dequantize(qweight, scales, zeros, group_size, in_features, grad.dtype)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None
    return gx, None, None, None, gb, None, None


int4_linear.register_autograd(_int4_backward, setup_context=_int4_setup)
