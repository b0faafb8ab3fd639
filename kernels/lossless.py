"""Lossless bf16 weights in ~11.6-12 bits: a fixed-rate exponent code with escapes, random access, bit-exact decode.

Two layouts, chosen per layer by the plugin (the smaller): "code4" below (12.03 bits/weight on the 8B shapes), and
"code3" (a 3-bit code for a window of 8 exponents, 11 bits + 32 per escape: ~11.63 bits at the 2% escapes of the
trained references' statistics; see `encode3` and the code3 kernels further down).

A bf16 weight is sign (1) | exponent (8) | mantissa (7). In a trained layer the exponents fill a narrow range
(entropy ~2.6 bits), so the format keeps sign + mantissa as one byte and replaces the exponent by a 4-bit code:

    code c in 0..15 -> exponent = base + c         (a per-layer window of 16 consecutive exponents)
    escapes         -> any other exponent (also 0: +-0 and subnormals; 255: inf/nan): the weight is stored exactly
                       (its 16 bits) in a per-row side list (CSR: row pointers, columns, values); in the dense
                       planes it is a placeholder (code 0, byte 0), which reads as P = 2^(base - 127)
Decoding is then branch- and select-free: fp32 bits = (sign|mantissa byte placed) + ((c + base) << 23).

Tensors of one layer (W [N, K], K even, H = K / 2):
    sm    uint8 [N, K]    sign << 7 | mantissa (0 at escapes)
    code  uint8 [N, H]    code[n, j] | code[n, j + H] << 4: byte j holds the codes of columns j and j + H, so a
                          kernel reading columns j0..j0+B of both halves loads every byte once, with no shuffle
    base  int32 [1]       the window's first exponent (1..239: 0 and 255 are never in the window)
    ptr   int32 [N + 1]   escapes of row n are entries ptr[n]:ptr[n+1] (row-major, ascending column)
    col   int32 [cap]     their columns; cap = capacity(N, K, max_escape_rate) depends on the shape only, so a
    val   int16 [cap]     saved layer's skeleton can be built before its weights load; val = the exact bf16 bits
Bytes per weight: 1 + 1/2 + (4 (N + 1) + 6 cap) / (N K): 12.03 bits (24.8% smaller) at the default 2^-11 escape
rate on the 8B shapes.

Kernels (Triton; each tested against the torch reference under TRITON_INTERPRET=1):
- `_ll_gemv` (M = 1 .. GEMV_M rows, one program row per x row): decodes a [BLOCK_N, 2 BLOCK_K] tile to fp32 in
  registers (exact: every bf16 is an fp32), fp32 FMA into a 2-D accumulator reduced once, then adds the row's
  escapes as (w - P) x[col] (w x[col] - P x[col], two FMAs) before the one rounding to bf16. No split-K:
  deterministic.
- `_ll_dot` (up to DOT_M rows): the decoded tile as bf16 (exact) is the MMA's A operand (swap AB), x^T the B one.
- `_ll_decode` + `_ll_scatter`: bf16 weights, bit-identical to the original, for the prefill path (then cuBLAS)
  and for `exact` layers.

What is bit-identical: the decoded weight, always (every bit pattern: +-0, subnormals, inf, NaN payloads). A
forward through decode + F.linear is bit-identical to the bf16 model's F.linear by construction (the CPU path, the
prefill path on CUDA, and every call with `exact=True`). The fused kernels compute the same products in fp32 but
in their own order (tile sums with the placeholders, then the escape corrections), so their bf16 outputs can differ
from cuBLAS's in the last bit (and an inf/nan activation meeting a placeholder gives nan).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ._base import HAS_TRITON, LaunchConfig, dot, flatten, interpreting, sm_count, triton_can_run

WINDOW = 16
MAX_BASE = 254 - WINDOW + 1  # base + 15 <= 254: inf/nan (255) are escapes; base >= 1: zeros/subnormals too
GEMV_M = int(os.environ.get("HF_ACCEL_LOSSLESS_GEMV_M", "1"))  # rows served by the GEMV kernel
DOT_M = int(os.environ.get("HF_ACCEL_LOSSLESS_DOT_M", "16"))  # rows served by the tensor-core kernel; above: decode
DEFAULT_MAX_ESCAPE_RATE = 2.0 ** -11


# ---------------------------------------------------------------------------------------------------------------
# format: analysis, encode, reference decode (torch; the CPU path and what the kernels are tested against)
# ---------------------------------------------------------------------------------------------------------------
def bf16_bits(w: torch.Tensor) -> torch.Tensor:
    """The 16 bits of a bf16 tensor as int32 in 0..65535."""
    if w.dtype != torch.bfloat16:
        raise TypeError(f"lossless encodes bf16 weights, got {w.dtype}")
    return w.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def exponent_histogram(w: torch.Tensor) -> torch.Tensor:
    """Counts of the 256 exponent values of a bf16 tensor (int64 [256])."""
    return torch.bincount(((bf16_bits(w) >> 7) & 0xFF).flatten(), minlength=256).cpu()


def best_window(hist: torch.Tensor, window: int = WINDOW) -> tuple[int, int]:
    """(base, covered): the window [base, base + window - 1] (1 <= base, base + window - 1 <= 254) covering the
    most weights. Ties go to the lower base."""
    h = hist.clone().to(torch.int64)
    h[0] = 0
    cs = torch.cat([torch.zeros(1, dtype=torch.int64), h.cumsum(0)])
    starts = torch.arange(1, 254 - window + 2)
    cover = cs[starts + window] - cs[starts]
    i = int(torch.argmax(cover))  # first maximum
    return int(starts[i]), int(cover[i])


def capacity(n: int, k: int, max_escape_rate: float) -> int:
    """Escape slots of an [n, k] layer: a function of the shape only (skeletons are built before loading)."""
    return max(1, math.ceil(n * k * max_escape_rate))


def escape_count(hist: torch.Tensor, base: int, window: int = WINDOW) -> int:
    h = hist.to(torch.int64)
    return int(h.sum() - h[base:base + window].sum())


def format_bits_per_weight(n: int, k: int, max_escape_rate: float) -> float:
    """Stored bits per weight of the fixed-rate format (planes + row pointers + escape capacity + base)."""
    nbytes = n * k + n * (k // 2) + 4 * (n + 1) + 6 * capacity(n, k, max_escape_rate) + 4
    return 8 * nbytes / (n * k)


def encode(w: torch.Tensor, cap: int) -> dict[str, torch.Tensor]:
    """bf16 [N, K] -> the format's tensors (on w's device). Raises ValueError if K is odd or the escapes need
    more than `cap` slots (the caller keeps such a layer in bf16)."""
    if w.ndim != 2 or w.shape[1] % 2:
        raise ValueError(f"lossless needs a 2-D weight with an even number of columns, got {tuple(w.shape)}")
    n, k = w.shape
    h = k // 2
    bits = bf16_bits(w)
    exp = (bits >> 7) & 0xFF
    base, _ = best_window(exponent_histogram(w))
    in_win = (exp >= base) & (exp < base + WINDOW)
    esc = ~in_win
    n_esc = int(esc.sum())
    if n_esc > cap:
        raise ValueError(f"{n_esc} escapes ({n_esc / (n * k):.2e} of the weights) exceed the capacity {cap}")
    code = torch.where(in_win, exp - base, torch.zeros_like(exp))  # escapes: placeholder code 0, byte 0
    sm = ((bits >> 8) & 0x80) | (bits & 0x7F)
    sm = torch.where(esc, torch.zeros_like(sm), sm)
    packed = code[:, :h] | (code[:, h:] << 4)
    rows, cols = esc.nonzero(as_tuple=True)  # row-major, ascending column within a row
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=w.device)
    ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    col = torch.zeros(cap, dtype=torch.int32, device=w.device)
    val = torch.zeros(cap, dtype=torch.int16, device=w.device)
    col[:n_esc] = cols.to(torch.int32)
    val[:n_esc] = bits[rows, cols].to(torch.int16)  # wraps 0x8000.. to negative int16: the same 16 bits
    return {
        "sm": sm.to(torch.uint8),
        "code": packed.to(torch.uint8),
        "base": torch.tensor([base], dtype=torch.int32, device=w.device),
        "ptr": ptr.to(torch.int32),
        "col": col,
        "val": val,
    }


def decode_ref(sm: torch.Tensor, code: torch.Tensor, base: torch.Tensor, ptr: torch.Tensor, col: torch.Tensor,
               val: torch.Tensor) -> torch.Tensor:
    """The format's tensors -> the original bf16 weight, bit for bit (plain torch)."""
    n, k = sm.shape
    c = code.to(torch.int32)
    c = torch.cat([c & 0xF, c >> 4], dim=1)
    exp = c + base.to(torch.int32)
    s = sm.to(torch.int32)
    bits = ((s & 0x80) << 8) | (exp << 7) | (s & 0x7F)
    n_esc = int(ptr[-1])
    if n_esc:
        rows = torch.repeat_interleave(torch.arange(n, device=sm.device), (ptr[1:] - ptr[:-1]).to(torch.int64))
        bits[rows, col[:n_esc].to(torch.int64)] = val[:n_esc].to(torch.int32) & 0xFFFF
    return bits.to(torch.int16).view(torch.bfloat16)  # int32 -> int16 keeps the low 16 bits


