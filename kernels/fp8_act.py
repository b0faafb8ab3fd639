"""fp8 W8A8 for prefill and large batches: per-token dynamic activation scales, then `torch._scaled_mm`.

Weights are the fp8 weight-only format (`w8.py`: float8_e4m3fn [N, K], per-output-channel scale [N]), so one
artifact serves both paths. For a batch of M rows:
    M <  min_tokens   weight-only fp8 (`hf_accel::fp8_linear`: the GEMV / small-batch kernels; decode is bound by
                      the weight bytes, which W8A8 would not reduce)
    M >= min_tokens   x -> (xq e4m3 [M, K], xs = amax(|x_row|) / 448 fp32 [M, 1]) in one Triton pass per row, then
                      y = _scaled_mm(xq, W^T, scale_a=xs, scale_b=s[1, N], out_dtype=bf16): the fp8 tensor cores
                      (Hopper and Ada), 2x the bf16 FLOP rate.
On the CPU (and where _scaled_mm cannot run: fp16/fp32 activations, K or N not a multiple of 16, no fp8 tensor
cores) the reference simulates the same arithmetic: activations rounded to e4m3 with the same per-token scale,
products accumulated in fp32, both scales applied after the sum.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._base import HAS_TRITON, flatten, fp8_tensor_cores, interpreting, triton_can_run
from .w8 import FP8_MAX, fp8_linear

FP8_MIN_TOKENS = 64


# ---------------------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------------------
def quantize_per_token_ref(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (float8_e4m3fn [M, K], fp32 scales [M, 1]) with x ~= xq * scale."""
    amax = x2.abs().amax(dim=-1, keepdim=True).to(torch.float32).clamp(min=1e-12)
    xs = amax / FP8_MAX
    xq = (x2.to(torch.float32) * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, xs


def w8a8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    x2 = flatten(x)
    xq, xs = quantize_per_token_ref(x2)
    y = (xq.to(torch.float32) @ weight.to(torch.float32).T) * xs * scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Triton: per-token quantization (one program per row, two passes over the row; the second hits L2)
# ---------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_rows(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.maximum(tl.max(amax, axis=0), 1e-12)
        inv = 448.0 / m
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
            tl.store(q_ptr + row * stride_qm + k0 + rk, q.to(q_ptr.dtype.element_ty), mask=k0 + rk < K)
        tl.store(s_ptr + row, m / 448.0)


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA (and under TRITON_INTERPRET=1), the reference elsewhere."""
    if not triton_can_run(x2):
        return quantize_per_token_ref(x2)
    m, k = x2.shape
    # the interpreter's fp32 -> e4m3 cast is wrong (triton 3.x: 124.3 -> 64): there the kernel writes the scaled
    # fp32 values and torch rounds them; on the GPU the kernel rounds (cvt.rn.satfinite)
    xq = torch.empty(m, k, device=x2.device, dtype=torch.float32 if interpreting() else torch.float8_e4m3fn)
    xs = torch.empty(m, 1, device=x2.device, dtype=torch.float32)
    block = min(4096, triton.next_power_of_2(max(k, 16)))
    if m:
        _quant_rows[(m,)](x2, xq, xs, k, x2.stride(0), xq.stride(0), BLOCK_K=block, num_warps=8 if block >= 2048 else 4)
    return xq.to(torch.float8_e4m3fn), xs


def scaled_mm_ok(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    if not x2.is_cuda or x2.dtype != torch.bfloat16 or not hasattr(torch, "_scaled_mm"):
        return False
    n, k = weight.shape
    return k % 16 == 0 and n % 16 == 0 and fp8_tensor_cores(x2.device)


def w8a8_scaled_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    xq, xs = quantize_per_token(x2)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.to(torch.float32).reshape(1, -1),
                         out_dtype=x2.dtype)
    return y + bias.to(y.dtype) if bias is not None else y


# ---------------------------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("hf_accel::fp8_w8a8_linear", mutates_args=())
def fp8_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    min_tokens: int) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias; rows >= min_tokens: activations quantized per token to e4m3 (W8A8)."""
    m = x.numel() // max(x.shape[-1], 1)
    if m < min_tokens or m == 0:
        return fp8_linear(x, weight, scale, bias)
    x2 = flatten(x)
    if scaled_mm_ok(x2, weight):
        return w8a8_scaled_mm(x2, weight, scale, bias).view(*x.shape[:-1], weight.shape[0])
    return w8a8_linear_ref(x, weight, scale, bias)


@fp8_w8a8_linear.register_fake
def _(x, weight, scale, bias, min_tokens):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, scale, bias, min_tokens = inputs
    ctx.save_for_backward(weight, scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):  # straight-through for the activation rounding
    weight, scale = ctx.saved_tensors
    gx = grad @ (weight.to(torch.float32) * scale.to(torch.float32)[:, None]).to(grad.dtype)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return gx, None, None, gb, None


fp8_w8a8_linear.register_autograd(_backward, setup_context=_setup)

__all__ = ["FP8_MIN_TOKENS", "fp8_w8a8_linear", "quantize_per_token", "quantize_per_token_ref", "w8a8_linear_ref"]
