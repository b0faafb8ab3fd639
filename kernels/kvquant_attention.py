"""Decode attention that reads kvquant's codes in place (split-K, flash-decoding style), pad-aware, CUDA-graph safe.

    out = kvquant_decode_attention(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale, bits, group)

Why: inside the `fast` runtime, kvquant's static layers used to hand attention a dequantised [B, H, C, D] copy of
the whole cache every step: read the codes, write bf16 K/V, read them again -- more bytes than the bf16 cache the
codes replace. This kernel reads each cached token's codes and scales once and nothing else, so the attention's
bytes per token fall with the bit width (kernels/NOTES.md, "kvquant decode attention").

Layout (what `plugins/kv_cache/_fast.py` stores; B rows, H KV heads, C slots, D dims, W ring slots):

    query       [B, Hq, Q, D]     Hq = H * G query heads; head h*G + g reads KV head h (grouped-query attention)
    kc, vc      uint8 [B, H, C, D * bits / 8]   asymmetric codes, 8 / bits channels per byte, channel 0 in the low
                                  bits (`plugins/kv_cache/_layers.quantize`)
    ks, kz, vs, vz  [B, H, C, D / group]   per-token scale and minimum of each group of `group` channels
    channel     [B, H, 1, D]      the keys' per-channel scale: k = (code * s + z) * channel, v = code * s + z
    rk, rv      [B, H, W, D]      full-precision ring: slot j reads ring slot j % W when j >= qlen
    qlen        [1] integer       slots [0, qlen) read the codes, the others the ring (a device tensor)
    mask        [B, 1, Q, C]      bool (True = attend) or additive (a slot is masked where the bias is <= the
                                  dtype's minimum, as the runtime's `as_kind` writes it; other biases are added)

Output [B, Q, Hq, D] in the query's dtype (the layout attention modules reshape to [B, Q, Hq * D]).

The kernel: grid (B * H, SPLITS). A program folds the G * Q query rows of one KV head into one tile, walks a
contiguous range of BLOCK_N-slot tiles and keeps an online softmax in float32; slots that no row of the tile may
see are never loaded (masked loads), and scores are masked with `where`, so garbage in masked slots (unwritten, or
padding) cannot reach the result. Codes are loaded as int32 words (vector loads) and unpacked with shifts; a code
becomes a float through the exponent trick (code | 0x4B000000 is 2^23 + code), not the conversion unit. A second
kernel merges the splits' (max, sum, acc) partials and writes the output. The grid and split count depend only on
shapes, nothing asks the device for a value: the op captures into a CUDA graph and is opaque to torch.compile
(`torch.library.custom_op` with a shape-only fake). Off CUDA (and without TRITON_INTERPRET=1) the op runs
`kvquant_decode_attention_ref`: dequantise, then attention in float32.
"""

from __future__ import annotations

import math

import torch

from ._base import HAS_TRITON, interpreting, triton_can_run