def lossless_linear_ref(x: torch.Tensor, sm, code, base, ptr, col, val, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """decode, then F.linear: bit-identical to F.linear with the original bf16 weight."""
    w = decode_ref(sm, code, base, ptr, col, val)
    return F.linear(x, w.to(x.dtype), bias)


# ---------------------------------------------------------------------------------------------------------------
# the 3-bit layout ("code3"): a window of 8 exponents, 11 bits per weight + escapes (chosen per layer when smaller)
# ---------------------------------------------------------------------------------------------------------------
WINDOW3 = 8
MAX_K3 = 1 << 16  # escape columns are 16 bits
MAX_ESCAPE_RATE3 = 2.0 ** -5  # ~ where code3 stops being smaller than code4; bounds the GEMV's escape pass


def code3_supported(k: int) -> bool:
    """The 3-bit layout needs K a multiple of 8 (8 segments) and K <= 65536 (16-bit escape columns)."""
    return k % 8 == 0 and 0 < k <= MAX_K3


def format3_bytes(n: int, k: int, escapes: int) -> int:
    """Stored bytes of a code3 layer: sign|mantissa byte + 3/8 byte code per weight, row pointers, 4 bytes per
    escape (column | bf16 bits in one int32), the base."""
    return n * k + n * (3 * k // 8) + 4 * (n + 1) + 4 * max(1, escapes) + 4


def format3_bits_per_weight(n: int, k: int, escapes: int) -> float:
    return 8 * format3_bytes(n, k, escapes) / (n * k)


def format4_bytes(n: int, k: int, max_escape_rate: float) -> int:
    return n * k + n * (k // 2) + 4 * (n + 1) + 6 * capacity(n, k, max_escape_rate) + 4


def escape_words(cols: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """int32 escape entries: column in the low 16 bits, the exact bf16 bits in the high 16 (so the weight is
    `word & 0xFFFF0000` read as fp32)."""
    signed = bits.to(torch.int64) - ((bits.to(torch.int64) >= 0x8000).to(torch.int64) << 16)
    return (signed * 65536 + cols.to(torch.int64)).to(torch.int32)


def encode3(w: torch.Tensor, cap: int | None = None) -> dict[str, torch.Tensor]:
    """bf16 [N, K] -> the code3 tensors (on w's device). cap: escape slots (default: exactly the escapes).
    Raises ValueError for an unsupported shape or more escapes than `cap`.

    Layout (E = K / 8; column s E + j is "segment s, position j"):
        sm    uint8 [N, K]      as in the 4-bit layout (0 at escapes)
        code  uint8 [N, 3 E]    24-bit group g_j = sum_s c(s E + j) << 3 s, byte p of g_j at column p E + j: a
                                kernel tile of positions j0..j0+B loads three byte tiles and every sm/x segment once
        base  int32 [1]         window exponents base .. base + 7 (codes 0..7; escapes: placeholder code 0, byte 0)
        ptr   int32 [N + 1]     CSR row pointers into esc
        esc   int32 [cap]       column | bf16 bits << 16, row-major, ascending column
    """
    if w.ndim != 2 or not code3_supported(w.shape[1]):
        raise ValueError(f"the 3-bit layout needs a 2-D weight with K % 8 == 0 and K <= {MAX_K3}, got {tuple(w.shape)}")
    n, k = w.shape
    e = k // 8
    bits = bf16_bits(w)
    exp = (bits >> 7) & 0xFF
    base, _ = best_window(exponent_histogram(w), WINDOW3)
    in_win = (exp >= base) & (exp < base + WINDOW3)
    esc = ~in_win
    n_esc = int(esc.sum())
    cap = max(1, n_esc) if cap is None else cap
    if n_esc > cap:
        raise ValueError(f"{n_esc} escapes ({n_esc / (n * k):.2e} of the weights) exceed the capacity {cap}")
    code = torch.where(in_win, exp - base, torch.zeros_like(exp)).view(n, 8, e)
    g = sum(code[:, s] << (3 * s) for s in range(8))
    packed = torch.cat([(g >> (8 * p)) & 0xFF for p in range(3)], dim=1)
    sm = ((bits >> 8) & 0x80) | (bits & 0x7F)
    sm = torch.where(esc, torch.zeros_like(sm), sm)
    rows, cols = esc.nonzero(as_tuple=True)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=w.device)
    ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    words = torch.zeros(cap, dtype=torch.int32, device=w.device)
    words[:n_esc] = escape_words(cols, bits[rows, cols])
    return {"sm": sm.to(torch.uint8), "code": packed.to(torch.uint8),
            "base": torch.tensor([base], dtype=torch.int32, device=w.device), "ptr": ptr.to(torch.int32), "esc": words}


def decode3_ref(sm, code, base, ptr, esc) -> torch.Tensor:
    """The code3 tensors -> the original bf16 weight, bit for bit (plain torch)."""
    n, k = sm.shape
    e = k // 8
    if code.shape != (n, 3 * e):
        raise ValueError(f"code3 plane {tuple(code.shape)} does not match the weight {(n, k)}")
    c = code.to(torch.int32)
    g = c[:, :e] | (c[:, e:2 * e] << 8) | (c[:, 2 * e:] << 16)
    exp = torch.cat([(g >> (3 * s)) & 7 for s in range(8)], dim=1) + base.to(torch.int32)
    s = sm.to(torch.int32)
    bits = ((s & 0x80) << 8) | (exp << 7) | (s & 0x7F)
    n_esc = int(ptr[-1])
    if n_esc:
        rows = torch.repeat_interleave(torch.arange(n, device=sm.device), (ptr[1:] - ptr[:-1]).to(torch.int64))
        words = esc[:n_esc].to(torch.int64)
        bits[rows, words & 0xFFFF] = ((words >> 16) & 0xFFFF).to(torch.int32)
    return bits.to(torch.int16).view(torch.bfloat16)


def lossless3_linear_ref(x, sm, code, base, ptr, esc, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, decode3_ref(sm, code, base, ptr, esc).to(x.dtype), bias)


# ---------------------------------------------------------------------------------------------------------------
# entropy-coded layout (DFloat11-style: Huffman-coded exponents + sign/mantissa bytes), for checkpoint size
# ---------------------------------------------------------------------------------------------------------------
def huffman_lengths(hist: torch.Tensor, max_len: int = 24) -> dict[int, int]:
    """Code length per exponent value present in `hist` (Huffman; lengths capped by rescaling if needed)."""
    import heapq

    counts = {i: int(c) for i, c in enumerate(hist.tolist()) if c}
    if len(counts) == 1:
        return {next(iter(counts)): 1}
    while True:
        heap = [(c, i, (s,)) for i, (s, c) in enumerate(sorted(counts.items()))]
        heapq.heapify(heap)
        lengths = {s: 0 for s in counts}
        uid = len(heap)
        while len(heap) > 1:
            c1, _, a = heapq.heappop(heap)
            c2, _, b = heapq.heappop(heap)
            for s in a + b:
                lengths[s] += 1
            heapq.heappush(heap, (c1 + c2, uid, a + b))
            uid += 1
        if max(lengths.values()) <= max_len:
            return lengths
        counts = {s: max(1, c // 2) for s, c in counts.items()}  # flatten the tail, retry


def huffman_bits_per_weight(hist: torch.Tensor) -> float:
    """Bits per weight of the entropy-coded layout: 8 (sign + mantissa) + the Huffman-coded exponent, without
    the block offsets a parallel decoder also stores (DFloat11 reports ~11 bits in all)."""
    lengths = huffman_lengths(hist)
    total = int(hist.sum())
    return 8 + sum(int(hist[s]) * l for s, l in lengths.items()) / max(1, total)


def entropy_bits(hist: torch.Tensor) -> float:
    p = hist.double() / hist.sum()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    _dot = dot

    @triton.jit
    def _ll_f32(c, s, base23):
        """4-bit codes (already at bit 23: c << 23) + sign/mantissa bytes (int32) -> the bf16 values as fp32
        (exact). base23 = base << 23. The sign byte is sign-extended, so one shift and one mask place sign and
        mantissa; the exponent field is a plain add (no select: every code is a window exponent)."""
        sm = (s.to(tl.int8).to(tl.int32) << 16) & -2139095041  # 0x807FFFFF: sign at 31, mantissa at 16..22
        return (sm + c + base23).to(tl.float32, bitcast=True)

    @triton.jit
    def _ll_bits16(c, s, base):
        return (((s & 0x80) << 8) | ((c + base) << 7) | (s & 0x7F)).to(tl.int16)

    @triton.jit
    def _ll_gemv(x_ptr, sm_ptr, code_ptr, base_ptr, ptr_ptr, col_ptr, val_ptr, b_ptr, y_ptr,
                 N, K, H, stride_xm, stride_ym,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.where(rn < N, rn, 0)
        rk = tl.arange(0, BLOCK_K)
        base = tl.load(base_ptr)
        base23 = base << 23
        row64 = rn_in[:, None].to(tl.int64)
        sm_ptrs = sm_ptr + row64 * K + rk[None, :]
        c_ptrs = code_ptr + row64 * H + rk[None, :]
        x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + rk
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for j0 in range(0, H, BLOCK_K):
            if EVEN_K:
                c = tl.load(c_ptrs, eviction_policy="evict_first").to(tl.int32)
                s_lo = tl.load(sm_ptrs, eviction_policy="evict_first").to(tl.int32)
                s_hi = tl.load(sm_ptrs + H, eviction_policy="evict_first").to(tl.int32)
                x_lo = tl.load(x_ptrs).to(tl.float32)
                x_hi = tl.load(x_ptrs + H).to(tl.float32)
            else:
                k_in = (j0 + rk) < H
                c = tl.load(c_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first").to(tl.int32)
                s_lo = tl.load(sm_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first").to(tl.int32)
                s_hi = tl.load(sm_ptrs + H, mask=k_in[None, :], other=0, eviction_policy="evict_first").to(tl.int32)
                x_lo = tl.load(x_ptrs, mask=k_in, other=0.0).to(tl.float32)
                x_hi = tl.load(x_ptrs + H, mask=k_in, other=0.0).to(tl.float32)
            acc += _ll_f32((c << 23) & 125829120, s_lo, base23) * x_lo[None, :]  # 0x07800000: the code at bit 23
            acc += _ll_f32((c << 19) & 125829120, s_hi, base23) * x_hi[None, :]
            sm_ptrs += BLOCK_K
            c_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        # escapes: the row's exact weights, whose placeholders read as P = 2^(base - 127) above
        p = base23.to(tl.float32, bitcast=True)
        start = tl.load(ptr_ptr + rn_in)
        cnt = tl.where(rn < N, tl.load(ptr_ptr + rn_in + 1) - start, 0)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        for e in range(0, tl.max(cnt, axis=0)):
            has = e < cnt
            col = tl.load(col_ptr + start + e, mask=has, other=0)
            v = tl.load(val_ptr + start + e, mask=has, other=0).to(tl.int32)
            w = ((v & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            xv = tl.load(x_row + col, mask=has, other=0.0).to(tl.float32)
            y += tl.where(has, w * xv - p * xv, 0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn_in).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _ll_dot(x_ptr, sm_ptr, code_ptr, base_ptr, ptr_ptr, col_ptr, val_ptr, b_ptr, y_ptr,
                M, N, K, H, stride_xm, stride_ym,
                HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)
        rm_in = tl.where(rm < M, rm, 0)
        rk = tl.arange(0, BLOCK_K)
        base = tl.load(base_ptr)
        row64 = rn_in[:, None].to(tl.int64)
        sm_ptrs = sm_ptr + row64 * K + rk[None, :]
        c_ptrs = code_ptr + row64 * H + rk[None, :]
        x_ptrs = x_ptr + rm_in[None, :].to(tl.int64) * stride_xm + rk[:, None]  # [BK, BM] = x^T
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for j0 in range(0, H, BLOCK_K):
            if EVEN_K:
                c = tl.load(c_ptrs, eviction_policy="evict_first").to(tl.int32)
                s_lo = tl.load(sm_ptrs, eviction_policy="evict_first").to(tl.int32)
                s_hi = tl.load(sm_ptrs + H, eviction_policy="evict_first").to(tl.int32)
                xt_lo = tl.load(x_ptrs)
                xt_hi = tl.load(x_ptrs + H)
            else:
                k_in = (j0 + rk) < H
                c = tl.load(c_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first").to(tl.int32)
                s_lo = tl.load(sm_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first").to(tl.int32)
                s_hi = tl.load(sm_ptrs + H, mask=k_in[None, :], other=0, eviction_policy="evict_first").to(tl.int32)
                xt_lo = tl.load(x_ptrs, mask=k_in[:, None], other=0.0)
                xt_hi = tl.load(x_ptrs + H, mask=k_in[:, None], other=0.0)
            a_lo = _ll_bits16(c & 15, s_lo, base).to(tl.bfloat16, bitcast=True)
            a_hi = _ll_bits16(c >> 4, s_hi, base).to(tl.bfloat16, bitcast=True)
            acc = _dot(a_lo, xt_lo, acc, INTERPRET)
            acc = _dot(a_hi, xt_hi, acc, INTERPRET)
            sm_ptrs += BLOCK_K
            c_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        p = (base << 23).to(tl.float32, bitcast=True)  # the placeholders' value (code 0, byte 0)
        start = tl.load(ptr_ptr + rn_in)
        cnt = tl.where(rn < N, tl.load(ptr_ptr + rn_in + 1) - start, 0)
        for e in range(0, tl.max(cnt, axis=0)):
            has = e < cnt
            col = tl.load(col_ptr + start + e, mask=has, other=0)
            v = tl.load(val_ptr + start + e, mask=has, other=0).to(tl.int32)
            w = ((v & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            xv = tl.load(x_ptr + rm_in[None, :].to(tl.int64) * stride_xm + col[:, None],
                         mask=has[:, None], other=0.0).to(tl.float32)  # [BN, BM]
            acc += tl.where(has[:, None], w[:, None] * xv - p * xv, 0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_in).to(tl.float32)[:, None]
        y_ptrs = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (rm < M)[None, :])

    @triton.jit
    def _ll_decode(sm_ptr, code_ptr, base_ptr, out_ptr, N, K, H, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn < N)[:, None] & (rj < H)[None, :]
        row64 = rn[:, None].to(tl.int64)
        base = tl.load(base_ptr)
        c = tl.load(code_ptr + row64 * H + rj[None, :], mask=mask, other=0).to(tl.int32)
        s_lo = tl.load(sm_ptr + row64 * K + rj[None, :], mask=mask, other=0).to(tl.int32)
        s_hi = tl.load(sm_ptr + row64 * K + H + rj[None, :], mask=mask, other=0).to(tl.int32)
        tl.store(out_ptr + row64 * K + rj[None, :], _ll_bits16(c & 15, s_lo, base), mask=mask)
        tl.store(out_ptr + row64 * K + H + rj[None, :], _ll_bits16(c >> 4, s_hi, base), mask=mask)

    @triton.jit
    def _ll_scatter(ptr_ptr, col_ptr, val_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr):
        """Writes the escapes over the placeholders that _ll_decode left (run after it, same stream)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.where(rn < N, rn, 0)
        start = tl.load(ptr_ptr + rn_in)
        cnt = tl.where(rn < N, tl.load(ptr_ptr + rn_in + 1) - start, 0)
        for e in range(0, tl.max(cnt, axis=0)):
            has = e < cnt
            col = tl.load(col_ptr + start + e, mask=has, other=0)
            v = tl.load(val_ptr + start + e, mask=has, other=0)
            tl.store(out_ptr + rn_in.to(tl.int64) * K + col, v, mask=has)


    # -- code3 ----------------------------------------------------------------------------------------------------
    @triton.jit
    def _ll3_join(b0, b1, b2):
        """Three uint8 tiles -> b0 | b1 << 8 | b2 << 16 (byte 3 undefined: the GEMV's shifts and masks never read
        it) as two PRMTs per group, where the compiler extracts each byte and shifts/ors them (pack=4)."""
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; "
            "prmt.b32 t, $4, $5, 0x0040; prmt.b32 $0, t, $6, 0x0410; "
            "prmt.b32 t, $4, $5, 0x1151; prmt.b32 $1, t, $6, 0x0510; "
            "prmt.b32 t, $4, $5, 0x2262; prmt.b32 $2, t, $6, 0x0610; "
            "prmt.b32 t, $4, $5, 0x3373; prmt.b32 $3, t, $6, 0x0710; }",
            "=r,=r,=r,=r,r,r,r", [b0, b1, b2], dtype=tl.int32, is_pure=True, pack=4)

    @triton.jit
    def _ll3_group(code_ptrs, E, mask, MASKED: tl.constexpr, ASM: tl.constexpr = False):
        """The 24-bit code groups of a tile (three byte planes E apart) as int32."""
        if MASKED:
            b0 = tl.load(code_ptrs, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
            b1 = tl.load(code_ptrs + E, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
            b2 = tl.load(code_ptrs + 2 * E, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
        else:
            b0 = tl.load(code_ptrs, eviction_policy="evict_first").to(tl.int32)
            b1 = tl.load(code_ptrs + E, eviction_policy="evict_first").to(tl.int32)
            b2 = tl.load(code_ptrs + 2 * E, eviction_policy="evict_first").to(tl.int32)
        if ASM:
            return _ll3_join(b0.to(tl.uint8), b1.to(tl.uint8), b2.to(tl.uint8))
        return b0 | (b1 << 8) | (b2 << 16)

    @triton.jit
    def _ll3_place_sm(sb):
        """uint8 sign|mantissa bytes -> int32 with the byte at bits 16..23 and its sign replicated over 24..31: one
        PRMT per weight (sign-replicating selector nibble 8|i), where the compiler emits a sign-extending PRMT, a
        shift and leaves the mask to the caller either way. Four packed bytes in, four words out (pack=4)."""
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $4, 0, 0x8044; prmt.b32 $1, $4, 0, 0x9144; prmt.b32 $2, $4, 0, 0xA244; "
            "prmt.b32 $3, $4, 0, 0xB344;",
            "=r,=r,=r,=r,r", [sb], dtype=tl.int32, is_pure=True, pack=4)

    @triton.jit
    def _ll3_x_f32(xb):
        """bf16 -> fp32 as one shift or one mask per element (two packed bf16 per register, pack=2): the compiler's
        conversion extracts the high half with a PRMT before shifting it."""
        return tl.inline_asm_elementwise("shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000;", "=r,=r,r", [xb],
                                         dtype=tl.float32, is_pure=True, pack=2)

    @triton.jit
    def _ll3_f32(c23, sb, base23, ASM: tl.constexpr):
        """Codes at bits 23..25 + sign|mantissa bytes (uint8) -> the bf16 values as fp32 (exact)."""
        if ASM:
            return ((_ll3_place_sm(sb) & -2139095041) + c23 + base23).to(tl.float32, bitcast=True)
        return _ll_f32(c23, sb.to(tl.int32), base23)

    @triton.jit
    def _ll3_escape_chunk(x_row, word, has, p):
        """(w - P) x[col] of a [rows, BLOCK_T] tile of escape words (P: the placeholders' value)."""
        w = (word & -65536).to(tl.float32, bitcast=True)  # the exact bf16 bits, as fp32
        xv = tl.load(x_row + (word & 0xFFFF), mask=has, other=0.0).to(tl.float32)
        return w * xv - p * xv  # an empty slot has word 0 and xv 0: adds exactly 0

    @triton.jit
    def _ll3_escapes(x_row, esc_ptr, start, cnt, word0, has0, p, BLOCK_T: tl.constexpr):
        """Per row: the sum of its escapes' corrections. A row's escapes are contiguous, so [rows, BLOCK_T] tiles
        of them load with no dependence between lanes; the first tile (word0) was loaded before the main loop, so
        its DRAM latency is hidden; BLOCK_T is sized from the layer's mean escapes per row (host side)."""
        rt = tl.arange(0, BLOCK_T)
        corr = _ll3_escape_chunk(x_row, word0, has0, p)
        for t0 in range(BLOCK_T, tl.max(cnt, axis=0), BLOCK_T):
            has = (t0 + rt)[None, :] < cnt[:, None]
            word = tl.load(esc_ptr + start[:, None] + t0 + rt[None, :], mask=has, other=0)
            corr += _ll3_escape_chunk(x_row, word, has, p)
        return tl.sum(corr, axis=1)

    @triton.jit
    def _ll3_gemv(x_ptr, sm_ptr, code_ptr, base_ptr, ptr_ptr, esc_ptr, b_ptr, y_ptr,
                  N, K, E, stride_xm, stride_ym,
                  HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_T: tl.constexpr, ASM: tl.constexpr):
        """One x row per program (axis 0: consecutive programs share a weight tile, so rows 2..M read it from L2).
        A step decodes 8 segments x [BLOCK_N, BLOCK_K] positions: code c of segment s is (g << 23 - 3 s) & 7 << 23
        (one shift, one mask), then the 4-bit kernel's byte placement and one add."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.where(rn < N, rn, 0)
        rk = tl.arange(0, BLOCK_K)
        base23 = tl.load(base_ptr) << 23
        row64 = rn_in[:, None].to(tl.int64)
        sm_ptrs = sm_ptr + row64 * K + rk[None, :]
        c_ptrs = code_ptr + row64 * (3 * E) + rk[None, :]
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        x_ptrs = x_row + rk
        # the first tile of this block's escapes, issued now and used after the loop
        start = tl.load(ptr_ptr + rn_in)
        cnt = tl.where(rn < N, tl.load(ptr_ptr + rn_in + 1) - start, 0)
        rt = tl.arange(0, BLOCK_T)
        has0 = rt[None, :] < cnt[:, None]
        word0 = tl.load(esc_ptr + start[:, None] + rt[None, :], mask=has0, other=0)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for j0 in range(0, E, BLOCK_K):
            k_in = (j0 + rk) < E
            g = _ll3_group(c_ptrs, E, k_in[None, :], not EVEN_K, ASM)
            for s in tl.static_range(8):
                if EVEN_K:
                    sb = tl.load(sm_ptrs + s * E, eviction_policy="evict_first")
                    xs = tl.load(x_ptrs + s * E)
                else:
                    sb = tl.load(sm_ptrs + s * E, mask=k_in[None, :], other=0, eviction_policy="evict_first")
                    xs = tl.load(x_ptrs + s * E, mask=k_in, other=0.0)
                xs = _ll3_x_f32(xs) if ASM else xs.to(tl.float32)
                acc += _ll3_f32((g << (23 - 3 * s)) & 58720256, sb, base23, ASM) * xs[None, :]  # 0x03800000
            sm_ptrs += BLOCK_K
            c_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        y += _ll3_escapes(x_row, esc_ptr, start, cnt, word0, has0, base23.to(tl.float32, bitcast=True), BLOCK_T)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn_in).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _ll3_decode(sm_ptr, code_ptr, base_ptr, out_ptr, N, K, E, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn < N)[:, None] & (rj < E)[None, :]
        row64 = rn[:, None].to(tl.int64)
        base = tl.load(base_ptr)
        g = _ll3_group(code_ptr + row64 * (3 * E) + rj[None, :], E, mask, True)
        for s in tl.static_range(8):
            sb = tl.load(sm_ptr + row64 * K + s * E + rj[None, :], mask=mask, other=0).to(tl.int32)
            tl.store(out_ptr + row64 * K + s * E + rj[None, :], _ll_bits16((g >> (3 * s)) & 7, sb, base), mask=mask)

    @triton.jit
    def _ll3_scatter(ptr_ptr, esc_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        """Writes the escapes over the placeholders that _ll3_decode left (run after it, same stream)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.where(rn < N, rn, 0)
        start = tl.load(ptr_ptr + rn_in)
        cnt = tl.where(rn < N, tl.load(ptr_ptr + rn_in + 1) - start, 0)
        rt = tl.arange(0, BLOCK_T)
        for t0 in range(0, tl.max(cnt, axis=0), BLOCK_T):
            has = (t0 + rt)[None, :] < cnt[:, None]
            word = tl.load(esc_ptr + start[:, None] + t0 + rt[None, :], mask=has, other=0)
            tl.store(out_ptr + rn_in[:, None].to(tl.int64) * K + (word & 0xFFFF), (word >> 16).to(tl.int16), mask=has)


# ---------------------------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------------------------
TUNED: dict = {}  # (device key, m bucket, N, K) -> {"kernel": "gemv" | "dot", LaunchConfig fields}; (.., "code3") -> fields


def gemv_default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    """BLOCK_K counts byte columns of one half: a step reads 2 BLOCK_K weights per row."""
    h = k // 2
    block_k = min(256, max(16, triton.next_power_of_2(h))) if HAS_TRITON else 256
    block_n = 16
    while block_n > 2 and -(-n // block_n) < 2 * sms:
        block_n //= 2
    warps = max(1, min(4, block_n * block_k // 16 // 32))
    return LaunchConfig(block_n=block_n, block_k=block_k, num_warps=warps)


def dot_default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    h = k // 2
    block_m = max(16, min(64, triton.next_power_of_2(m))) if HAS_TRITON else 16
    block_n = 32 if -(-n // 32) >= sms else 16
    block_k = 128 if h >= 128 else max(16, triton.next_power_of_2(h))
    return LaunchConfig(block_n=block_n, block_k=block_k, block_m=block_m, num_warps=4)


def _check(x2, sm):
    if x2.shape[1] != sm.shape[1]:
        raise ValueError(f"x has {x2.shape[1]} features, the weight {sm.shape[1]}")


def ll_gemv(x2, sm, code, base, ptr, col, val, bias, cfg: LaunchConfig | None = None, out=None) -> torch.Tensor:
    m, k = x2.shape
    _check(x2, sm)
    n, h = sm.shape[0], k // 2
    cfg = cfg or gemv_default(m, n, k, sm_count(x2.device))
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    grid = (triton.cdiv(n, cfg.block_n), m)
    _ll_gemv[grid](x2, sm, code, base, ptr, col, val, bias if bias is not None else x2, y, n, k, h,
                   x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, EVEN_K=h % cfg.block_k == 0,
                   BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def ll_dot(x2, sm, code, base, ptr, col, val, bias, cfg: LaunchConfig | None = None, out=None) -> torch.Tensor:
    m, k = x2.shape
    _check(x2, sm)
    n, h = sm.shape[0], k // 2
    cfg = cfg or dot_default(m, n, k, sm_count(x2.device))
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _ll_dot[grid](x2, sm, code, base, ptr, col, val, bias if bias is not None else x2, y, m, n, k, h,
                  x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, EVEN_K=h % cfg.block_k == 0,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, INTERPRET=interpreting(),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def ll_decode(sm, code, base, ptr, col, val, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bf16 weight, bit-identical to the original (two launches: planes, then escapes)."""
    n, k = sm.shape
    h = k // 2
    out = torch.empty(n, k, device=sm.device, dtype=torch.bfloat16) if out is None else out
    bits = out.view(torch.int16)
    _ll_decode[(triton.cdiv(n, 16), triton.cdiv(h, 256))](sm, code, base, bits, n, k, h, BLOCK_N=16, BLOCK_K=256,
                                                            num_warps=4)
    _ll_scatter[(triton.cdiv(n, 64),)](ptr, col, val, bits, n, k, BLOCK_N=64, num_warps=2)
    return out


# code3: rows served by the GEMV (it decodes the tile once per row: ~8.5 instructions per weight and row, so above
# ~4-6 rows decode + cuBLAS, 5.5 bytes per weight, wins; the bench measures both at M = 4 and 16); above: decode
GEMV3_M = int(os.environ.get("HF_ACCEL_LOSSLESS3_GEMV_M", "4"))
ASM3 = os.environ.get("HF_ACCEL_LOSSLESS3_ASM", "1") != "0"  # inline PTX in the code3 GEMV (see _ll3_place_sm)


def gemv3_default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    """BLOCK_K counts positions of one segment (K / 8): a step reads 8 BLOCK_K weights per row. 32 elements of a
    [BLOCK_N, BLOCK_K] byte tile per thread (two rows each) keep the SASS at ~7.5 instructions per weight (NOTES)."""
    e = k // 8
    # SASS per weight (loop / whole kernel at K = 4096): 32x128x4 7.0 / 7.9, 16x128x2 7.1, 8x256x4 7.6 / 10.1 (fewer
    # steps to spread the epilogue over) but 4x the programs: the first with at least one program per SM
    for block_n, block_k, warps in ((32, 128, 4), (16, 128, 2), (8, 256, 4)):
        if -(-n // block_n) >= sms:
            break
    block_k = min(block_k, max(16, triton.next_power_of_2(e))) if HAS_TRITON else block_k
    return LaunchConfig(block_n=block_n, block_k=block_k, num_warps=warps)


def escape_block(capacity: int, n: int) -> int:
    """Escape tile width of the code3 GEMV: the layer's mean escapes per row (+25%), 16..128 (code3 capacities are
    the exact counts, so this needs no device sync)."""
    return min(128, max(16, triton.next_power_of_2(int(1.25 * capacity / max(1, n)) + 1)))


def _check3(x2, sm, code):
    _check(x2, sm)
    if not code3_supported(sm.shape[1]) or code.shape != (sm.shape[0], 3 * (sm.shape[1] // 8)):
        raise ValueError(f"code3 plane {tuple(code.shape)} does not match the weight {tuple(sm.shape)}")


def ll3_gemv(x2, sm, code, base, ptr, esc, bias, cfg: LaunchConfig | None = None, out=None,
             asm: bool | None = None) -> torch.Tensor:
    """asm: the inline-PTX byte placement and x conversion (default: on CUDA unless HF_ACCEL_LOSSLESS3_ASM=0;
    the interpreter runs the plain Triton expressions, which compute the same bits)."""
    asm = (ASM3 if asm is None else asm) and not interpreting()  # the interpreter has no inline PTX
    m, k = x2.shape
    _check3(x2, sm, code)
    n, e = sm.shape[0], k // 8
    cfg = cfg or gemv3_default(m, n, k, sm_count(x2.device))
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    grid = (m, triton.cdiv(n, cfg.block_n))
    _ll3_gemv[grid](x2, sm, code, base, ptr, esc, bias if bias is not None else x2, y, n, k, e,
                    x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, EVEN_K=e % cfg.block_k == 0,
                    BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_T=escape_block(esc.numel(), n), ASM=asm,
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)
    return y


def ll3_decode(sm, code, base, ptr, esc, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bf16 weight of a code3 layer, bit-identical to the original (two launches: planes, then escapes)."""
    n, k = sm.shape
    e = k // 8
    out = torch.empty(n, k, device=sm.device, dtype=torch.bfloat16) if out is None else out
    bits = out.view(torch.int16)
    _ll3_decode[(triton.cdiv(n, 16), triton.cdiv(e, 64))](sm, code, base, bits, n, k, e, BLOCK_N=16, BLOCK_K=64,
                                                           num_warps=4)
    _ll3_scatter[(triton.cdiv(n, 16),)](ptr, esc, bits, n, k, BLOCK_N=16, BLOCK_T=32, num_warps=4)
    return out


def lossless3_linear_triton(x, sm, code, base, ptr, esc, bias, exact: bool = False) -> torch.Tensor:
    x2 = flatten(x)
    m, n = x2.shape[0], sm.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    if not exact and m <= GEMV3_M:
        hit = TUNED.get((_device_key(x2.device), _m_bucket(m), n, x2.shape[1], "code3"))
        y = ll3_gemv(x2, sm, code, base, ptr, esc, bias, LaunchConfig(**hit) if hit else None)
    else:
        y = F.linear(x2, ll3_decode(sm, code, base, ptr, esc), bias)
    return y.view(*x.shape[:-1], n)


def _device_key(device):
    from ._base import device_key

    return device_key(device)


def _m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def choose(m: int, n: int, k: int, device: torch.device) -> tuple[str, LaunchConfig | None]:
    from ._base import device_key

    hit = TUNED.get((device_key(device), _m_bucket(m), n, k))
    if hit is not None and m <= DOT_M:
        hit = dict(hit)
        kind = hit.pop("kernel")
        return kind, LaunchConfig(**hit)
    if m <= GEMV_M:
        return "gemv", None
    if m <= DOT_M:
        return "dot", None
    return "decode", None


def use_triton(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and triton_can_run(x)  # the format stores bf16 weights only


def lossless_linear_triton(x, sm, code, base, ptr, col, val, bias, exact: bool = False) -> torch.Tensor:
    x2 = flatten(x)
    m = x2.shape[0]
    n = sm.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    kind, cfg = ("decode", None) if exact else choose(m, n, x2.shape[1], x2.device)
    if kind == "gemv":
        y = ll_gemv(x2, sm, code, base, ptr, col, val, bias, cfg)
    elif kind == "dot":
        y = ll_dot(x2, sm, code, base, ptr, col, val, bias, cfg)
    else:
        y = F.linear(x2, ll_decode(sm, code, base, ptr, col, val), bias)
    return y.view(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------------------------
# the op: one opaque node for torch.compile / CUDA graphs; Triton on CUDA, decode + F.linear elsewhere
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("hf_accel::lossless_linear", mutates_args=())
def lossless_linear(x: torch.Tensor, sm: torch.Tensor, code: torch.Tensor, base: torch.Tensor, ptr: torch.Tensor,
                    col: torch.Tensor, val: torch.Tensor, bias: Optional[torch.Tensor], exact: bool) -> torch.Tensor:
    """y = x @ W.T + bias with W the bf16 weight stored in the lossless format. `exact`: always decode to bf16 and
    call F.linear (bit-identical to the bf16 model); else the fused kernels for up to DOT_M rows on CUDA."""
    if use_triton(x):
        return lossless_linear_triton(x, sm, code, base, ptr, col, val, bias, exact)
    return lossless_linear_ref(x, sm, code, base, ptr, col, val, bias)


@lossless_linear.register_fake
def _(x, sm, code, base, ptr, col, val, bias, exact):
    return x.new_empty(*x.shape[:-1], sm.shape[0])


def _setup(ctx, inputs, output):
    x, sm, code, base, ptr, col, val, bias, exact = inputs
    ctx.save_for_backward(sm, code, base, ptr, col, val)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    w = decode_ref(*ctx.saved_tensors) if not grad.is_cuda or not HAS_TRITON else ll_decode(*ctx.saved_tensors)
    gx = grad @ w.to(grad.dtype)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return gx, None, None, None, None, None, None, gb, None


lossless_linear.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("hf_accel::lossless3_linear", mutates_args=())
def lossless3_linear(x: torch.Tensor, sm: torch.Tensor, code: torch.Tensor, base: torch.Tensor, ptr: torch.Tensor,
                     esc: torch.Tensor, bias: Optional[torch.Tensor], exact: bool) -> torch.Tensor:
    """y = x @ W.T + bias with W stored in the code3 layout; as `lossless_linear` (GEMV for up to GEMV3_M rows on
    CUDA, decode + F.linear above, with `exact` and on the CPU)."""
    if use_triton(x):
        return lossless3_linear_triton(x, sm, code, base, ptr, esc, bias, exact)
    return lossless3_linear_ref(x, sm, code, base, ptr, esc, bias)


@lossless3_linear.register_fake
def _(x, sm, code, base, ptr, esc, bias, exact):
    return x.new_empty(*x.shape[:-1], sm.shape[0])


def _setup3(ctx, inputs, output):
    x, sm, code, base, ptr, esc, bias, exact = inputs
    ctx.save_for_backward(sm, code, base, ptr, esc)
    ctx.has_bias = bias is not None


def _backward3(ctx, grad):
    w = lossless3_decode(*ctx.saved_tensors)
    gx = grad @ w.to(grad.dtype)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return gx, None, None, None, None, None, gb, None


lossless3_linear.register_autograd(_backward3, setup_context=_setup3)


def lossless3_decode(sm, code, base, ptr, esc) -> torch.Tensor:
    """The bf16 weight of a code3 layer: the Triton decode kernel on CUDA, the torch reference elsewhere."""
    if triton_can_run(sm):
        return ll3_decode(sm, code, base, ptr, esc)
    return decode3_ref(sm, code, base, ptr, esc)


def lossless_decode(sm, code, base, ptr, col, val) -> torch.Tensor:
    """The bf16 weight: the Triton decode kernel on CUDA, the torch reference elsewhere."""
    if triton_can_run(sm):
        return ll_decode(sm, code, base, ptr, col, val)
    return decode_ref(sm, code, base, ptr, col, val)
