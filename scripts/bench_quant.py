"""Quantized linears on the GPU, one command: kernel variants timed and picked per shape, the whole-model weight
pass, and end-to-end decode / prefill of a Llama-3-8B-shaped model (random weights) on the fast runtime, next to
bf16 and torchao. Every variant runs inside try/except (end-to-end: one subprocess each, with a timeout), so one
failure costs only its own row.

    python scripts/bench_quant.py --out $OUT/bench_quant.json                  # GPU, default budget 360 s
    TRITON_INTERPRET=1 python scripts/bench_quant.py --device cpu --smoke --out /tmp/bq.json   # CPU dry run

Phases (each under its share of --budget-s; past it the remaining variants are recorded as skipped):
1. kernels: for the 8B linear shapes (q_o, k_v, gate_up, down) and formats bf16 / int8 / fp8 / int4 g128 / g64 /
   mxfp4 / nvfp4, at M = 1, 4, 16 every candidate kernel and launch configuration is timed (v1 GEMV, v3 batched
   GEMV with and without split-K, tensor-core "dot"), the fastest is kept (checked against the float64 reference,
   every output written) and installed for the later phases; at M = 2048 dequantise + cuBLAS against the Triton
   GEMM (and fp8 W8A8 through torch._scaled_mm). Timing: every call reads its own copy of the weights (>= 400 MB
   in all, far past L2), all calls captured in one CUDA graph, median replay time per call. The device-to-device
   copy bandwidth (bytes read + written) is measured in the same run: "% copy" = bytes / time / copy bandwidth.
2. model pass: all 225 linears of the 8B shape at batch 1 in one CUDA graph, per format (lm_head bf16).
3. end to end (fast runtime, `hf_accel.runtime.bench.measure`): decode tokens/s at batch 1 / 4 / 16 (prompt 128)
   and prefill of 2048 tokens (one forward, logits of the last token). Order: int4 g128, bf16, int8, torchao int4
   (tinygemm layout: see torchao_config), torchao int8, bitsandbytes nf4, fp8 (+ W8A8 prefill), int4 g64, mxfp4.
   torchao and bitsandbytes are not in the GPU image: install their wheels first (pip install --no-deps). The first --max-compiled (2) run batch 1 with
   torch.compile (fast(tune=false): no coordinate-descent tuning, whose 8B compile takes ~100 s) and their other
   batches eagerly; the rest, or when the remaining budget cannot pay another compile, run with
   fast(compile=False) (eager kernels inside the CUDA graph). Each row says which (`compiled`). With the default
   360 s the last variants may be skipped (recorded as such); --budget-s 570 should cover all of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

from hf_accel.runtime.bench import copy_bandwidth as shared_copy_bandwidth
from hf_accel.runtime.bench import graph_ms

HERE = os.path.dirname(os.path.abspath(__file__))
FULL = dict(hidden=4096, mlp=14336, layers=32, vocab=128256, kv=1024, heads=32, kv_heads=8)
SMOKE = dict(hidden=128, mlp=256, layers=2, vocab=512, kv=32, heads=4, kv_heads=1)  # CPU dry run (interpreter)
FORMATS = ["bf16", "int8", "fp8", "int4g128", "int4g64", "mxfp4", "nvfp4"]
PRIORITY = ["int4g128", "int8", "mxfp4", "fp8", "int4g64", "nvfp4"]  # tuning order (budget)
L2_MULTIPLE_BYTES = 400 * 2**20


def shapes_of(d: dict) -> dict:
    h, m, L = d["hidden"], d["mlp"], d["layers"]
    return {"q_o": (h, h, 2 * L), "k_v": (d["kv"], h, 2 * L), "gate_up": (m, h, 2 * L), "down": (h, m, L)}


def is_cuda(dev) -> bool:
    return torch.device(dev).type == "cuda"


# -------------------------------------------------------------------------------------------------------------
# weights of one format and their calls
# -------------------------------------------------------------------------------------------------------------
class QW:
    """Random weights of one format for an [N, K] linear (random bits: timing must not see zeros)."""

    def __init__(self, fmt: str, n: int, k: int, dev):
        from hf_accel.kernels import fp4 as KF

        self.fmt, self.n, self.k = fmt, n, k
        if fmt == "bf16":
            self.w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        elif fmt == "int8":
            self.w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
            self.s = (torch.rand(n, device=dev) * 1e-3 + 1e-4).to(torch.bfloat16)
        elif fmt == "fp8":
            self.w = (torch.randn(n, k, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
            self.s = (torch.rand(n, device=dev) * 1e-4 + 1e-5).to(torch.bfloat16)
        elif fmt in KF.FORMATS:
            b = KF.FORMATS[fmt]
            self.qw = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device=dev, dtype=torch.int32)
            if fmt == "mxfp4":
                self.s = torch.randint(118, 126, (n, k // b), device=dev, dtype=torch.uint8)
                self.g = torch.ones(1, device=dev)
            else:
                self.s = (torch.rand(n, k // b, device=dev) * 400 + 10).to(torch.float8_e4m3fn).view(torch.uint8)
                self.g = torch.full((1,), 1e-5, device=dev)
        else:
            self.gs = int(fmt[5:])
            self.qw = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device=dev, dtype=torch.int32)
            self.s = (torch.rand(n, k // self.gs, device=dev) * 2e-3 + 1e-4).to(torch.bfloat16)
            self.z = (torch.rand(n, k // self.gs, device=dev) * 15).to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        if self.fmt == "bf16":
            return self.w.numel() * 2
        if self.fmt in ("int8", "fp8"):
            return self.w.numel() + self.s.numel() * 2
        if self.fmt in ("mxfp4", "nvfp4"):
            return self.qw.numel() * 4 + self.s.numel()
        return self.qw.numel() * 4 + self.s.numel() * 2 + self.z.numel() * 2

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        from hf_accel.kernels import fp4 as KF, int4 as K4, w8 as K8

        if self.fmt == "bf16":
            return self.w.to(dtype)
        if self.fmt in ("int8", "fp8"):
            return K8.w8_dequantize(self.w, self.s, dtype)
        if self.fmt in ("mxfp4", "nvfp4"):
            return KF.fp4_dequantize(self.qw, self.s, self.g, self.fmt, self.k, dtype)
        return K4.int4_dequantize(self.qw, self.s, self.z, self.gs, self.k, dtype)

    def call(self, x, kind="auto", cfg=None, out=None):
        """One linear on x [M, K]; kind: auto (the op), gemv, bgemv, dot, dequant (then cuBLAS), w8a8."""
        import hf_accel.kernels as K
        from hf_accel.kernels import fp4 as KF, fp8_act as KA, int4 as K4, w8 as K8

        if self.fmt == "bf16":
            return F.linear(x, self.w)
        if self.fmt in ("int8", "fp8"):
            if kind == "auto":
                return (K.int8_linear if self.fmt == "int8" else K.fp8_linear)(x, self.w, self.s, None)
            if kind == "w8a8":
                return KA.fp8_w8a8_linear(x, self.w, self.s, None, 1)
            if kind in ("gemv", "bgemv", "dot"):
                fn = {"gemv": K8.w8_gemv, "bgemv": K8.w8_bgemv, "dot": K8.w8_dot}[kind]
                return fn(x, self.w, self.s, None, self.fmt, cfg, out=out)
            return F.linear(x, K8.w8_dequant(self.w, self.s, x.dtype, self.fmt))
        if self.fmt in ("mxfp4", "nvfp4"):
            if kind == "auto":
                return K.fp4_linear(x, self.qw, self.s, self.g, None, self.fmt == "nvfp4", self.k)
            if kind == "bgemv":
                return KF.fp4_bgemv(x, self.qw, self.s, self.g, None, self.fmt, cfg, out=out)
            return F.linear(x, KF.fp4_dequant(self.qw, self.s, self.g, self.fmt, self.k, x.dtype))
        if kind == "auto":
            return K.int4_linear(x, self.qw, self.s, self.z, None, self.gs, self.k)
        if kind in ("gemv", "gemv2", "bgemv", "dot"):
            fn = {"gemv": K4.int4_gemv, "gemv2": K4.int4_gemv2, "bgemv": K4.int4_bgemv, "dot": K4.int4_dot}[kind]
            return fn(x, self.qw, self.s, self.z, None, self.gs, cfg, out=out)
        return F.linear(x, K4.int4_dequant(self.qw, self.s, self.z, self.gs, self.k, x.dtype))


# -------------------------------------------------------------------------------------------------------------
# timing
# -------------------------------------------------------------------------------------------------------------
def copy_bandwidth(dev) -> dict:
    """Copy bandwidth (read + write) of a 2 GiB device copy in GB/s (NaN off CUDA)."""
    return {"copy_gbps": shared_copy_bandwidth(dev, nbytes=1 << 31) / 1e9}


def per_call_us(qws, xs, kind, cfg) -> float:
    fns = [(lambda q=q, x=x: q.call(x, kind, cfg)) for q, x in zip(qws, xs)]
    return graph_ms(fns) * 1000 / len(fns)


# -------------------------------------------------------------------------------------------------------------
# candidates
# -------------------------------------------------------------------------------------------------------------
def candidates(fmt: str, m: int, smoke: bool):
    """(kind, LaunchConfig) to time for one format and batch size."""
    from hf_accel.kernels._base import LaunchConfig as C

    if smoke:  # tiny shapes under the interpreter: one of each kind, small blocks
        out = [("bgemv", C(8, 64, max(1, min(16, m)), 1, 1, split_k=2, acc3=m <= 4))]
        if fmt in ("int8", "fp8"):
            out += [("gemv", C(8, 64, 1, 1)), ("dot", C(16, 64, 16, 1))]
        elif fmt.startswith("int4"):
            out += [("gemv", C(8, max(64, int(fmt[5:])), 1, 1)), ("dot", C(16, 128, 16, 1))]
        return out
    w8 = fmt in ("int8", "fp8")
    fp4 = fmt in ("mxfp4", "nvfp4")
    out = []
    if m == 1:
        if w8:
            out += [("gemv", C(8, 1024, 1, 4)), ("gemv", C(16, 256, 1, 4)), ("gemv", C(4, 2048, 1, 8))]
            out += [("bgemv", C(bn, bk, 1, w, split_k=sk, acc3=a)) for bn, bk, w, sk, a in
                    [(4, 512, 4, 1, True), (8, 256, 4, 1, True), (8, 512, 4, 2, True), (4, 512, 4, 4, True),
                     (16, 256, 8, 1, False)]]
        else:
            if not fp4:
                out += [("gemv", C(8, 2048, 1, 4)), ("gemv", C(16, 1024, 1, 4))]
                # v4 packed-bf16x2 GEMV (experimental, kernels/NOTES.md "int4 GEMV v4"); block_k / 8 words per row
                # and step >= 128 x warps keeps x out of shared memory (SASS, triton 3.6)
                out += [("gemv2", C(bn, bk, 1, w)) for bn, bk, w in [(8, 4096, 4), (4, 4096, 4), (8, 2048, 2)]]
            out += [("bgemv", C(bn, bk, 1, w, split_k=sk, acc3=a)) for bn, bk, w, sk, a in
                    [(8, 512, 4, 1, True), (4, 1024, 4, 1, True), (16, 512, 8, 1, True), (8, 1024, 8, 1, False),
                     (8, 512, 4, 4, True), (4, 512, 4, 8, True)]]
    elif m <= 4:
        out += [("bgemv", C(bn, bk, 4, w, split_k=sk, acc3=a)) for bn, bk, w, sk, a in
                ([(8, 256, 4, 1, True), (4, 512, 4, 1, True), (8, 256, 4, 2, True), (16, 128, 4, 1, False)] if w8 else
                 [(8, 512, 4, 1, True), (4, 512, 4, 1, True), (8, 256, 4, 2, True), (16, 256, 8, 1, False)])]
        if not fp4:
            bk = 256
            out += [("dot", C(16, bk, 16, 4, 3)), ("dot", C(64, bk, 16, 4, 1))]
            out += [("gemv", C(16, 512 if w8 else 1024, 1, 4))]
    else:
        out += [("bgemv", C(bn, bk, 16, w, split_k=sk, acc3=False)) for bn, bk, w, sk in
                ([(4, 256, 4, 1), (8, 128, 4, 1), (4, 256, 8, 2)] if w8 else [(4, 256, 4, 1), (8, 256, 8, 1), (4, 512, 4, 2)])]
        if not fp4:
            out += [("dot", C(16, 256, 16, 4, 3)), ("dot", C(32, 128 if w8 else 128, 16, 4, 3)), ("dot", C(64, 256, 16, 4, 1))]
    return out


def prefill_candidates(fmt: str, smoke: bool):
    from hf_accel.kernels._base import LaunchConfig as C

    out = [("dequant", None)]
    if fmt in ("int8", "fp8", "int4g128", "int4g64"):
        bk = 128 if fmt.startswith("int4") else 64
        out += [("dot", C(64, bk, 64, 4, 2))] if smoke else [("dot", C(128, bk, 128, 8, 3)), ("dot", C(128, bk, 64, 4, 3))]
    if fmt == "fp8" and (smoke or torch.cuda.is_available()):
        out += [("w8a8", None)]
    return out


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def check(q: QW, m: int, kind: str, cfg, dev) -> dict:
    x = torch.randn(m, q.k, device=dev, dtype=torch.bfloat16)
    ref = x.double() @ q.dense(torch.float64).T
    if kind in ("gemv", "gemv2", "bgemv", "dot"):
        out = torch.full((m, q.n), float("nan"), device=dev, dtype=torch.bfloat16)
        y = q.call(x, kind, cfg, out=out)
    else:
        y = q.call(x, kind, cfg)
    return {"rel_err": rel_err(y, ref), "unwritten": int(torch.isnan(y).sum())}


# -------------------------------------------------------------------------------------------------------------
# phase 1: kernels
# -------------------------------------------------------------------------------------------------------------
def phase_kernels(args, dims, bw, deadline, dev, res) -> dict:
    from hf_accel.kernels import _base

    key = _base.device_key(torch.device(dev))
    tuned = {}
    shapes = shapes_of(dims)
    formats = [f for f in ["bf16"] + PRIORITY if f in args.formats]
    ms_list = [int(v) for v in args.ms.split(",")]
    for fmt in formats:
        for sname, (n, k, count) in shapes.items():
            try:
                one = QW(fmt, n, k, dev)
                copies = 2 if args.smoke else max(2, min(48, -(-L2_MULTIPLE_BYTES // one.nbytes)))
                qws = [one] + [QW(fmt, n, k, dev) for _ in range(copies - 1)]
            except Exception as e:
                res["rows"].append(dict(shape=sname, fmt=fmt, error=f"{type(e).__name__}: {e}"))
                continue
            for m in ms_list:
                xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in qws]
                base = dict(shape=sname, n=n, k=k, fmt=fmt, m=m, bytes=one.nbytes)
                try:
                    if fmt == "bf16":
                        us = per_call_us(qws, xs, "auto", None)
                        res["rows"].append(dict(base, kernel="cublas", us=us, gbps=one.nbytes / us / 1e3,
                                                pct_copy=100 * one.nbytes / us / 1e3 / bw))
                        continue
                    cands = [("auto", None)]
                    if time.time() < deadline:
                        cands += candidates(fmt, m, args.smoke)
                    best = None
                    for kind, cfg in cands:
                        try:
                            us = per_call_us(qws, xs, kind, cfg)
                        except Exception as e:  # a config the compiler rejects (e.g. out of resources)
                            res["candidates"].append(dict(base, kernel=kind, config=cfg.as_dict() if cfg else None,
                                                          error=f"{type(e).__name__}: {str(e)[:160]}"))
                            continue
                        res["candidates"].append(dict(base, kernel=kind, config=cfg.as_dict() if cfg else None, us=us))
                        if kind != "auto" and (best is None or us < best[0]):
                            best = (us, kind, cfg)
                    auto_us = next((c["us"] for c in res["candidates"][::-1] if c.get("kernel") == "auto"
                                    and c["shape"] == sname and c["fmt"] == fmt and c["m"] == m and "us" in c), None)
                    if best is None or (auto_us is not None and auto_us <= best[0]):
                        # the library's own pick (its default or an earlier tuned entry) won: keep it, install nothing
                        # (session 8 installed a slower sweep config for k_v: 5.31 against auto's 3.97 us)
                        best = (auto_us, "auto", None)
                    us, kind, cfg = best
                    row = dict(base, kernel=kind, us=us, gbps=one.nbytes / us / 1e3,
                               pct_copy=100 * one.nbytes / us / 1e3 / bw, auto_us=auto_us, **check(one, m, kind, cfg, dev))
                    if cfg is not None:
                        row["config"] = cfg.as_dict()
                        tuned[(key, fmt, _base.m_bucket(m), n, k)] = {"kernel": kind, **cfg.as_dict()}
                    res["rows"].append(row)
                    print(f"{sname:8s} {fmt:9s} m={m:<3d} {kind:6s} {us:8.2f} us {row['gbps']:7.0f} GB/s "
                          f"{row['pct_copy']:5.1f}% (auto {auto_us:.2f}) err={row['rel_err']:.1e} "
                          f"unwritten={row['unwritten']} {row.get('config', '')}", flush=True)
                except Exception as e:
                    res["rows"].append(dict(base, error=f"{type(e).__name__}: {str(e)[:300]}"))
                    print(f"{sname} {fmt} m={m} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            # prefill (M = 2048; smoke: 64)
            mp = 64 if args.smoke else 2048
            x = torch.randn(mp, k, device=dev, dtype=torch.bfloat16)
            flops = 2 * mp * n * k
            opts = [("cublas", None)] if fmt == "bf16" else prefill_candidates(fmt, args.smoke)
            best = None
            for kind, cfg in opts:
                if fmt != "bf16" and kind != "dequant" and time.time() > deadline:
                    continue
                try:
                    us = per_call_us(qws[:2], [x, x], "auto" if kind == "cublas" else kind, cfg)
                    row = dict(shape=sname, n=n, k=k, fmt=fmt, m=mp, kernel=kind, us=us, tflops=flops / us / 1e6)
                    if cfg is not None:
                        row["config"] = cfg.as_dict()
                    if kind != "cublas":
                        row.update(check(one, mp, kind, cfg, dev))
                    res["prefill"].append(row)
                    if kind in ("dequant", "dot") and (best is None or us < best[0]):
                        best = (us, kind, cfg)
                    print(f"{sname:8s} {fmt:9s} m={mp} {kind:7s} {us:9.1f} us {row['tflops']:6.0f} TFLOP/s", flush=True)
                except Exception as e:
                    res["prefill"].append(dict(shape=sname, fmt=fmt, m=mp, kernel=kind, error=f"{type(e).__name__}: {str(e)[:200]}"))
            if best is not None and fmt in ("int8", "fp8", "int4g128", "int4g64"):
                tuned[(key, fmt, 0, n, k)] = {"kernel": best[1], **(best[2].as_dict() if best[2] else {})}
            del qws, one
            if is_cuda(dev):
                torch.cuda.empty_cache()
        print(f"[kernels {fmt} done, {time.time() - res['t0']:.0f}s]", flush=True)
    return tuned


def install_tuned(tuned: dict) -> None:
    from hf_accel.kernels import fp4 as KF, int4 as K4, w8 as K8

    for kk, v in tuned.items():
        kk = tuple(kk)
        (K4.TUNED if kk[1].startswith("int4") else KF.TUNED if kk[1] in KF.FORMATS else K8.TUNED)[kk] = v


# -------------------------------------------------------------------------------------------------------------
# phase 2: whole-model weight pass
# -------------------------------------------------------------------------------------------------------------
def phase_model(args, dims, bw, deadline, dev, res) -> None:
    shapes = shapes_of(dims)
    for fmt in ["bf16"] + [f for f in PRIORITY if f in args.formats]:
        if time.time() > deadline:
            res["model"].append(dict(fmt=fmt, skipped="budget"))
            continue
        try:
            layers = []
            for sname, (n, k, count) in shapes.items():
                layers += [QW(fmt, n, k, dev) for _ in range(count)]
            layers.append(QW("bf16", dims["vocab"], dims["hidden"], dev))  # lm_head stays bf16 (plugins' default)
            nbytes = sum(q.nbytes for q in layers)
            xs = {kk: torch.randn(1, kk, device=dev, dtype=torch.bfloat16) for kk in (dims["hidden"], dims["mlp"])}
            ms = graph_ms([(lambda q=q: q.call(xs[q.k], "auto")) for q in layers], replays=10)
            r = dict(fmt=fmt, linears=len(layers), gbytes=nbytes / 1e9, ms=ms, tok_s_ceiling=1000 / ms,
                     gbps=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / bw)
            res["model"].append(r)
            print(f"model {fmt:9s} {r['gbytes']:6.2f} GB {ms:7.3f} ms -> {r['tok_s_ceiling']:6.0f} tok/s ceiling, "
                  f"{r['gbps']:5.0f} GB/s ({r['pct_copy']:.0f}% of copy)", flush=True)
            del layers
        except Exception as e:
            res["model"].append(dict(fmt=fmt, error=f"{type(e).__name__}: {str(e)[:300]}"))
        if is_cuda(dev):
            torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------------------
# phase 3: end to end (one subprocess per variant)
# -------------------------------------------------------------------------------------------------------------
VARIANTS = {  # name: hf_accel weight spec (None: bf16) or torchao config
    "int4g128": "int4(group_size=128, method=rtn)",
    "bf16": None,
    "int8": "int8",
    "torchao_int4": "torchao:int4",
    "torchao_int8": "torchao:int8",
    "bnb_nf4": "bnb:nf4",
    "fp8": "fp8(activations=dynamic)",
    "int4g64": "int4(group_size=64, method=rtn)",
    "mxfp4": "fp4(format=mxfp4)",
}


def llama_config(dims: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=dims["hidden"], intermediate_size=dims["mlp"], num_hidden_layers=dims["layers"],
                       num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                       vocab_size=dims["vocab"], max_position_embeddings=8192, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2)


def build_model(dims: dict, dev):
    from transformers import LlamaForCausalLM

    config = llama_config(dims)
    dtype = torch.bfloat16
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model = model.to_empty(device=dev)
    g = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(dev)
    return model.eval()


def sync(dev):
    if is_cuda(dev):
        torch.cuda.synchronize()


def prefill_ms(model, tokens: int, dev, repeats: int = 5) -> float:
    ids = torch.randint(10, model.config.vocab_size, (1, tokens), device=dev)
    with torch.no_grad():
        for _ in range(2):
            model(ids, use_cache=False, logits_to_keep=1)
        sync(dev)
        ts = []
        for _ in range(repeats):
            if is_cuda(dev):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                model(ids, use_cache=False, logits_to_keep=1)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                model(ids, use_cache=False, logits_to_keep=1)
                ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def torchao_config(spec: str, Int4WeightOnlyConfig, Int8WeightOnlyConfig):
    """torchao's weight-only configs. Its int4 default layout ("plain", 0.15+) runs on the mslk package's CUTLASS
    kernels, and mslk is not on PyPI (only a 0.0.0 placeholder), so int4 uses the tinygemm layout
    (`aten._weight_int4pack_mm`, torchao's long-standing int4 path, gpt-fast's), which ships with torch."""
    if spec.endswith("int8"):
        return Int8WeightOnlyConfig(), "int8 weight-only"
    try:
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"), "int4 g128 tinygemm"
    except TypeError:  # torchao < 0.14: tinygemm was the only layout
        return Int4WeightOnlyConfig(group_size=128), "int4 g128 (default layout)"


def bnb_nf4_(model) -> int:
    """bitsandbytes NF4 (QLoRA's format: blocks of 64, double-quantized absmax, bf16 compute) for every linear but
    lm_head, as transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") would load them."""
    import bitsandbytes as bnb

    n = 0
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is model.get_output_embeddings():
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(child.weight.device)  # quantizes here
            if child.bias is not None:
                q.bias = child.bias
            setattr(parent, cname, q)
            n += 1
    return n


def worker(args) -> None:
    """One variant: build, quantize, prefill, decode at each batch; one JSON line per result into args.rows_out."""
    import hf_accel
    from hf_accel.runtime.bench import copy_bandwidth as cbw, measure

    dims = SMOKE if args.smoke else FULL
    dev = args.device
    name, compile_ = args.worker, bool(args.compile)

    def emit(row):
        with open(args.rows_out, "a") as fh:
            fh.write(json.dumps({"variant": name, "compile": compile_, **row}) + "\n")

    if args.tuned and os.path.exists(args.tuned):
        with open(args.tuned) as fh:
            install_tuned({tuple(t["key"]): {k: v for k, v in t.items() if k != "key"} for t in json.load(fh)})
    t0 = time.time()
    model = build_model(dims, dev)
    spec = VARIANTS[name]
    if spec and spec.startswith("torchao:"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        import torchao

        cfg, layout = torchao_config(spec, Int4WeightOnlyConfig, Int8WeightOnlyConfig)
        quantize_(model, cfg, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn)
        emit({"event": "quantized", "torchao": torchao.__version__, "layout": layout, "s": time.time() - t0})
        hf_accel.apply(model, f"fast(compile={compile_}{args.fast_options})")
    elif spec == "bnb:nf4":
        import bitsandbytes

        n = bnb_nf4_(model)
        emit({"event": "quantized", "bitsandbytes": bitsandbytes.__version__, "linears": n, "s": time.time() - t0})
        hf_accel.apply(model, f"fast(compile={compile_}{args.fast_options})")
    else:  # weights and runtime in one spec (the runtime only patches generate(): model(...) stays the eager forward)
        hf_accel.apply(model, f"{spec}+fast(compile={compile_}{args.fast_options})" if spec
                       else f"fast(compile={compile_}{args.fast_options})")
        emit({"event": "quantized", "spec": spec or "bf16", "s": time.time() - t0})
    sync(dev)
    copy_bw = cbw(dev)
    # prefill: one eager forward over the prompt (what the runtime's prefill runs), logits of the last token
    try:
        ms = prefill_ms(model, args.prefill, dev)
        emit({"event": "prefill", "tokens": args.prefill, "ms": ms, "tok_s": args.prefill / ms * 1e3})
        if name == "fp8":  # the same weights, weight-only (W8A8 off)
            fp8_mods = [mod for mod in model.modules() if getattr(mod, "act_min_tokens", 0)]
            for mod in fp8_mods:
                mod.act_min_tokens = 0
            ms = prefill_ms(model, args.prefill, dev)
            emit({"event": "prefill", "mode": "weight-only", "tokens": args.prefill, "ms": ms,
                  "tok_s": args.prefill / ms * 1e3})
            for mod in fp8_mods:
                mod.act_min_tokens = 64
    except Exception as e:
        emit({"event": "prefill", "error": f"{type(e).__name__}: {str(e)[:400]}"})
    batches = [int(b) for b in args.batches.split(",")]
    compiled_batches = [int(b) for b in args.compiled_batches.split(",")] if compile_ else batches
    for batch in sorted(batches, key=lambda b: b not in compiled_batches):
        if compile_ and batch not in compiled_batches and not getattr(worker, "_eager_now", False):
            # the other batches without torch.compile (one compile per batch class would not fit the budget)
            from hf_accel.runtime import get_runtime

            rt = get_runtime(model)
            rt.use_compile, rt._forward = False, {}  # as Runtime.uncompile(): eager step inside the CUDA graph
            rt.release()
            worker._eager_now = True
        try:
            t = time.time()
            row = measure(model, name, batch, args.prompt, args.new_tokens, repeats=args.repeats,
                          copy_bw=copy_bw if copy_bw == copy_bw else None)
            row["wall_s"] = time.time() - t
            emit({"event": "decode", **row, "compiled": compile_ and batch in compiled_batches})
        except Exception as e:
            emit({"event": "decode", "batch": batch, "error": f"{type(e).__name__}: {str(e)[:400]}",
                  "trace": traceback.format_exc()[-1500:]})


def phase_e2e(args, deadline, res, tuned_path) -> None:
    rows_path = tempfile.mktemp(suffix=".jsonl")
    compiled_cost = None  # seconds of the first compiled worker
    names = [v for v in args.e2e.split(",") if v]
    n_compiled = 0
    for name in names:
        remaining = deadline - time.time()
        if name.startswith("torchao") and str(res.get("torchao", "")).startswith("not importable"):
            res["e2e"].append(dict(variant=name, event="error", error=f"torchao {res['torchao']}"))
            continue
        if remaining < (20 if args.smoke else 40):
            res["e2e"].append(dict(variant=name, skipped="budget"))
            continue
        compile_ = args.device != "cpu" and n_compiled < args.max_compiled and (
            compiled_cost is None or remaining > 1.3 * compiled_cost + 30)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--compile", str(int(compile_)),
               "--device", args.device, "--rows-out", rows_path, "--tuned", tuned_path, "--batches", args.batches, "--compiled-batches", args.compiled_batches,
               "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--prefill", str(args.prefill),
               "--repeats", str(args.repeats), "--fast-options", args.fast_options] + (["--smoke"] if args.smoke else [])
        t = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, remaining))
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-800:]}"
        except subprocess.TimeoutExpired:
            status = "timeout (budget)"
        took = time.time() - t
        if compile_:
            n_compiled += 1
            compiled_cost = took if compiled_cost is None else max(compiled_cost, took)
        res["e2e_workers"].append(dict(variant=name, compile=compile_, status=status, wall_s=took))
        print(f"e2e {name:14s} compile={compile_} {status[:200]} ({took:.0f}s)", flush=True)
    if os.path.exists(rows_path):
        with open(rows_path) as fh:
            res["e2e"] += [json.loads(line) for line in fh if line.strip()]
        os.unlink(rows_path)
    for r in res["e2e"]:
        if r.get("event") == "decode" and "decode_tok_s" in r:
            print(f"e2e {r['variant']:14s} bs={r['batch']:<3d} {r['decode_tok_s']:8.1f} tok/s "
                  f"({r.get('pct_of_limit', float('nan')):.0f}% of limit) compile={r['compile']}", flush=True)


