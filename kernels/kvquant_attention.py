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

The kernel: grid (B * H, SPLITS). A program folds the G * Q query rows of one KV head into one tile (padded to 16
rows for tl.dot), walks a contiguous slot range in BLOCK_N-slot tiles with an online softmax in float32 (base 2:
the softmax scale, log2(e) and the keys' channel scale are folded into q once), first the slots below `qlen` from
the codes, then the slots from `qlen` on from the ring, each in a loop of its own. Codes are loaded as
[BLOCK_N, groups, words] int32 tiles (vector loads of exactly the slots some row attends to), unpacked with shifts
and put in channel order with `tl.interleave`; a code becomes a float through the exponent trick
(code | 0x4B000000 is 2^23 + code), then one FMA with its group's scale and minimum. Both dots take operands in the
model dtype (bf16/fp16 tensor cores, float32 accumulation; float32 models exact). Triton's pipeliner stages the
tile loads as asynchronous copies ahead of the compute. Masked slots are never loaded and every selection uses
`where`, so garbage in masked slots (unwritten, or padding) cannot reach the result. A second kernel merges the
splits' (max, sum, acc) partials and writes the output. The grid and split count depend only on shapes, nothing
asks the device for a value: the op captures into a CUDA graph and is opaque to torch.compile
(`torch.library.custom_op` with a shape-only fake). Off CUDA (and without TRITON_INTERPRET=1) the op runs
`kvquant_decode_attention_ref`: dequantise, then attention in float32. Design notes and the measured v1:
kernels/NOTES.md, "kvquant decode attention".
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
    def _plane(w, k: tl.constexpr, BITS: tl.constexpr):
        """Code k of every int32 word (channel word * 32 / BITS + k)."""
        return (w >> (k * BITS)) & ((1 << BITS) - 1)

    @triton.jit
    def _natural(w, BITS: tl.constexpr):
        """int32 words [..., X] -> codes [..., X * 32 / BITS] in channel order (code k of word j = channel
        j * 32 / BITS + k). Planes are extracted with a shift and a mask and put in order with `tl.interleave`
        (a join plus a merge of the in-thread last dimension: register renaming, no shared memory)."""
        if BITS == 8:  # order(0..3) = I(order(0, 2), order(1, 3))
            c = tl.interleave(tl.interleave(_plane(w, 0, 8), _plane(w, 2, 8)),
                              tl.interleave(_plane(w, 1, 8), _plane(w, 3, 8)))
        elif BITS == 4:  # order(0..7) = I(order(evens), order(odds)), recursively
            c = tl.interleave(
                tl.interleave(tl.interleave(_plane(w, 0, 4), _plane(w, 4, 4)),
                              tl.interleave(_plane(w, 2, 4), _plane(w, 6, 4))),
                tl.interleave(tl.interleave(_plane(w, 1, 4), _plane(w, 5, 4)),
                              tl.interleave(_plane(w, 3, 4), _plane(w, 7, 4))))
        else:
            c = tl.interleave(
                tl.interleave(
                    tl.interleave(tl.interleave(_plane(w, 0, 2), _plane(w, 8, 2)),
                                  tl.interleave(_plane(w, 4, 2), _plane(w, 12, 2))),
                    tl.interleave(tl.interleave(_plane(w, 2, 2), _plane(w, 10, 2)),
                                  tl.interleave(_plane(w, 6, 2), _plane(w, 14, 2)))),
                tl.interleave(
                    tl.interleave(tl.interleave(_plane(w, 1, 2), _plane(w, 9, 2)),
                                  tl.interleave(_plane(w, 5, 2), _plane(w, 13, 2))),
                    tl.interleave(tl.interleave(_plane(w, 3, 2), _plane(w, 11, 2)),
                                  tl.interleave(_plane(w, 7, 2), _plane(w, 15, 2)))))
        return c

    @triton.jit
    def _load_codes(C_ptr, S_ptr, Z_ptr, offs_n, load, BITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr):
        """The raw words and scales / minima of slots offs_n [N] (0 where not `load`): words as [N, A, BW] int32 with
        A = D / GROUP groups of BW words each (A = words per row, BW = 1, when a group is smaller than a word),
        scale and minimum [N, D / GROUP] in the storage dtype. One vector load per thread and row of words, one
        element per group for the scales: exactly the bytes of the slots that some row attends to. Rows are
        contiguous (`_launch` makes them so): the row strides are constants, so the vector width never depends on
        a run-time stride being specialised as a multiple of 16 (int2 rows of head_dim 128 are 8 words)."""
        NW: tl.constexpr = D * BITS // 32
        NG: tl.constexpr = D // GROUP
        A: tl.constexpr = NG if GROUP * BITS >= 32 else NW
        BW: tl.constexpr = NW // A
        offs_a = tl.arange(0, A)
        offs_w = tl.arange(0, BW)
        w = tl.load(C_ptr + offs_n[:, None, None] * NW + offs_a[None, :, None] * BW + offs_w[None, None, :],
                    mask=load[:, None, None], other=0)
        offs_g = tl.arange(0, NG)
        sz = offs_n[:, None] * NG + offs_g[None, :]
        s = tl.load(S_ptr + sz, mask=load[:, None], other=0.0)
        z = tl.load(Z_ptr + sz, mask=load[:, None], other=0.0)
        return w, s, z

    @triton.jit
    def _dequant(w, s, z, BLOCK_N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr):
        """[N, A, BW] words + [N, NG] scale / minimum -> float32 [N, D] = code * scale + min. A code becomes a float
        through the exponent trick ((code | 0x4B000000) is 2^23 + code as a float32; minus 2^23 is exact), not the
        conversion unit; the scale and minimum broadcast over their group's GROUP channels (one FMA per element)."""
        NG: tl.constexpr = D // GROUP
        c = _natural(w, BITS)  # [N, A, BW * 32 / BITS]
        f = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        if GROUP * BITS < 32:  # several groups per word: channels regrouped by group (not the 8B default)
            f = tl.reshape(f, (BLOCK_N, NG, GROUP))
        x = f * s.to(tl.float32)[:, :, None] + z.to(tl.float32)[:, :, None]
        return tl.reshape(x, (BLOCK_N, D))

    @triton.jit
    def _load_mask(MASK, s_mq, s_mn, t, rmask, offs_n, lo, hi, mask_floor,
                   ADDITIVE: tl.constexpr, ONE_TOKEN: tl.constexpr):
        """(valid, bias * log2(e)) of slots offs_n restricted to [lo, hi): [N] when every row is the same query token
        (decode: one mask row for the whole GQA group), else [BLOCK_R, N] by each row's token."""
        inr = (offs_n >= lo) & (offs_n < hi)
        if ONE_TOKEN:
            mk = tl.load(MASK + offs_n * s_mn, mask=inr, other=0)
            sees = inr
        else:
            sees = rmask[:, None] & inr[None, :]
            mk = tl.load(MASK + t[:, None] * s_mq + offs_n[None, :] * s_mn, mask=sees, other=0)
        if ADDITIVE:
            bias = mk.to(tl.float32)
            valid = sees & (bias > mask_floor)
            bias = tl.where(valid, bias, 0.0) * 1.4426950408889634  # (the dtype's minimum times log2(e) overflows)
        else:
            valid = sees & (mk != 0)
            bias = tl.zeros(valid.shape, tl.float32)
        return valid, bias

    @triton.jit
    def _seen(valid, ONE_TOKEN: tl.constexpr):
        """[N]: slots some row attends to (the ones whose codes are loaded)."""
        if ONE_TOKEN:
            seen = valid
        else:
            seen = tl.max(valid.to(tl.int32), 0) > 0
        return seen

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """Operands in the model dtype (bf16 / fp16 tensor cores, float32 accumulation); exact float32 for float32
        models. Under TRITON_INTERPRET=1 the operands stay float32 (DOT_F32): the interpreter's tl.dot multiplies
        bf16 operands as their raw bits and its float32 -> bf16 cast truncates (triton 3.9)."""
        if IEEE:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def _online(s, valid, bias, v, m, l, acc, ADDITIVE: tl.constexpr, ONE_TOKEN: tl.constexpr, IEEE: tl.constexpr):
        """One tile of the online softmax in base 2: scores s [R, N] (already times scale * log2(e)), values v [N, D]
        in the dot dtype."""
        if ONE_TOKEN:
            valid2 = valid[None, :]
            bias2 = bias[None, :]
        else:
            valid2 = valid
            bias2 = bias
        if ADDITIVE:
            s = s + bias2
        s = tl.where(valid2, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])  # exactly 0 where masked
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        return m_new, l, acc

    @triton.jit
    def _kvq_decode_kernel(Q, KC, KS, KZ, VC, VS, VZ, CH, RK, RV, QL, MASK, Mo, Lo, Ao, Out,
                           s_qb, s_qh, s_qt, s_cb, s_ch, s_sb, s_sh, s_chb, s_chh,
                           s_rb, s_rh, s_mb, s_mq, s_mn, s_ob, s_ot, s_oh,
                           H, G, QN, C, W, SLOTS_PER_SPLIT, SPLITS, scale, mask_floor,
                           BITS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_N: tl.constexpr, ADDITIVE: tl.constexpr, IEEE: tl.constexpr,
                           DIRECT: tl.constexpr, ONE_TOKEN: tl.constexpr, DOT_F32: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // H).to(tl.int64)  # row offsets exceed 2^31 bytes at long context x large batch
        h = (bh % H).to(tl.int64)
        R = G * QN
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, D)
        offs_b = tl.arange(0, BLOCK_N)
        rmask = offs_r < R
        g = offs_r // QN
        t = offs_r % QN  # row r = g * QN + t: query head h * G + g, query token t
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + t[:, None] * s_qt + offs_d[None, :],
                    mask=rmask[:, None], other=0.0).to(tl.float32) * (scale * 1.4426950408889634)
        ch = tl.load(CH + b * s_chb + h * s_chh + offs_d).to(tl.float32)
        dot_dtype = tl.float32 if DOT_F32 else Q.dtype.element_ty
        qc = (q * ch[None, :]).to(dot_dtype)  # the keys' channel scale, folded into the query once
        ql = tl.load(QL).to(tl.int32)
        kc = KC + b * s_cb + h * s_ch
        vc = VC + b * s_cb + h * s_ch
        ks, kz = KS + b * s_sb + h * s_sh, KZ + b * s_sb + h * s_sh
        vs, vz = VS + b * s_sb + h * s_sh, VZ + b * s_sb + h * s_sh
        mbase = MASK + b * s_mb
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, D), tl.float32)
        start = split * SLOTS_PER_SPLIT
        stop = tl.minimum(start + SLOTS_PER_SPLIT, C)

        # slots [start, min(stop, qlen)): the codes. No manual prefetch: Triton's software pipeliner (num_stages)
        # turns the mask, word and scale loads into cp.async copies into shared memory several tiles ahead, which
        # keeps bytes in flight without holding them in registers (an explicit one-tile register prefetch compiled
        # to 255 registers at BLOCK_N 64 / 4 warps; this loop to 168, and 128 at BLOCK_N 32; sm_90a, triton 3.9).
        hi = tl.minimum(stop, ql)
        for n0 in range(start, hi, BLOCK_N):
            offs_n = n0 + offs_b
            valid, bias = _load_mask(mbase, s_mq, s_mn, t, rmask, offs_n, start, hi, mask_floor, ADDITIVE, ONE_TOKEN)
            load = _seen(valid, ONE_TOKEN)
            kw, ksc, kzr = _load_codes(kc, ks, kz, offs_n, load, BITS, GROUP, D)
            vw, vsc, vzr = _load_codes(vc, vs, vz, offs_n, load, BITS, GROUP, D)
            k = _dequant(kw, ksc, kzr, BLOCK_N, BITS, GROUP, D).to(dot_dtype)
            s = _mm(qc, tl.trans(k), IEEE)  # [BLOCK_R, BLOCK_N], base-2 logits
            v = _dequant(vw, vsc, vzr, BLOCK_N, BITS, GROUP, D).to(dot_dtype)
            m, l, acc = _online(s, valid, bias, v, m, l, acc, ADDITIVE, ONE_TOKEN, IEEE)

        # slots [max(start, qlen), stop): the full-precision ring, slot j at ring row j % W (at most W slots in all)
        qr = q.to(dot_dtype)
        lo = tl.maximum(start, ql)
        rk, rv = RK + b * s_rb + h * s_rh, RV + b * s_rb + h * s_rh
        for r0 in range(lo, stop, BLOCK_N):
            offs_rn = r0 + offs_b
            rvalid, rbias = _load_mask(mbase, s_mq, s_mn, t, rmask, offs_rn, lo, stop, mask_floor,
                                       ADDITIVE, ONE_TOKEN)
            rload = _seen(rvalid, ONE_TOKEN)
            ring_off = (offs_rn % W)[:, None] * D + offs_d[None, :]
            rkt = tl.load(rk + ring_off, mask=rload[:, None], other=0.0).to(dot_dtype)
            rs = _mm(qr, tl.trans(rkt), IEEE)
            rvt = tl.load(rv + ring_off, mask=rload[:, None], other=0.0).to(dot_dtype)
            m, l, acc = _online(rs, rvalid, rbias, rvt, m, l, acc, ADDITIVE, ONE_TOKEN, IEEE)

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
        """One (row, KV head, query row): merge the splits' partials (maxima in base 2), divide, round once to the
        output dtype."""
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
        w = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # splits that saw nothing weigh 0
        denom = tl.sum(l * w, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.maximum(denom, 1e-30)  # a row that sees nothing: 0
        tl.store(Out + b * s_ob + (r % QN) * s_ot + (h * G + r // QN) * s_oh + offs_d, out.to(Out.dtype.element_ty))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kernel_supported(head_dim: int, bits: int, group: int) -> bool:
    """The layouts the Triton kernel reads: a power-of-two head_dim of 16..256 and group, 8/4/2-bit codes whose
    rows are whole int32 words."""
    return (HAS_TRITON and bits in (8, 4, 2) and _pow2(head_dim) and 16 <= head_dim <= 256 and _pow2(group)
            and group <= head_dim and head_dim * bits % 32 == 0)


SMS = 132  # H100 / H200


def choose_splits(bh: int, slots: int, block_n: int, target_programs: int = 4 * SMS) -> int:
    """Programs per (row, KV head): about 4 per SM in one wave (4 programs of 128 registers x 4 warps fit an SM,
    each with two tiles of cp.async copies in flight), each program with >= 4 tiles; at most 64 (the combine's
    width). Rounded down, so that the grid does not spill a small second wave (the old ceil gave 320 programs for
    264 resident at batch 8)."""
    tiles = max(1, -(-slots // block_n))
    return max(1, min(target_programs // max(bh, 1), math.ceil(tiles / 4), 64))


def default_launch(head_dim: int, bits: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) when the caller names none: 32-slot tiles on 4 warps (sm_90a, triton 3.9: 128
    registers and ~38 KB of shared memory at head_dim 128, so 4 programs per SM, each with 2 tiles of cp.async
    copies in flight); 64-slot tiles on 8 warps (117 registers) is the other candidate. 8 warps for head_dim 256.
    Untuned: bench_kv's kernel rows sweep BLOCK_N x warps."""
    if interpreting():  # the interpreter's cost is per operation, not per element: few large tiles
        return 256, 4
    return 32, (8 if head_dim >= 256 else 4)


def _words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes as int32 words (a view when the rows are 4-byte aligned, as the layer's storage is)."""
    if codes.stride(-1) != 1 or codes.storage_offset() % 4 or any(s % 4 for s in codes.stride()[:-1]):
        codes = codes.contiguous()
    return codes.view(torch.int32)


def _launch(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale: float, bits: int, group: int,
            out: torch.Tensor, block_n: int | None, splits: int | None, num_warps: int | None,
            num_stages: int) -> None:
    b, hq, qn, d = query.shape
    h, c, w = kc.shape[1], kc.shape[2], rk.shape[2]
    g = hq // h
    r = g * qn
    block_r = max(16, triton.next_power_of_2(r))  # tl.dot's minimum M; the padding rows cost only tensor-core time
    bn, nw = default_launch(d, bits)
    block_n, num_warps = block_n or bn, num_warps or nw
    splits = splits or choose_splits(b * h, c, block_n)
    per = triton.cdiv(triton.cdiv(c, block_n), min(splits, triton.cdiv(c, block_n))) * block_n  # slots per split
    splits = triton.cdiv(c, per)
    query = query if query.stride(-1) == 1 else query.contiguous()
    kw, vw = _words(kc), _words(vc)
    nw_row, ng = d * bits // 32, d // group  # rows of words / scales / ring are contiguous (constant strides)
    if kw.stride(2) != nw_row or vw.stride() != kw.stride():
        kw, vw = kw.contiguous(), vw.contiguous()
    ks, kz, vs, vz = (x if x.stride(-1) == 1 and x.stride(-2) == ng else x.contiguous() for x in (ks, kz, vs, vz))
    if not (ks.stride() == kz.stride() == vs.stride() == vz.stride()):
        ks, kz, vs, vz = (x.contiguous() for x in (ks, kz, vs, vz))
    if rk.stride(-1) != 1 or rk.stride(-2) != d or rv.stride() != rk.stride():
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
        query.stride(0), query.stride(1), query.stride(2), kw.stride(0), kw.stride(1),
        ks.stride(0), ks.stride(1), channel.stride(0), channel.stride(1), rk.stride(0), rk.stride(1), s_mb, s_mq, m.stride(3), out.stride(0), out.stride(1),
        out.stride(2), h, g, qn, c, w, per, splits, float(scale), float(floor),
        BITS=bits, GROUP=group, D=d, BLOCK_R=block_r, BLOCK_N=block_n, ADDITIVE=additive,
        IEEE=query.dtype == torch.float32, DIRECT=direct, ONE_TOKEN=qn == 1,
        DOT_F32=query.dtype == torch.float32 or interpreting(), num_warps=num_warps,
        num_stages=num_stages)
    if not direct:
        _kvq_combine_kernel[(b * h * r,)](mo, lo, ao, out, out.stride(0), out.stride(1), out.stride(2), h, g, qn,
                                          splits, D=d, BLOCK_S=triton.next_power_of_2(splits), num_warps=4)


def kvquant_decode_attention_triton(query, kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask, scale: float,
                                    bits: int, group: int, block_n: int | None = None,
                                    splits: int | None = None, out: torch.Tensor | None = None,
                                    num_warps: int | None = None, num_stages: int = 3) -> torch.Tensor:
    """The kernels (no fallback); `block_n` (slots per tile, a power of two >= 16), `splits` (programs per row and
    KV head) and `num_warps` default to `default_launch` / `choose_splits`, `num_stages` is the depth of Triton's
    load pipeline (cp.async copies of tiles ahead); the tests pin them to walk several
    tiles and splits (and pass a NaN-filled `out` [B, Q, Hq, D] to see that every element is written); bench_kv's
    kernel rows vary them. Defaults are untuned guesses (kernels/NOTES.md, "kvquant decode attention")."""
    b, hq, qn, d = query.shape
    if out is None:
        out = torch.empty(b, qn, hq, d, dtype=query.dtype, device=query.device)
    g = hq // kc.shape[1]
    step = max(1, MAX_ROWS // g)  # query tokens per launch
    for t0 in range(0, qn, step):
        t1 = min(qn, t0 + step)
        _launch(query[:, :, t0:t1], kc, ks, kz, vc, vs, vz, channel, rk, rv, qlen, mask[:, :, t0:t1], scale, bits,
                group, out[:, t0:t1], block_n, splits, num_warps, num_stages)
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
