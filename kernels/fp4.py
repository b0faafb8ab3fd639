"""FP4 (e2m1) weights with block scales, weight-only (W4A16): MXFP4 and NVFP4 storage, dequantised in the kernel.

Formats (OCP Microscaling v1.0 / NVIDIA NVFP4), per row and block of B consecutive inputs:
- "mxfp4": B = 32, block scale E8M0 (a uint8 exponent e, scale 2^(e - 127)); no tensor scale.
- "nvfp4": B = 16, block scale float8 e4m3 (stored as its uint8 bits), times one fp32 scale per tensor.
    w[n, k] = e2m1(code[n, k]) * block_scale[n, k // B] (* tensor_scale)
e2m1 codes: bit 3 the sign, bits 0..2 index {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Codes are packed 8 per int32 word in the
int4 layout (`kernels/int4.py`, `pack_int4` with group = B): the same word tile and x planes as the int4 v3 GEMV.
K is zero-padded to a multiple of B (`in_features` keeps the true K).

Hopper (H100/H200) has no FP4 tensor cores (Blackwell has), so FP4 here is a *storage* format: the kernel streams
~4.25 (mxfp4) / ~4.5 (nvfp4) bits per weight and decodes e2m1 on the CUDA cores, which costs more integer work per
weight than int4's (nibble -> magnitude through a 32-bit table held in a register, sign by an xor): at batch 1 it
can at best match int4 g32 (same bytes), and for prefill it dequantises to bf16 and runs cuBLAS, like int4.
Precision: e2m1 has 8 magnitudes against int4's 16 levels, so RTN FP4 is less accurate than int4 g32 on the
weights of an LLM; its interest is compatibility with checkpoints and hardware (Blackwell) that use it.

Decode without the conversion unit: mag2 = (0xC8643210 >> 4 * (code & 7)) & 0xF is 2x the magnitude (0..12), and
(mag2 << 16) | 0x43000000 is the fp32 128 + mag2 exactly; minus 128, xor the sign; the 1/2 is folded into the scale.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._base import (SIBLING, HAS_TRITON, LaunchConfig, bgemv_default, device_key, flatten, m_bucket, sm_count,
                    split_plan, splitk_reduce, use_triton)
from .int4 import pack_int4, padded_k, unpack_int4

FORMATS = {"mxfp4": 32, "nvfp4": 16}  # format -> block size
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
LUT2 = -932957680  # int32 0xC8643210: nibble i = 2 * E2M1[i]
ROWS_PER_STEP = 2048


# ---------------------------------------------------------------------------------------------------------------
# quantization and the plain-torch reference
# ---------------------------------------------------------------------------------------------------------------
def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest e2m1 codes (0..15) of fp32 values already divided by their scale (|v| > 6 clamps)."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=v.device)
    em = torch.bucketize(v.abs(), mids)
    return em | (((v < 0) & (em > 0)).to(em.dtype) << 3)


def _e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1, device=codes.device)
    v = table[(codes & 7).long()]
    return torch.where(codes >= 8, -v, v)


def decode_scales(scales: torch.Tensor, global_scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Stored uint8 block scales -> fp32 (the same bits the kernel builds)."""
    if fmt == "mxfp4":
        return (scales.to(torch.int32) << 23).view(torch.float32)
    return scales.view(torch.float8_e4m3fn).to(torch.float32) * global_scale.to(torch.float32)