# -------------------------------------------------------------------------------------------------------------
# summary
# -------------------------------------------------------------------------------------------------------------
def build_summary(res, bw, info, dims) -> dict:
    s = dict(info)
    s["copy_bandwidth_gbps"] = round(bw, 1) if bw == bw else None
    shapes = shapes_of(dims)
    for fmt in FORMATS:
        sel = [r for r in res["rows"] if r.get("fmt") == fmt and r.get("m") == 1 and "us" in r]
        if sel:
            nbytes = sum(r["bytes"] * shapes[r["shape"]][2] for r in sel)
            t = sum(r["us"] * shapes[r["shape"]][2] for r in sel)
            s[f"{fmt}_m1_pct_copy_weighted"] = round(100 * nbytes / t / 1e3 / bw, 1) if bw == bw else None
    by = {(r["shape"], r["fmt"], r["m"]): r for r in res["rows"] if "us" in r}
    for m in (1, 4, 16):
        for fmt in FORMATS[1:]:
            a, b = by.get(("gate_up", fmt, m)), by.get(("gate_up", "bf16", m))
            if a and b:
                s[f"gate_up_m{m}_speedup_{fmt}_vs_bf16"] = round(b["us"] / a["us"], 3)
    pre = {(r["shape"], r["fmt"], r["kernel"]): r for r in res["prefill"] if "us" in r}
    bfp = pre.get(("gate_up", "bf16", "cublas"))
    for (shape, fmt, kind), r in pre.items():
        if shape == "gate_up" and bfp:
            s[f"prefill_gate_up_{fmt}_{kind}_vs_bf16"] = round(bfp["us"] / r["us"], 3)
    for r in res["model"]:
        if "ms" in r:
            s[f"model_pass_ms_{r['fmt']}"] = round(r["ms"], 4)
            s[f"model_pass_pct_copy_{r['fmt']}"] = round(r["pct_copy"], 1) if bw == bw else None
    mr = {r["fmt"]: r for r in res["model"] if "ms" in r}
    if "bf16" in mr:
        for fmt in mr:
            if fmt != "bf16":
                s[f"model_pass_speedup_{fmt}_vs_bf16"] = round(mr["bf16"]["ms"] / mr[fmt]["ms"], 3)
    s["max_rel_err"] = max([r.get("rel_err", 0) for r in res["rows"] + res["prefill"]] or [0])
    s["unwritten_outputs"] = sum(r.get("unwritten", 0) for r in res["rows"] + res["prefill"])
    dec = {(r["variant"], r["batch"]): r for r in res["e2e"] if r.get("event") == "decode" and "decode_tok_s" in r}
    pf = {(r["variant"], r.get("mode", "")): r for r in res["e2e"] if r.get("event") == "prefill" and "tok_s" in r}
    for (v, b), r in dec.items():
        s[f"e2e_decode_tok_s_{v}_bs{b}"] = round(r["decode_tok_s"], 1)
        if "pct_of_limit" in r:
            s[f"e2e_decode_pct_of_limit_{v}_bs{b}"] = round(r["pct_of_limit"], 1)
        s[f"e2e_compiled_{v}_bs{b}"] = r.get("compiled", r["compile"])
    for (v, mode), r in pf.items():
        s[f"e2e_prefill_tok_s_{v}" + (f"_{mode.replace('-', '_')}" if mode else "")] = round(r["tok_s"], 1)
    for b in (1, 4, 16):
        base = dec.get(("bf16", b))
        for v in VARIANTS:
            if base and (v, b) in dec and v != "bf16":
                s[f"e2e_decode_speedup_{v}_vs_bf16_bs{b}"] = round(dec[(v, b)]["decode_tok_s"] / base["decode_tok_s"], 3)
    if ("bf16", "") in pf:
        for (v, mode), r in pf.items():
            if v != "bf16":
                s[f"e2e_prefill_speedup_{v}" + (f"_{mode.replace('-', '_')}" if mode else "") + "_vs_bf16"] = round(
                    r["tok_s"] / pf[("bf16", "")]["tok_s"], 3)
    for ours, theirs in (("int4g128", "torchao_int4"), ("int8", "torchao_int8"), ("int4g128", "bnb_nf4")):
        if (ours, 1) in dec and (theirs, 1) in dec:
            s[f"e2e_decode_ratio_{ours}_vs_{theirs}_bs1"] = round(dec[(ours, 1)]["decode_tok_s"] / dec[(theirs, 1)]["decode_tok_s"], 3)
    if dims is not SMOKE:
        g = {}
        if ("int8", 1) in dec:
            g["goal_int8_bs1_360_tok_s"] = dec[("int8", 1)]["decode_tok_s"] >= 360
        if ("int4g128", 1) in dec:
            g["goal_int4_bs1_600_tok_s"] = dec[("int4g128", 1)]["decode_tok_s"] >= 600
        if "e2e_decode_ratio_int4g128_vs_torchao_int4_bs1" in s:
            g["goal_int4_2p5x_torchao_int4"] = s["e2e_decode_ratio_int4g128_vs_torchao_int4_bs1"] >= 2.5
        if ("fp8", "") in pf and ("bf16", "") in pf:
            g["goal_fp8_w8a8_prefill_1p7x_bf16"] = pf[("fp8", "")]["tok_s"] >= 1.7 * pf[("bf16", "")]["tok_s"]
        wo = [v for v in ("int8", "int4g128", "int4g64", "mxfp4") if (v, "") in pf]
        if wo and ("bf16", "") in pf:
            g["goal_weight_only_prefill_not_slower"] = all(pf[(v, "")]["tok_s"] >= 0.98 * pf[("bf16", "")]["tok_s"] for v in wo)
        s.update(g)
    return s


