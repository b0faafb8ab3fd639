"""The two memory-bound halves of a W8A8 matmul for diffusion denoisers (the 8-bit GEMM itself is cuBLAS):

- `quantize_tokens(x2, fmt)`: x [M, K] (bf16/fp16) -> codes [M, K] (int8 or float8_e4m3fn) and a per-token scale
  [M, 1] fp32 = max|x_row| / QMAX, in one Triton program per row (two passes over the row, which stays in L2).
  int8 rounds half away from zero (floor(|v| + 0.5) with the sign), the reference does the same.
- `int8_epilogue(acc, xs, ws, bias, dtype)`: the int32 product of `torch._int_mm` -> acc * xs[m] * ws[n] + bias[n]
  in `dtype`, one pass (torch would take four: convert, two multiplies, add).

Each next to its plain-torch reference (`*_ref`), which is also the path off CUDA; tests run the kernels under
TRITON_INTERPRET=1 on the CPU (tests/test_diffusion_quant.py). fp8 rounding: the interpreter's fp32 -> e4m3 cast is
wrong in triton 3.x (see fp8_act.py), so there the kernel writes the scaled fp32 values and torch rounds them; on the
GPU the kernel rounds. kernels/fp8_act.py has an fp8-only twin of the quantizer for the LLM path; this one adds
int8 and the int8 epilogue used by plugins/quantization/w8a8_diffusion.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._base import HAS_TRITON, fp8_tensor_cores, interpreting, triton_can_run

QMAX = {"int8": 127.0, "fp8": 448.0}
CODE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


# ---------------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------------
def _round_int8(v: torch.Tensor) -> torch.Tensor:
    return (torch.floor(v.abs() + 0.5) * v.sign()).clamp(-127, 127).to(torch.int8)


def quantize_tokens_ref(x2: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x2.float()
    qmax = QMAX[fmt]
    scale = (xf.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    v = xf / scale
    q = _round_int8(v) if fmt == "int8" else v.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    return q, scale


def int8_epilogue_ref(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias: Optional[torch.Tensor],
                      dtype: torch.dtype) -> torch.Tensor:
    y = acc.float() * xs * ws[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_rows(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, QMAX_: tl.constexpr, IS_INT8: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        s = tl.maximum(tl.max(amax, axis=0) / QMAX_, 1e-12)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            v = x / s
            if IS_INT8:
                r = tl.floor(tl.abs(v) + 0.5)
                v = tl.where(v < 0, -r, r)
            v = tl.minimum(tl.maximum(v, -QMAX_), QMAX_)
            tl.store(q_ptr + row * stride_qm + k0 + rk, v.to(q_ptr.dtype.element_ty), mask=k0 + rk < K)
        tl.store(s_ptr + row, s)

    @triton.jit
    def _int8_epilogue(acc_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, stride_am, stride_ym, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        rm64 = rm.to(tl.int64)
        acc = tl.load(acc_ptr + rm64[:, None] * stride_am + rn[None, :], mask=mask, other=0).to(tl.float32)
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        y = acc * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def quantize_tokens(x2: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (codes [M, K], scale [M, 1] fp32): Triton on CUDA (and under TRITON_INTERPRET=1)."""
    if not triton_can_run(x2) or x2.stride(-1) != 1:
        return quantize_tokens_ref(x2, fmt)
    m, k = x2.shape
    fp8_in_interpreter = fmt == "fp8" and interpreting()
    q = torch.empty(m, k, device=x2.device, dtype=torch.float32 if fp8_in_interpreter else CODE[fmt])
    s = torch.empty(m, 1, device=x2.device, dtype=torch.float32)
    block = min(4096, triton.next_power_of_2(max(k, 16)))
    if m:
        _quant_rows[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), QMAX_=QMAX[fmt], IS_INT8=fmt == "int8",
                          BLOCK_K=block, num_warps=8 if block >= 2048 else 4)
    return (q.to(torch.float8_e4m3fn) if fp8_in_interpreter else q), s


def int8_epilogue(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias: Optional[torch.Tensor],
                  dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] int32, xs [M, 1] fp32, ws [N] fp32, bias [N] -> [M, N] in `dtype`."""
    if not triton_can_run(acc) or acc.stride(-1) != 1:
        return int8_epilogue_ref(acc, xs, ws, bias, dtype)
    m, n = acc.shape
    y = torch.empty(m, n, device=acc.device, dtype=dtype)
    bm, bn = 32, 128
    if m and n:
        _int8_epilogue[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            acc, xs, ws, bias if bias is not None else ws, y, m, n, acc.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y


# ---------------------------------------------------------------------------------------------------------------
# the linear: one opaque op, so torch.compile and CUDA graphs take it whole
# ---------------------------------------------------------------------------------------------------------------
INT_MM_MIN_M = 17  # torch._int_mm needs M > 16 (and K, N multiples of 8)


def w8a8_linear_ref(x2: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    fmt: str) -> torch.Tensor:
    """The same codes multiplied in float32 (exact for int8 products; the CPU path and the test reference)."""
    xq, xs = quantize_tokens_ref(x2, fmt)
    y = (xq.float() @ weight.float().t()) * xs * w_scale.float()[None, :]
    return (y if bias is None else y + bias.float()).to(x2.dtype)


@torch.library.custom_op("hf_accel::w8a8_diffusion_linear", mutates_args=())
def w8a8_linear(x2: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                fmt: str) -> torch.Tensor:
    """y [M, N] = dequant(quant_per_token(x2) @ weight.T) + bias; weight [N, K] int8 / float8_e4m3fn, w_scale [N]
    fp32. CUDA: Triton quantizer, then torch._int_mm + Triton epilogue (int8) or torch._scaled_mm with row-wise
    scales (fp8, bf16 out); small M (AdaLN-style layers) multiplies the codes in x's dtype (exact codes, fp32
    accumulation in cuBLAS). Elsewhere: `w8a8_linear_ref`."""
    if not x2.is_cuda:
        return w8a8_linear_ref(x2, weight, w_scale, bias, fmt)
    m, dtype = x2.shape[0], x2.dtype
    xq, xs = quantize_tokens(x2.contiguous(), fmt)
    if fmt == "int8" and m >= INT_MM_MIN_M:
        return int8_epilogue(torch._int_mm(xq, weight.t()), xs, w_scale, bias, dtype)
    if fmt == "fp8" and m >= INT_MM_MIN_M and fp8_tensor_cores(x2.device):
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=w_scale[None, :], out_dtype=torch.bfloat16)
        y = y if bias is None else y + bias.to(y.dtype)
        return y.to(dtype)
    y = (xq.to(dtype) @ weight.to(dtype).t()) * (xs * w_scale[None, :]).to(dtype)
    return y if bias is None else y + bias.to(dtype)


@w8a8_linear.register_fake
def _(x2, weight, w_scale, bias, fmt):
    return x2.new_empty(x2.shape[0], weight.shape[0])