@torch.no_grad()
def quantize_fp4(weight: torch.Tensor, fmt: str = "mxfp4") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (packed int32 [N, Kp / 8], uint8 block scales [N, Kp / B], fp32 tensor scale [1]).

    mxfp4: per block the better (lower squared error) of the OCP exponent floor(log2 amax) - 2 (the largest
    values clamp to 6) and ceil(log2(amax / 6)) (nothing clamps). nvfp4: tensor scale amax / (448 * 6), block
    scale amax_block / 6 / tensor scale rounded to e4m3; codes from the stored (rounded) scales."""
    if fmt not in FORMATS:
        raise ValueError(f"fp4 format must be one of {sorted(FORMATS)}, got {fmt!r}")
    b = FORMATS[fmt]
    n, k = weight.shape
    kp = padded_k(k, b)
    dev = weight.device
    gscale = torch.ones(1, dtype=torch.float32, device=dev)
    if fmt == "nvfp4":
        amax_t = weight.detach().abs().amax().float()
        gscale = (amax_t / (448.0 * 6.0)).clamp(min=1e-12).reshape(1).to(dev)
    packed, scales = [], []
    for r0 in range(0, n, ROWS_PER_STEP):
        w = weight[r0:r0 + ROWS_PER_STEP].detach().to(torch.float32)
        if kp != k:
            w = F.pad(w, (0, kp - k))
        wb = w.reshape(w.shape[0], kp // b, b)
        amax = wb.abs().amax(dim=-1)
        if fmt == "mxfp4":
            best_err, best_e, best_codes = None, None, None
            safe = amax.clamp(min=2.0**-126)
            for e in (torch.floor(torch.log2(safe)) - 2, torch.ceil(torch.log2(safe / 6.0))):
                e = e.clamp(-127, 127)
                s = torch.pow(2.0, e)
                codes = _e2m1_codes(wb / s[..., None])
                err = ((_e2m1_values(codes) * s[..., None] - wb) ** 2).sum(-1)
                if best_err is None:
                    best_err, best_e, best_codes = err, e, codes
                else:
                    better = err < best_err
                    best_e = torch.where(better, e, best_e)
                    best_codes = torch.where(better[..., None], codes, best_codes)
                    best_err = torch.where(better, err, best_err)
            stored = torch.where(amax > 0, best_e + 127, torch.zeros_like(best_e)).to(torch.uint8)
            codes = torch.where((amax > 0)[..., None], best_codes, torch.zeros_like(best_codes))
        else:
            bs = (amax / 6.0 / gscale).clamp(max=448.0).to(torch.float8_e4m3fn)
            s = bs.to(torch.float32) * gscale
            codes = _e2m1_codes(torch.where(s[..., None] > 0, wb / s.clamp(min=1e-30)[..., None], torch.zeros_like(wb)))
            stored = bs.view(torch.uint8)
        packed.append(pack_int4(codes.reshape(w.shape[0], kp), b))
        scales.append(stored)
    return torch.cat(packed), torch.cat(scales), gscale


def fp4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, fmt: str,
                   in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    b = FORMATS[fmt]
    n = qweight.shape[0]
    codes = unpack_int4(qweight, b).reshape(n, -1, b)
    w = _e2m1_values(codes) * decode_scales(scales, global_scale, fmt)[..., None]
    return w.reshape(n, -1)[:, :in_features].to(dtype)


def fp4_linear_ref(x, qweight, scales, global_scale, bias, fmt: str, in_features: int) -> torch.Tensor:
    w = fp4_dequantize(qweight, scales, global_scale, fmt, in_features, x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fp4_plane(w, lut, I: tl.constexpr):
        """Nibble I of every word -> 2x its e2m1 value (fp32, exact)."""
        nib = (w >> (4 * I)) & 0xF
        mag2 = (lut >> ((nib & 7) * 4)) & 0xF
        v = ((mag2 << 16) | 0x43000000).to(tl.float32, bitcast=True) - 128.0
        return (v.to(tl.int32, bitcast=True) ^ ((nib & 8) << 28)).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp4_scale(sb, g, NV: tl.constexpr):
        """uint8 block scales -> fp32 scale / 2 (the plane values are 2x)."""
        if NV:
            s = sb.to(tl.float8e4nv, bitcast=True).to(tl.float32) * g
        else:
            s = (sb.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        return s * 0.5

    @triton.jit
    def _fp4_bgemv(x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, M, N, K, NB, STEPS, lut, stride_xm, stride_ym,
                   B: tl.constexpr, NV: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                   SPLIT: tl.constexpr, ACC3: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BKW: tl.constexpr):
        """The int4 v3 GEMV's structure (kernels/int4.py `_int4_bgemv`) with the e2m1 decode and no zero point."""
        WPB: tl.constexpr = B // 8
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        KW = NB * WPB
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn_in = tl.where(rn < N, rn, 0)
        rm_in = tl.where(rm < M, rm, 0)
        rw = tl.arange(0, BKW)
        g = tl.load(g_ptr).to(tl.float32)
        w_first = pid_k * STEPS * BKW
        w_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * KW + (w_first + rw)[None, :]
        x_row = x_ptr + rm_in[:, None].to(tl.int64) * stride_xm
        s_row = rn_in[:, None].to(tl.int64) * NB
        if ACC3:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BKW], dtype=tl.float32)
        else:
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in range(0, STEPS):
            gw = w_first + step * BKW + rw
            blk = gw // WPB
            kx = blk * B + gw % WPB
            if EVEN:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                sb = tl.load(s_ptr + s_row + blk[None, :])
            else:
                w_ok = gw < KW
                w = tl.load(w_ptrs, mask=w_ok[None, :], other=0, eviction_policy="evict_first")
                sb = tl.load(s_ptr + s_row + blk[None, :], mask=w_ok[None, :], other=0)
            t = tl.zeros([BLOCK_M, BLOCK_N, BKW], dtype=tl.float32)
            for i in tl.static_range(8):
                if EVEN:
                    xi = tl.load(x_row + (kx + i * WPB)[None, :]).to(tl.float32)
                else:
                    xi = tl.load(x_row + (kx + i * WPB)[None, :], mask=((kx + i * WPB < K) & (gw < KW))[None, :],
                                 other=0.0).to(tl.float32)
                t += _fp4_plane(w, lut, i)[None, :, :] * xi[:, None, :]
            part = _fp4_scale(sb, g, NV)[None, :, :] * t
            if ACC3:
                acc += part
            else:
                acc2 += tl.sum(part, axis=2)
            w_ptrs += BKW
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
    def _fp4_dequant(w_ptr, s_ptr, g_ptr, out_ptr, N, K, NB, lut, B: tl.constexpr, NV: tl.constexpr,
                     BLOCK_N: tl.constexpr, BKW: tl.constexpr):
        WPB: tl.constexpr = B // 8
        KW = NB * WPB
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        gw = tl.program_id(1) * BKW + tl.arange(0, BKW)
        ok = (rn < N)[:, None] & (gw < KW)[None, :]
        blk = gw // WPB
        kx = blk * B + gw % WPB
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * KW + gw[None, :], mask=ok, other=0)
        sb = tl.load(s_ptr + rn[:, None].to(tl.int64) * NB + blk[None, :], mask=ok, other=0)
        s = _fp4_scale(sb, tl.load(g_ptr).to(tl.float32), NV)
        for i in tl.static_range(8):
            k = kx + i * WPB
            v = _fp4_plane(w, lut, i) * s
            tl.store(out_ptr + rn[:, None].to(tl.int64) * K + k[None, :], v.to(out_ptr.dtype.element_ty),
                     mask=ok & (k < K)[None, :])