def print_table(res, bw) -> None:
    print(f"\ncopy bandwidth {bw:.0f} GB/s (read+write)")
    print(f"{'shape':8s} {'fmt':9s} {'M':>4s} {'kernel':7s} {'us':>8s} {'GB/s':>6s} {'%copy':>6s}")
    for r in res["rows"]:
        if r.get("m") == 1 and "us" in r:
            print(f"{r['shape']:8s} {r['fmt']:9s} {r['m']:4d} {r['kernel']:7s} {r['us']:8.2f} {r['gbps']:6.0f} {r['pct_copy']:6.1f}")
    for r in res["model"]:
        if "ms" in r:
            print(f"model pass {r['fmt']:9s} {r['ms']:.3f} ms  {r['tok_s_ceiling']:.0f} tok/s ceiling  {r['pct_copy']:.0f}% of copy")
    print(f"\nend to end, decode tok/s (c: torch.compile'd step; else eager kernels in the CUDA graph), prefill 2048")
    print(f"{'variant':14s} {'compile':7s} {'bs1':>8s} {'bs4':>8s} {'bs16':>8s} {'prefill tok/s':>14s}")
    variants = list(dict.fromkeys(r["variant"] for r in res["e2e"] if "variant" in r))
    for v in variants:
        dec = {r["batch"]: r for r in res["e2e"] if r.get("variant") == v and r.get("event") == "decode" and "decode_tok_s" in r}
        pf = [r for r in res["e2e"] if r.get("variant") == v and r.get("event") == "prefill" and "tok_s" in r and not r.get("mode")]
        comp = next((r["compile"] for r in res["e2e"] if r.get("variant") == v and "compile" in r), "")
        cells = [(f"{dec[b]['decode_tok_s']:7.1f}" + ("c" if dec[b].get("compiled") else " ")) if b in dec else f"{'-':>8s}"
                 for b in (1, 4, 16)]
        print(f"{v:14s} {str(comp):7s} {' '.join(cells)} {pf[0]['tok_s'] if pf else float('nan'):14.0f}")


