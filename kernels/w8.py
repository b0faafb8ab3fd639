"""One byte per weight with a per-output-channel scale: int8 (W8A16) and fp8 e4m3 weight-only.

Format (both): `weight` [N, K] row-major (int8, or float8_e4m3fn), `scale` [N] (any float dtype);
`y = x @ (weight * scale[:, None]).T + bias`. The kernels read the fp8 weight through an int8 view.

Kernels (Triton), each checked against `w8_linear_ref` below:
- `_w8_gemv`: one x row per program row-block; a [BLOCK_N, BLOCK_K] weight tile per step, 16-byte loads along K,
  a 2-D fp32 accumulator reduced once at the end, the scale applied once per output. No split-K: enough programs
  come from small BLOCK_N (4096 rows / 8 = 512 programs), so the K reduction stays inside one program and the
  result is deterministic.
- `_w8_dot`: batches of 2..64 rows: the weight tile is the MMA's A operand (rows of W fill the 16-row MMA
  dimension, "swap AB"), x^T the B operand padded to 16 columns.
- `_w8_dequant`: weight * scale -> x.dtype, for the prefill path (then cuBLAS).

Byte -> fp32 conversion (constexpr CVT): 0 = the hardware conversion (I2F / cvt.e4m3); 1 = integer tricks that keep
the conversion unit free: int8 q -> bits(2^23 + 128 + q) by one integer add, minus 2^23 + 128; fp8 e4m3 ->
sign-extended byte << 20 & 0x87F00000 is the fp32 with the same sign, exponent and mantissa but 2^-120 times the
value (subnormals included), times 2^120. Measured on the H100 (kernels/NOTES.md): the integer trick wins for
int8, the hardware e4m3 conversion for fp8.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._base import (HAS_TRITON, LaunchConfig, bgemv_default, choose, dot, flatten, interpreting, sm_count, split_plan,
                    splitk_reduce, use_triton)

INT8, FP8 = "int8", "fp8"
FP8_MAX = 448.0


# ---------------------------------------------------------------------------------------------------------------
# plain-torch reference (the CPU path, and what the kernels are tested against)
# ---------------------------------------------------------------------------------------------------------------
def w8_dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def w8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = (x @ q.T) * scale + b: the scale after the matmul, one multiply per output (int8 q is exact in any
    float dtype; e4m3 too)."""
    out = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return out + bias.to(x.dtype) if bias is not None else out


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    _dot = dot

    @triton.jit
    def _byte_to_f32(w, IS_FP8: tl.constexpr, CVT: tl.constexpr):
        """int8 tile (the weight's bytes) -> fp32 values (for fp8: the e4m3 values)."""
        if IS_FP8:
            if CVT == 0:
                v = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                bits = (w.to(tl.int32) << 20) & -2014314496  # 0x87F00000: sign (sign-extended) | exp | mantissa
                v = bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120
        else:
            if CVT == 0:
                v = w.to(tl.float32)
            else:
                v = (w.to(tl.int32) + 1258291328).to(tl.float32, bitcast=True) - 8388736.0  # 0x4B000080, 2^23+128
        return v

    @triton.jit
    def _w8_gemv(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                 IS_FP8: tl.constexpr, CVT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.where(rn < N, rn, 0)  # rows past N re-read row 0 (in bounds) instead of masking every load
        rk = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :]
        x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + rk
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptrs)
            else:
                k_in = (k0 + rk) < K
                w = tl.load(w_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=k_in, other=0.0)
            acc += _byte_to_f32(w, IS_FP8, CVT) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn_in).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn_in).to(tl.float32)
        tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _w8_dot(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                IS_FP8: tl.constexpr, CVT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INTERPRET: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)
        rm_in = tl.where(rm < M, rm, 0)
        rk = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :]  # [BN, BK]
        x_ptrs = x_ptr + rm_in[None, :].to(tl.int64) * stride_xm + rk[:, None]  # [BK, BM] = x^T
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                xt = tl.load(x_ptrs)
            else:
                k_in = (k0 + rk) < K
                w = tl.load(w_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first")
                xt = tl.load(x_ptrs, mask=k_in[:, None], other=0.0)
            a = _byte_to_f32(w, IS_FP8, CVT).to(xt.dtype)  # exact: |int8| <= 127 and e4m3 fit bf16/fp16
            acc = _dot(a, xt, acc, INTERPRET)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = acc * tl.load(s_ptr + rn_in).to(tl.float32)[:, None]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn_in).to(tl.float32)[:, None]
        y_ptrs = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (rm < M)[None, :])

    @triton.jit
    def _w8_dequant(w_ptr, s_ptr, out_ptr, N, K, IS_FP8: tl.constexpr, CVT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        offs = rn[:, None].to(tl.int64) * K + rk[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0)
        v = _byte_to_f32(w, IS_FP8, CVT) * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _w8_bgemv(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, STEPS, stride_xm, stride_wn, stride_ym,
                  IS_FP8: tl.constexpr, CVT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                  SPLIT: tl.constexpr, ACC3: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        """Batched GEMV (decode batches 1..16): each decoded [BLOCK_N, BLOCK_K] byte tile serves BLOCK_M rows of x
        from registers; with SPLIT > 1 program (n, m, s) covers STEPS blocks of K and writes fp32 partials
        [SPLIT, M, N] (then `_base.splitk_reduce`, which adds the bias)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)
        rm_in = tl.where(rm < M, rm, 0)
        rk = tl.arange(0, BLOCK_K)
        k_first = pid_k * STEPS * BLOCK_K
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * stride_wn + (k_first + rk)[None, :]
        x_ptrs = x_ptr + rm_in[:, None].to(tl.int64) * stride_xm + (k_first + rk)[None, :]
        if ACC3:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in range(0, STEPS):
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptrs)
            else:
                k_in = (k_first + step * BLOCK_K + rk) < K
                w = tl.load(w_ptrs, mask=k_in[None, :], other=0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
            part = _byte_to_f32(w, IS_FP8, CVT)[None, :, :] * x.to(tl.float32)[:, None, :]
            if ACC3:
                acc += part
            else:
                acc2 += tl.sum(part, axis=2)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if ACC3:
            y = tl.sum(acc, axis=2)
        else:
            y = acc2
        y = y * tl.load(s_ptr + rn_in).to(tl.float32)[None, :]
        ok = (rm < M)[:, None] & (rn < N)[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                y += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(y_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :], y, mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------------------------
TUNED: dict = {}  # filled from tuned.py: (device, fmt, m_bucket, N, K) -> {kernel, LaunchConfig fields}
DEFAULT_CVT = {INT8: 1, FP8: 0}  # the faster on every 8B shape measured on the H100 (kernels/NOTES.md)


def _gemv_default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    block_k = min(512, max(16, triton.next_power_of_2(k))) if HAS_TRITON else 512
    block_n = 16
    while block_n > 2 and -(-n // block_n) < 2 * sms:
        block_n //= 2
    warps = max(1, min(4, block_n * block_k // 16 // 32))
    return LaunchConfig(block_n=block_n, block_k=block_k, num_warps=warps)


def _dot_default(m: int, n: int, k: int, sms: int) -> LaunchConfig:
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    block_n = 32 if -(-n // 32) >= sms else 16
    return LaunchConfig(block_n=block_n, block_k=256 if k >= 256 else max(16, triton.next_power_of_2(k)),
                        block_m=block_m, num_warps=4)


def w8_gemv(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], fmt: str,
            cfg: LaunchConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the GEMV kernel on x2 [M, K] (one program row per x row)."""
    m, k = x2.shape
    n = weight.shape[0]
    cfg = cfg or _gemv_default(m, n, k, sm_count(x2.device))
    cvt = DEFAULT_CVT[fmt] if cfg.cvt is None else cfg.cvt
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    w = weight.view(torch.int8)
    grid = (triton.cdiv(n, cfg.block_n), m)
    _w8_gemv[grid](x2, w, scale, bias if bias is not None else scale, y, n, k, x2.stride(0), w.stride(0), y.stride(0),
                   IS_FP8=fmt == FP8, CVT=cvt, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
                   BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def w8_bgemv(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], fmt: str,
             cfg: LaunchConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """block_m rows of x per program from registers (decode batches 1..16), optional split-K."""
    m, k = x2.shape
    n = weight.shape[0]
    cfg = cfg or bgemv_default(m, n, sm_count(x2.device), block_k=256)
    cvt = DEFAULT_CVT[fmt] if cfg.cvt is None else cfg.cvt
    steps, split = split_plan(k, cfg.block_k, cfg.split_k)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    dst = y if split == 1 else torch.empty(split, m, n, device=x2.device, dtype=torch.float32)
    w = weight.view(torch.int8)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _w8_bgemv[grid](x2, w, scale, bias if bias is not None else scale, dst, m, n, k, steps, x2.stride(0), w.stride(0),
                    y.stride(0), IS_FP8=fmt == FP8, CVT=cvt, HAS_BIAS=bias is not None,
                    EVEN=k == split * steps * cfg.block_k, SPLIT=split, ACC3=cfg.acc3, BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        splitk_reduce(dst, bias, y)
    return y


def w8_dot(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], fmt: str,
           cfg: LaunchConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    m, k = x2.shape
    n = weight.shape[0]
    cfg = cfg or _dot_default(m, n, k, sm_count(x2.device))
    cvt = DEFAULT_CVT[fmt] if cfg.cvt is None else cfg.cvt
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    w = weight.view(torch.int8)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _w8_dot[grid](x2, w, scale, bias if bias is not None else scale, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0),
                  IS_FP8=fmt == FP8, CVT=cvt, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  INTERPRET=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def w8_dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fmt: str) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(n, k, device=weight.device, dtype=dtype)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 256))
    _w8_dequant[grid](weight.view(torch.int8), scale, out, n, k, IS_FP8=fmt == FP8, CVT=DEFAULT_CVT[fmt],
                      BLOCK_N=32, BLOCK_K=256, num_warps=4)
    return out


def w8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                     fmt: str) -> torch.Tensor:
    x2 = flatten(x)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    kind, cfg = choose(TUNED, fmt, m, weight.shape[0], x2.shape[1], x2.device, _gemv_default, _dot_default)
    if kind == "gemv":
        y = w8_gemv(x2, weight, scale, bias, fmt, cfg)
    elif kind == "bgemv":
        y = w8_bgemv(x2, weight, scale, bias, fmt, cfg)
    elif kind == "dot":
        y = w8_dot(x2, weight, scale, bias, fmt, cfg)
    else:
        y = F.linear(x2, w8_dequant(weight, scale, x2.dtype, fmt), bias)
    return y.view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# the ops: one opaque node for torch.compile; Triton on CUDA, the reference elsewhere
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("hf_accel::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias for int8 `weight` [N, K] and per-row `scale` [N]."""
    if use_triton(x):
        return w8_linear_triton(x, weight, scale, bias, INT8)
    return w8_linear_ref(x, weight, scale, bias)


@torch.library.custom_op("hf_accel::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias for float8_e4m3fn `weight` [N, K] and per-row `scale` [N]."""
    if use_triton(x):
        return w8_linear_triton(x, weight, scale, bias, FP8)
    return w8_linear_ref(x, weight, scale, bias)


@int8_linear.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@fp8_linear.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# gradients for x and bias (the weights are frozen): lets adapters and activation-gradient methods run on top
def _w8_setup(ctx, inputs, output):
    x, weight, scale, bias = inputs
    ctx.save_for_backward(weight, scale)
    ctx.has_bias = bias is not None


def _w8_backward(ctx, grad):
    weight, scale = ctx.saved_tensors
    gx = grad @ w8_dequantize(weight, scale, grad.dtype)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return gx, None, None, gb


int8_linear.register_autograd(_w8_backward, setup_context=_w8_setup)
fp8_linear.register_autograd(_w8_backward, setup_context=_w8_setup)