# ---------------------------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------------------------
TUNED: dict = {}  # (device, "mxfp4" | "nvfp4", m_bucket, N, K) -> {"kernel": "bgemv" | "dequant", LaunchConfig fields}
GEMV_MAX_M = 16


def fp4_bgemv(x2, qweight, scales, global_scale, bias, fmt: str, cfg: LaunchConfig | None = None, out=None):
    m, k = x2.shape
    n, nb = scales.shape
    b = FORMATS[fmt]
    cfg = cfg or bgemv_default(m, n, sm_count(x2.device), block_k=512)
    bkw = max(1, cfg.block_k // 8)
    kw = nb * b // 8
    steps, split = split_plan(kw, bkw, cfg.split_k)
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype) if out is None else out
    even = k == nb * b and kw == split * steps * bkw
    dst = y if split == 1 else torch.empty(split, m, n, device=x2.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _fp4_bgemv[grid](x2, qweight, scales, global_scale, bias if bias is not None else global_scale, dst, m, n, k, nb,
                     steps, LUT2, x2.stride(0), y.stride(0), B=b, NV=fmt == "nvfp4", HAS_BIAS=bias is not None,
                     EVEN=even, SPLIT=split, ACC3=cfg.acc3, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BKW=bkw,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        splitk_reduce(dst, bias, y)
    return y


def fp4_dequant(qweight, scales, global_scale, fmt: str, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    n, nb = scales.shape
    b = FORMATS[fmt]
    out = torch.empty(n, in_features, device=qweight.device, dtype=dtype)
    bkw = 32
    grid = (triton.cdiv(n, 16), triton.cdiv(nb * b // 8, bkw))
    _fp4_dequant[grid](qweight, scales, global_scale, out, n, in_features, nb, LUT2, B=b, NV=fmt == "nvfp4",
                       BLOCK_N=16, BKW=bkw, num_warps=4)
    return out


def fp4_linear_triton(x, qweight, scales, global_scale, bias, fmt: str, in_features: int) -> torch.Tensor:
    x2 = flatten(x)
    m = x2.shape[0]
    n = qweight.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    dk = device_key(x2.device)
    hit = TUNED.get((dk, fmt, m_bucket(m), n, x2.shape[1])) or TUNED.get((SIBLING.get(dk), fmt, m_bucket(m), n, x2.shape[1]))
    if hit is not None:
        hit = dict(hit)
        kind = hit.pop("kernel")
        cfg = LaunchConfig(**hit) if hit else None
    else:
        kind, cfg = ("bgemv" if m <= GEMV_MAX_M else "dequant"), None
    if kind == "bgemv":
        y = fp4_bgemv(x2, qweight, scales, global_scale, bias, fmt, cfg)
    else:
        y = F.linear(x2, fp4_dequant(qweight, scales, global_scale, fmt, in_features, x2.dtype), bias)
    return y.view(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------------------------
def _fmt(nv: bool) -> str:
    return "nvfp4" if nv else "mxfp4"


@torch.library.custom_op("hf_accel::fp4_linear", mutates_args=())
def fp4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
               bias: Optional[torch.Tensor], nv: bool, in_features: int) -> torch.Tensor:
    """y = x @ W.T + bias, W in MXFP4 (nv=False) or NVFP4 (nv=True) block-scale storage (module docstring)."""
    if use_triton(x):
        return fp4_linear_triton(x, qweight, scales, global_scale, bias, _fmt(nv), in_features)
    return fp4_linear_ref(x, qweight, scales, global_scale, bias, _fmt(nv), in_features)


@fp4_linear.register_fake
def _(x, qweight, scales, global_scale, bias, nv, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _fp4_setup(ctx, inputs, output):
    x, qweight, scales, global_scale, bias, nv, in_features = inputs
    ctx.save_for_backward(qweight, scales, global_scale)
    ctx.meta = (nv, in_features, bias is not None)


def _fp4_backward(ctx, grad):
    qweight, scales, global_scale = ctx.saved_tensors
    nv, in_features, has_bias = ctx.meta
    gx = grad @ fp4_dequantize(qweight, scales, global_scale, _fmt(nv), in_features, grad.dtype)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None
    return gx, None, None, None, gb, None, None


fp4_linear.register_autograd(_fp4_backward, setup_context=_fp4_setup)