# -------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/bench_quant.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU dry run, with TRITON_INTERPRET=1)")
    ap.add_argument("--budget-s", type=float, default=360)
    ap.add_argument("--kernel-share", type=float, default=0.25, help="share of the budget for phase 1")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--e2e", default=",".join(VARIANTS), help="variants, in order ('' to skip)")
    ap.add_argument("--max-compiled", type=int, default=2, help="at most this many e2e variants with torch.compile")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--compiled-batches", default="1", help="in a compiled variant, these batches use torch.compile")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--fast-options", default=", tune=false",
                    help="appended to fast(...); default: no coordinate-descent tuning (its 8B compile takes ~100 s)")
    # worker mode (internal)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--rows-out", default=None)
    ap.add_argument("--tuned", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.prefill = min(args.prefill, 64)
        args.prompt = min(args.prompt, 16)
        args.new_tokens = min(args.new_tokens, 6)
        args.repeats = 1
    if args.worker:
        torch.manual_seed(0)
        try:
            worker(args)
        except Exception as e:
            with open(args.rows_out, "a") as fh:
                fh.write(json.dumps({"variant": args.worker, "compile": bool(args.compile), "event": "error",
                                     "error": f"{type(e).__name__}: {str(e)[:400]}",
                                     "trace": traceback.format_exc()[-1500:]}) + "\n")
            raise
        return
    t0 = time.time()
    torch.manual_seed(0)
    dev = args.device
    dims = SMOKE if args.smoke else FULL
    import transformers
    import triton

    import hf_accel

    info = {"gpu": torch.cuda.get_device_name() if is_cuda(dev) else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__, "hf_accel": hf_accel.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "smoke": args.smoke,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "budget_s": args.budget_s}
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except Exception as e:
        info["torchao"] = f"not importable: {type(e).__name__}: {str(e)[:200]}"
    res = {"t0": t0, "torchao": info["torchao"], "rows": [], "candidates": [], "prefill": [], "model": [], "e2e": [], "e2e_workers": []}
    bw = copy_bandwidth(dev)["copy_gbps"]
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    args.formats = args.formats.split(",")
    tuned = {}
    if not args.skip_kernels:
        tuned = phase_kernels(args, dims, bw, t0 + args.kernel_share * args.budget_s, dev, res)
        install_tuned(tuned)
        phase_model(args, dims, bw, t0 + (args.kernel_share + 0.05) * args.budget_s, dev, res)
    if is_cuda(dev):
        torch.cuda.empty_cache()
    tuned_list = [{"key": list(k), **v} for k, v in tuned.items()]
    tuned_path = tempfile.mktemp(suffix=".json")
    with open(tuned_path, "w") as fh:
        json.dump(tuned_list, fh)
    phase_e2e(args, t0 + args.budget_s - 10, res, tuned_path)
    os.unlink(tuned_path)
    summary = build_summary(res, bw, info, dims)
    summary["wall_s"] = round(time.time() - t0, 1)
    res.pop("t0")
    res.pop("torchao")
    result = {"summary": summary, **res, "tuned": tuned_list}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    print_table(res, bw)
    print(f"wrote {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