MAX_ROWS = 64  # query rows (G * Q) per launch; longer blocks (speculative verification) are split by query token

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dequant_tile(C_ptr, S_ptr, Z_ptr, offs_n, load, s_cn, s_sn,
                      BITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
        """Codes of the slots offs_n [BLOCK_N] -> float32 [BLOCK_N, D] = code * scale + min (0 where not `load`)."""
        PER: tl.constexpr = 32 // BITS  # channels per int32 word
        DW: tl.constexpr = D // PER
        NG: tl.constexpr = D // GROUP
        offs_w = tl.arange(0, DW)
        words = tl.load(C_ptr + offs_n[:, None] * s_cn + offs_w[None, :], mask=load[:, None], other=0)
        shifts = tl.arange(0, PER) * BITS
        codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # channel = word * PER + p
        f = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + code, exactly; minus 2^23
        offs_g = tl.arange(0, NG)
        sz_off = offs_n[:, None] * s_sn + offs_g[None, :]
        s = tl.load(S_ptr + sz_off, mask=load[:, None], other=0.0).to(tl.float32)
        z = tl.load(Z_ptr + sz_off, mask=load[:, None], other=0.0).to(tl.float32)
        x = tl.reshape(f, (BLOCK_N, NG, GROUP)) * s[:, :, None] + z[:, :, None]
        return tl.reshape(x, (BLOCK_N, D))

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """float32 operands: TF32 tensor cores for half-precision models (their K/V were rounded to 8 mantissa bits
        anyway), exact float32 for float32 models; the interpreter multiplies in float32 either way."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _kvq_decode_kernel(Q, KC, KS, KZ, VC, VS, VZ, CH, RK, RV, QL, MASK, Mo, Lo, Ao, Out,
                           s_qb, s_qh, s_qt, s_cb, s_ch, s_cn, s_sb, s_sh, s_sn, s_chb, s_chh,
                           s_rb, s_rh, s_rn, s_mb, s_mq, s_mn, s_ob, s_ot, s_oh,
                           H, G, QN, C, W, TILES_PER_SPLIT, SPLITS, scale, mask_floor,
                           BITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_N: tl.constexpr, ADDITIVE: tl.constexpr, IEEE: tl.constexpr,
                           DIRECT: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // H).to(tl.int64)  # row offsets exceed 2^31 bytes at long context x large batch
        h = (bh % H).to(tl.int64)
        R = G * QN
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, D)
        rmask = offs_r < R
        g = offs_r // QN
        t = offs_r % QN  # row r = g * QN + t: query head h * G + g, query token t
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + t[:, None] * s_qt + offs_d[None, :],
                    mask=rmask[:, None], other=0.0).to(tl.float32)
        ch = tl.load(CH + b * s_chb + h * s_chh + offs_d).to(tl.float32)
        ql = tl.load(QL)
        kc = KC + b * s_cb + h * s_ch
        vc = VC + b * s_cb + h * s_ch
        ks, kz = KS + b * s_sb + h * s_sh, KZ + b * s_sb + h * s_sh
        vs, vz = VS + b * s_sb + h * s_sh, VZ + b * s_sb + h * s_sh
        rk, rv = RK + b * s_rb + h * s_rh, RV + b * s_rb + h * s_rh
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, D), tl.float32)
        start = split * TILES_PER_SPLIT * BLOCK_N
        stop = tl.minimum(start + TILES_PER_SPLIT * BLOCK_N, C)
        for n0 in range(start, stop, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            inb = offs_n < C
            sees = rmask[:, None] & inb[None, :]
            mk = tl.load(MASK + b * s_mb + t[:, None] * s_mq + offs_n[None, :] * s_mn, mask=sees, other=0)
            if ADDITIVE:
                bias = mk.to(tl.float32)
                valid = sees & (bias > mask_floor)
            else:
                valid = sees & (mk != 0)
            load = tl.max(valid.to(tl.int32), 0) > 0  # [BLOCK_N]: some row of this tile sees the slot
            quant = load & (offs_n < ql)
            ring = load & (offs_n >= ql)
            ring_off = (offs_n % W)[:, None] * s_rn + offs_d[None, :]
            k = _dequant_tile(kc, ks, kz, offs_n, quant, s_cn, s_sn, BITS, GROUP, D, BLOCK_N) * ch[None, :]
            k = tl.where(quant[:, None], k, tl.load(rk + ring_off, mask=ring[:, None], other=0.0).to(tl.float32))
            s = _mm(q, tl.trans(k), IEEE) * scale  # [BLOCK_R, BLOCK_N]
            if ADDITIVE:
                s = s + bias
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])  # exactly 0 where masked
            alpha = tl.exp(m - m_safe)
            v = _dequant_tile(vc, vs, vz, offs_n, quant, s_cn, s_sn, BITS, GROUP, D, BLOCK_N)
            v = tl.where(quant[:, None], v, tl.load(rv + ring_off, mask=ring[:, None], other=0.0).to(tl.float32))
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p, v, IEEE)
            m = m_new
        if DIRECT:  # one split: normalise and write the output here (no partials, no second kernel)
            out = acc / tl.maximum(l, 1e-30)[:, None]  # a row that sees nothing: 0
            tl.store(Out + b * s_ob + t[:, None] * s_ot + (h * G + g)[:, None] * s_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=rmask[:, None])
        else:
            part = (bh * SPLITS + split) * R + offs_r
            tl.store(Mo + part, m, mask=rmask)
            tl.store(Lo + part, l, mask=rmask)
            tl.store(Ao + part[:, None] * D + offs_d[None, :], acc, mask=rmask[:, None])

    @triton.jit
    def _kvq_combine_kernel(Mo, Lo, Ao, Out, s_ob, s_ot, s_oh, H, G, QN, SPLITS,
                            D: tl.constexpr, BLOCK_S: tl.constexpr):
        """One (row, KV head, query row): merge the splits' partials, divide, round once to the output dtype."""
        pid = tl.program_id(0)
        R = G * QN
        r = pid % R
        bh = pid // R
        b = (bh // H).to(tl.int64)
        h = bh % H
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        smask = offs_s < SPLITS
        part = (bh * SPLITS + offs_s) * R + r
        m = tl.load(Mo + part, mask=smask, other=float("-inf"))
        l = tl.load(Lo + part, mask=smask, other=0.0)
        acc = tl.load(Ao + part[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
        top = tl.max(m, 0)
        w = tl.exp(m - tl.where(top == float("-inf"), 0.0, top))  # splits that saw nothing weigh 0
        denom = tl.sum(l * w, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.maximum(denom, 1e-30)  # a row that sees nothing: 0
        tl.store(Out + b * s_ob + (r % QN) * s_ot + (h * G + r // QN) * s_oh + offs_d, out.to(Out.dtype.element_ty))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kernel_supported(head_dim: int, bits: int, group: int) -> bool:
    """The layouts the Triton kernel reads: a power-of-two head_dim of 16..256 and group (the tiles are reshaped by
    group), 8/4/2-bit codes whose rows are whole int32 words."""
    return (HAS_TRITON and bits in (8, 4, 2) and _pow2(head_dim) and 16 <= head_dim <= 256 and _pow2(group)
            and group <= head_dim and head_dim * bits % 32 == 0)


def choose_splits(bh: int, tiles: int, target_programs: int = 264) -> int:
    """Programs per (row, KV head): enough to fill the GPU (~2 waves of 132 SMs), each with >= 4 tiles."""
    return max(1, min(math.ceil(target_programs / max(bh, 1)), math.ceil(tiles / 4), 64))


def _words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes as int32 words (a view when the rows are 4-byte aligned, as the layer's storage is)."""
    if codes.stride(-1) != 1 or codes.storage_offset() % 4 or any(s % 4 for s in codes.stride()[:-1]):
        codes = codes.contiguous()
    return codes.view(torch.int32)


def _launch(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale: float, bits: int, group: int,
            out: torch.Tensor, block_n: int | None, splits: int | None, num_warps: int) -> None:
    b, hq, qn, d = query.shape
    h, c, w = kc.shape[1], kc.shape[2], rk.shape[2]
    g = hq // h
    r = g * qn
    block_r = max(16, triton.next_power_of_2(r))
    if block_n is None:  # the interpreter's cost is per operation, not per element: few large tiles
        block_n = 256 if interpreting() else 64 if d <= 64 else 32
    tiles = triton.cdiv(c, block_n)
    splits = splits or choose_splits(b * h, tiles)
    per = triton.cdiv(tiles, min(splits, tiles))
    splits = triton.cdiv(tiles, per)
    query = query if query.stride(-1) == 1 else query.contiguous()
    kw, vw = _words(kc), _words(vc)
    if vw.stride() != kw.stride():
        kw, vw = kw.contiguous(), vw.contiguous()
    ks, kz, vs, vz = (x if x.stride(-1) == 1 else x.contiguous() for x in (ks, kz, vs, vz))
    if not (ks.stride() == kz.stride() == vs.stride() == vz.stride()):
        ks, kz, vs, vz = (x.contiguous() for x in (ks, kz, vs, vz))
    if rk.stride(-1) != 1 or rv.stride() != rk.stride():
        rk, rv = rk.contiguous(), rv.contiguous()
    channel = channel if channel.stride(-1) == 1 else channel.contiguous()
    additive = mask.dtype != torch.bool
    m = mask if additive else mask.view(torch.uint8)
    floor = torch.finfo(mask.dtype).min if additive else 0.0
    s_mb = m.stride(0) if m.shape[0] > 1 else 0
    s_mq = m.stride(2) if m.shape[2] > 1 else 0
    direct = splits == 1
    parts = 1 if direct else b * h * splits * r  # (max, sum) per split and row, acc per split, row and dim
    mo = torch.empty(parts, dtype=torch.float32, device=query.device)
    lo = torch.empty_like(mo)
    ao = torch.empty(parts * (1 if direct else d), dtype=torch.float32, device=query.device)
    _kvq_decode_kernel[(b * h, splits)](
        query, kw, ks, kz, vw, vs, vz, channel, rk, rv, qlen, m, mo, lo, ao, out,
        query.stride(0), query.stride(1), query.stride(2), kw.stride(0), kw.stride(1), kw.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), channel.stride(0), channel.stride(1),
        rk.stride(0), rk.stride(1), rk.stride(2), s_mb, s_mq, m.stride(3), out.stride(0), out.stride(1),
        out.stride(2), h, g, qn, c, w, per, splits, float(scale), float(floor),
        BITS=bits, GROUP=group, D=d, BLOCK_R=block_r, BLOCK_N=block_n, ADDITIVE=additive,
        IEEE=query.dtype == torch.float32, DIRECT=direct, num_warps=num_warps)
    if not direct:
        _kvq_combine_kernel[(b * h * r,)](mo, lo, ao, out, out.stride(0), out.stride(1), out.stride(2), h, g, qn,
                                          splits, D=d, BLOCK_S=triton.next_power_of_2(splits), num_warps=4)


def kvquant_decode_attention_triton(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale: float,
                                    bits: int, group: int, block_n: int | None = None,
                                    splits: int | None = None, out: torch.Tensor | None = None,
                                    num_warps: int = 4) -> torch.Tensor:
    """The kernels (no fallback); `block_n` (slots per tile, a power of two >= 16) and `splits` (programs per row and
    KV head) default to the launch heuristic, the tests pin them to walk several tiles and splits (and pass a
    NaN-filled `out` [B, Q, Hq, D] to see that every element is written); bench_kv's kernel rows vary them and
    `num_warps`. Defaults are untuned guesses (kernels/NOTES.md, "kvquant decode attention")."""
    b, hq, qn, d = query.shape
    if out is None:
        out = torch.empty(b, qn, hq, d, dtype=query.dtype, device=query.device)
    g = hq // kc.shape[1]
    step = max(1, MAX_ROWS // g)  # query tokens per launch
    for t0 in range(0, qn, step):
        t1 = min(qn, t0 + step)
        _launch(query[:, :, t0:t1], kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask[:, :, t0:t1], scale, bits,
                group, out[:, t0:t1], block_n, splits, num_warps)
    return out


# ---------------------------------------------------------------------------------------------------------------
# plain-torch reference
# ---------------------------------------------------------------------------------------------------------------
def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., D * bits / 8] -> float32 [..., D] in channel order (8 / bits channels per byte, low bits first)."""
    per, mask = 8 // bits, (1 << bits) - 1
    if per == 1:
        return codes.float()
    return torch.stack([(codes >> (bits * i)) & mask for i in range(per)], dim=-1).flatten(-2).float()


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """code * scale + min per group of `group` channels, in float32."""
    x = unpack_codes(codes, bits)
    *lead, n, d = x.shape
    x = x.reshape(*lead, n, d // group, group) * scale.float()[..., None] + lo.float()[..., None]
    return x.reshape(*lead, n, d)


def kvquant_decode_attention_ref(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale: float,
                                 bits: int, group: int) -> torch.Tensor:
    """Dequantise the whole capacity (rounded to the query dtype, as the dequantised path hands K/V to attention),
    take the ring where slot >= qlen, then masked attention in float32 (`where`, never a multiply by 0)."""
    b, hq, qn, d = query.shape
    h, c, w = kc.shape[1], kc.shape[2], rk.shape[2]
    g = hq // h
    slots = torch.arange(c, device=query.device)
    quantized = (slots < qlen.reshape(1))[:, None]
    ring = slots % w
    keys = torch.where(quantized, dequantize_ref(kc, ks, kz, bits, group) * channel.float(),
                       rk.float().index_select(2, ring)).to(query.dtype).float()
    values = torch.where(quantized, dequantize_ref(vc, vs, vz, bits, group),
                         rv.float().index_select(2, ring)).to(query.dtype).float()
    mask = mask.expand(b, 1, qn, c)
    if mask.dtype == torch.bool:
        valid, bias = mask, None
    else:
        valid, bias = mask > torch.finfo(mask.dtype).min, mask.float()
    seen = valid.any(2)[..., None]  # [B, 1, C, 1]: slots some query sees; the others may hold anything
    values = torch.where(seen, values, 0.0)
    rows = lambda x: x[:, :, None].expand(b, x.shape[1], g, qn, c).reshape(b, x.shape[1], g * qn, c)  # noqa: E731
    q = query.float().reshape(b, h, g * qn, d)  # row g * Q + t: query head h * G + g, token t
    logits = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + rows(bias)
    logits = torch.where(rows(valid), logits, -math.inf)
    probs = logits.softmax(-1).nan_to_num(0.0)  # a row that sees nothing: 0
    out = torch.matmul(probs, values).reshape(b, h * g, qn, d)
    return out.transpose(1, 2).to(query.dtype)


# ---------------------------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("hf_accel::kvquant_decode_attention", mutates_args=())
def kvquant_decode_attention(query: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor,
                             vc: torch.Tensor, vs: torch.Tensor, vz: torch.Tensor, channel: torch.Tensor,
                             rk: torch.Tensor, rv: torch.Tensor, qlen: torch.Tensor, mask: torch.Tensor,
                             scale: float, bits: int, group: int) -> torch.Tensor:
    """Attention of `query` over kvquant's codes + ring: [B, Q, Hq, D] (see the module docstring). The Triton
    kernel where Triton runs (CUDA; the CPU under TRITON_INTERPRET=1), the plain-torch reference elsewhere."""
    if triton_can_run(query) and kernel_supported(query.shape[-1], bits, group):
        return kvquant_decode_attention_triton(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale,
                                               bits, group)
    return kvquant_decode_attention_ref(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale, bits, group)


@kvquant_decode_attention.register_fake
def _(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale, bits, group):
    b, hq, qn, d = query.shape
    return query.new_empty(b, qn, hq, d)


__all__ = ["MAX_ROWS", "dequantize_ref", "interpreting", "kernel_supported", "kvquant_decode_attention",
           "kvquant_decode_attention_ref", "kvquant_decode_attention_triton", "unpack_codes"]
