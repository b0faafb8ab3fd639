"""Decode attention over selected pages of a per-head KV cache (Quest-style reads), pad-aware, CUDA-graph safe.

    out = paged_decode_attention(q, k, v, page_table, n_valid, real, scale, page)

- q [B, H, G, D]: the G query heads that share KV head h (grouped-query attention, one decode step);
- k, v [B, H, C, D]: the cache of each KV head (C slots, last dim contiguous); only the pages named in
  `page_table` [B, H, P] (int32 page indices, -1 = none) are read, so a step reads P * page slots, not C;
- a slot counts when `slot < n_valid[b]` and, if `real` [B, C] (bool) is given, `real[b, slot]`: left padding and
  not-yet-written slots are masked per row, so rows of different lengths share one launch.

The kernel (flash-decoding): grid (B * H, SPLITS); each program walks every SPLITS-th page of its list with an
online softmax and writes a partial (max, sum, acc); a few torch ops combine the splits. Nothing asks the host for a
value, the grid depends on shapes only, so it captures into a CUDA graph. `paged_decode_attention_ref` is the
plain-torch reference (gather + softmax in float32) used on the CPU and by the tests (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math

import torch

from ._base import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_decode_kernel(Q, K, V, PT, NV, REAL, Mo, Lo, Ao,
                             s_qb, s_qh, s_qg, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_rb,
                             H, G, D, P, scale,
                             PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                             SPLITS: tl.constexpr, HAS_REAL: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_p = tl.arange(0, PAGE)
        gmask = offs_g < G
        dmask = offs_d < D
        q = tl.load(Q + b * s_qb + h * s_qh + offs_g[:, None] * s_qg + offs_d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        nv = tl.load(NV + b)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        for i in range(split, P, SPLITS):
            pg = tl.load(PT + b * s_pb + h * s_ph + i)
            pgv = tl.zeros((PAGE,), tl.int32) + pg
            slots = pgv * PAGE + offs_p
            valid = (pgv >= 0) & (slots < nv)
            if HAS_REAL:
                valid = valid & (tl.load(REAL + b * s_rb + slots, mask=valid, other=0) != 0)
            kv_mask = valid[:, None] & dmask[None, :]
            k = tl.load(K + b * s_kb + h * s_kh + slots[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [BLOCK_G, PAGE]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            v = tl.load(V + b * s_vb + h * s_vh + slots[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m = m_new
        row = bh * SPLITS + split
        tl.store(Mo + row * BLOCK_G + offs_g, m)
        tl.store(Lo + row * BLOCK_G + offs_g, l)
        tl.store(Ao + (row * BLOCK_G + offs_g[:, None]) * BLOCK_D + offs_d[None, :], acc)


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


def kernel_supported(q: torch.Tensor, page: int) -> bool:
    """The Triton kernel serves CUDA tensors (or the interpreter) with a power-of-two page of >= 16 slots."""
    from ._base import interpreting

    return HAS_TRITON and (q.is_cuda or interpreting()) and page >= 16 and page & (page - 1) == 0


def choose_splits(bh: int, pages: int, target_programs: int = 264) -> int:
    """Programs per (row, KV head): enough to fill the GPU (~2 waves of 132 SMs), each with >= 4 pages."""
    return max(1, min(math.ceil(target_programs / max(bh, 1)), math.ceil(pages / 4), 64))


def paged_decode_attention(q, k, v, page_table, n_valid, real, scale: float, page: int, splits: int | None = None):
    """[B, H, G, D] attention output; see the module docstring. Falls back to the reference where the kernel
    cannot run (CPU without the interpreter, pages that are not a power of two >= 16)."""
    if not kernel_supported(q, page):
        return paged_decode_attention_ref(q, k, v, page_table, n_valid, real, scale, page)
    b, h, g, d = q.shape
    p = page_table.shape[-1]
    splits = splits or choose_splits(b * h, p)
    bg, bd = _pow2(g, 16), _pow2(d, 16)
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and q.stride(-1) == 1
    page_table = page_table.to(torch.int32)
    n_valid = n_valid.to(torch.int32).expand(b).contiguous() if n_valid.dim() else n_valid.to(torch.int32).reshape(1).expand(b).contiguous()
    mo = torch.empty(b * h * splits * bg, dtype=torch.float32, device=q.device)
    lo = torch.empty_like(mo)
    ao = torch.empty(b * h * splits * bg * bd, dtype=torch.float32, device=q.device)
    has_real = real is not None
    real_t = real.to(torch.uint8) if has_real else n_valid  # a dummy pointer when there is no mask
    _paged_decode_kernel[(b * h, splits)](
        q, k, v, page_table, n_valid, real_t, mo, lo, ao,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), page_table.stride(0), page_table.stride(1),
        real_t.stride(0) if has_real else 0,
        h, g, d, p, float(scale),
        PAGE=page, BLOCK_G=bg, BLOCK_D=bd, SPLITS=splits, HAS_REAL=has_real, num_warps=4)
    m = mo.view(b, h, splits, bg)
    w_max = m.amax(2, keepdim=True)
    w = torch.exp(m - torch.where(torch.isinf(w_max), 0.0, w_max))  # -inf partials weigh 0
    denom = (lo.view(b, h, splits, bg) * w).sum(2)
    out = (ao.view(b, h, splits, bg, bd) * w[..., None]).sum(2) / denom.clamp(min=1e-30)[..., None]
    return out[:, :, :g, :d].to(q.dtype)


def gather_pages(t: torch.Tensor, page_table: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t [B, H, C, D] at the slots of the pages in page_table [B, H, P] -> ([B, H, P * page, D], slots [B, H, P*page])
    (slots of page -1 are -1; they are read at slot 0 and must be masked by the caller)."""
    offs = torch.arange(page, device=t.device)
    slots = (page_table.long()[..., None] * page + offs).flatten(-2)
    slots = torch.where(page_table.long().repeat_interleave(page, dim=-1) >= 0, slots, -1)
    safe = slots.clamp(0, t.shape[2] - 1)
    return t.gather(2, safe[..., None].expand(*safe.shape, t.shape[-1])), slots


def paged_decode_attention_ref(q, k, v, page_table, n_valid, real, scale: float, page: int):
    """Plain torch: gather the selected pages, mask, softmax in float32."""
    b = q.shape[0]
    ks, slots = gather_pages(k, page_table, page)
    vs, _ = gather_pages(v, page_table, page)
    nv = n_valid.reshape(-1).expand(b) if n_valid.dim() else n_valid.reshape(1).expand(b)
    valid = (slots >= 0) & (slots < nv.view(b, 1, 1))
    if real is not None:
        valid = valid & real.gather(1, slots.clamp(min=0).flatten(1)).view_as(slots)
    logits = torch.einsum("bhgd,bhnd->bhgn", q.float(), ks.float()) * scale
    logits = logits.masked_fill(~valid[:, :, None, :], -math.inf)
    probs = logits.softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhgn,bhnd->bhgd", probs, vs.float()).to(q.dtype)
