"""Quantized-linear kernels on the GPU: correctness, per-shape GEMV/GEMM time and bandwidth, the whole-model weight
pass of a Llama-3-8B-shaped model, against bf16 cuBLAS (and torchao when it is importable).

    python scripts/bench_quant.py --out benchmarks/results/bench_quant.json [--tune] [--torchao] [--quick]

What is timed: every call reads its own copy of the weights (enough copies to exceed L2 several times), the calls
are captured in one CUDA graph and replayed; time per call = replay time / calls (median of replays). GB/s counts
the bytes of the weights and their scales/zeros (x and y are < 0.1%). The copy bandwidth (bytes read + written of a
large device-to-device copy) is measured in the same run and is the yardstick for "% of copy".

Whole-model pass: all linears of the 8B shape (32 x [q, k, v, o, gate, up, down] + lm_head, distinct weights) at
batch 1 in one CUDA graph -> ms per pass -> the weight-streaming ceiling in tokens/s (attention, norms and sampling
not included). Quantized formats keep lm_head in bf16 (the plugins' default `skip=("lm_head",)`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import hf_accel.kernels as K
from hf_accel.kernels import _base, int4 as K4, w8 as K8
from hf_accel.kernels._base import LaunchConfig

HIDDEN, MLP, LAYERS, VOCAB, KV = 4096, 14336, 32, 128256, 1024
SHAPES = {  # name: (N, K, count per model)
    "q_o": (HIDDEN, HIDDEN, 2 * LAYERS),
    "k_v": (KV, HIDDEN, 2 * LAYERS),
    "gate_up": (MLP, HIDDEN, 2 * LAYERS),
    "down": (HIDDEN, MLP, LAYERS),
    "lm_head": (VOCAB, HIDDEN, 1),
}
FORMATS = ["bf16", "int8", "fp8", "int4g128", "int4g64", "int4g32"]
L2_MULTIPLE_BYTES = 400 * 2**20


# -------------------------------------------------------------------------------------------------------------
# weights of one format
# -------------------------------------------------------------------------------------------------------------
class QW:
    """Random weights of one format for an [N, K] linear (random bits: timing must not see zeros)."""

    def __init__(self, fmt: str, n: int, k: int, dev="cuda"):
        self.fmt, self.n, self.k = fmt, n, k
        if fmt == "bf16":
            self.w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        elif fmt == "int8":
            self.w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
            self.s = (torch.rand(n, device=dev) * 1e-3 + 1e-4).to(torch.bfloat16)
        elif fmt == "fp8":
            self.w = (torch.randn(n, k, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
            self.s = (torch.rand(n, device=dev) * 1e-4 + 1e-5).to(torch.bfloat16)
        else:
            g = int(fmt[5:])
            self.g = g
            self.qw = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device=dev, dtype=torch.int32)
            self.s = (torch.rand(n, k // g, device=dev) * 2e-3 + 1e-4).to(torch.bfloat16)
            self.z = (torch.rand(n, k // g, device=dev) * 15).to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        if self.fmt == "bf16":
            return self.w.numel() * 2
        if self.fmt in ("int8", "fp8"):
            return self.w.numel() + self.s.numel() * 2
        return self.qw.numel() * 4 + self.s.numel() * 2 + self.z.numel() * 2

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        if self.fmt == "bf16":
            return self.w.to(dtype)
        if self.fmt in ("int8", "fp8"):
            return K8.w8_dequantize(self.w, self.s, dtype)
        return K4.int4_dequantize(self.qw, self.s, self.z, self.g, self.k, dtype)

    def call(self, x, kind="auto", cfg=None, out=None):
        """One linear on x [M, K]; kind: auto (the op), gemv, dot, dequant (then cuBLAS)."""
        if self.fmt == "bf16":
            return F.linear(x, self.w)
        if self.fmt in ("int8", "fp8"):
            if kind == "auto":
                return (K.int8_linear if self.fmt == "int8" else K.fp8_linear)(x, self.w, self.s, None)
            if kind == "gemv":
                return K8.w8_gemv(x, self.w, self.s, None, self.fmt, cfg, out=out)
            if kind == "dot":
                return K8.w8_dot(x, self.w, self.s, None, self.fmt, cfg, out=out)
            return F.linear(x, K8.w8_dequant(self.w, self.s, x.dtype, self.fmt))
        if kind == "auto":
            return K.int4_linear(x, self.qw, self.s, self.z, None, self.g, self.k)
        if kind == "gemv":
            return K4.int4_gemv(x, self.qw, self.s, self.z, None, self.g, cfg, out=out)
        if kind == "dot":
            return K4.int4_dot(x, self.qw, self.s, self.z, None, self.g, cfg, out=out)
        return F.linear(x, K4.int4_dequant(self.qw, self.s, self.z, self.g, self.k, x.dtype))


# -------------------------------------------------------------------------------------------------------------
# timing
# -------------------------------------------------------------------------------------------------------------
def graph_ms(fns, replays: int = 15) -> float:
    """Median ms of one replay of a CUDA graph that runs every fn once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


def copy_bandwidth() -> dict:
    n = 2**30  # 2 GiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    ms = statistics.median(ts)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_ms": ms, "copy_gbps": 2 * 2 * n / ms / 1e6}


def per_call_us(qws, xs, kind, cfg, outs=None) -> float:
    fns = [(lambda q=q, x=x, o=o: q.call(x, kind, cfg, out=o)) for q, x, o in zip(qws, xs, outs or [None] * len(qws))]
    return graph_ms(fns) * 1000 / len(fns)


# -------------------------------------------------------------------------------------------------------------
# candidate configurations
# -------------------------------------------------------------------------------------------------------------
def gemv_candidates(fmt: str, quick: bool):
    """(block_n, block_k, warps, stages); w8 also both byte->float conversions (cvt)."""
    if fmt in ("int8", "fp8"):
        base = [(4, 512, 4, 1), (8, 512, 4, 1), (16, 512, 4, 1), (8, 1024, 4, 1), (16, 1024, 8, 1), (4, 1024, 4, 1),
                (8, 256, 2, 1), (16, 256, 4, 1), (8, 512, 4, 3), (16, 512, 8, 3), (32, 512, 8, 1), (4, 2048, 8, 1)]
        if quick:
            base = base[:4]
        return [LaunchConfig(bn, bk, 1, w, st, cvt) for (bn, bk, w, st) in base for cvt in (0, 1)]
    g = int(fmt[5:])
    base = [(4, 1024, 4, 1), (8, 1024, 4, 1), (16, 1024, 4, 1), (8, 512, 4, 1), (16, 512, 4, 1), (8, 2048, 4, 1),
            (16, 2048, 8, 1), (32, 1024, 8, 1), (4, 2048, 4, 1), (8, 1024, 4, 3), (16, 1024, 8, 3), (2, 2048, 4, 1)]
    if quick:
        base = base[:4]
    return [LaunchConfig(bn, max(bk, g), 1, w, st) for (bn, bk, w, st) in base]


def dot_candidates(fmt: str, m: int, quick: bool):
    bm = max(16, 1 << (m - 1).bit_length())
    base = [(16, 256, 4, 1), (32, 256, 4, 1), (16, 512, 4, 1), (32, 128, 4, 3), (16, 128, 4, 3), (64, 256, 4, 1),
            (32, 512, 8, 1), (16, 256, 4, 3)]
    if quick:
        base = base[:3]
    if fmt.startswith("int4"):
        base = [(bn, max(bk, 128), w, st) for (bn, bk, w, st) in base]
    return [LaunchConfig(bn, bk, bm, w, st) for (bn, bk, w, st) in base]


def prefill_candidates(fmt: str):
    """Triton GEMMs (the tensor-core kernel with large tiles) against dequantise + cuBLAS."""
    bk = 128 if fmt.startswith("int4") else 64
    return [LaunchConfig(128, bk, 128, 8, 3), LaunchConfig(128, bk, 64, 4, 3), LaunchConfig(64, bk, 128, 4, 3)]


# -------------------------------------------------------------------------------------------------------------
# checks
# -------------------------------------------------------------------------------------------------------------
def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def check(q: QW, m: int, kind: str, cfg=None) -> dict:
    x = torch.randn(m, q.k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ q.dense(torch.float64).T
    out = torch.full((m, q.n), float("nan"), device="cuda", dtype=torch.bfloat16)
    if kind in ("gemv", "dot"):
        y = q.call(x, kind, cfg, out=out)
        unwritten = int(torch.isnan(y).sum())
    else:
        y = q.call(x, kind, cfg)
        unwritten = int(torch.isnan(y).sum())
    return {"rel_err": rel_err(y, ref), "unwritten": unwritten}


# -------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/bench_quant.json")
    ap.add_argument("--tune", action="store_true", help="sweep block sizes per shape (else the library's choice)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--torchao", action="store_true")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--budget-s", type=float, default=400, help="past this, sweep the quick candidate lists only")
    args = ap.parse_args()
    t_start = time.time()
    torch.manual_seed(0)
    import triton

    rows, tuned = [], {}
    info = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:
        pass
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw['copy_gbps']:.0f} GB/s", flush=True)
    formats = args.formats.split(",")
    ms_list = [int(v) for v in args.ms.split(",")]
    dev = torch.device("cuda")
    key = _base.device_key(dev)

    # ---- per-shape table -----------------------------------------------------------------------------------
    for sname in args.shapes.split(","):
        n, k, count = SHAPES[sname]
        for fmt in formats:
            if sname == "lm_head" and fmt not in ("bf16", "int8", "int4g128"):
                continue
            one = QW(fmt, n, k)
            copies = max(2, min(48, -(-L2_MULTIPLE_BYTES // one.nbytes)))
            qws = [one] + [QW(fmt, n, k) for _ in range(copies - 1)]
            for m in ms_list:
                xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in qws]
                if fmt == "bf16":
                    us = per_call_us(qws, xs, "auto", None)
                    rows.append(dict(shape=sname, n=n, k=k, fmt=fmt, m=m, kernel="cublas", us=us,
                                     gbps=one.nbytes / us / 1e3, pct_copy=100 * one.nbytes / us / 1e3 / bw["copy_gbps"]))
                    continue
                cands = []
                quick = args.quick or time.time() - t_start > args.budget_s
                if args.tune:
                    if m == 1:
                        cands += [("gemv", c) for c in gemv_candidates(fmt, quick)]
                        cands += [("dot", c) for c in dot_candidates(fmt, m, True)]
                    else:
                        cands += [("dot", c) for c in dot_candidates(fmt, m, quick)]
                        if m <= 4:  # the GEMV with one program row per x row (weights re-read, L2 may catch them)
                            cands += [("gemv", c) for c in gemv_candidates(fmt, True)]
                else:
                    cands = [("auto", None)]
                best = None
                for kind, cfg in cands:
                    try:
                        us = per_call_us(qws, xs, kind, cfg)
                    except Exception as e:  # a config the compiler rejects (e.g. out of resources)
                        print(f"  skip {fmt} {sname} m={m} {kind} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    if best is None or us < best[0]:
                        best = (us, kind, cfg)
                if best is None:
                    rows.append(dict(shape=sname, n=n, k=k, fmt=fmt, m=m, error="no candidate ran"))
                    continue
                us, kind, cfg = best
                chk = check(one, m, kind, cfg)
                row = dict(shape=sname, n=n, k=k, fmt=fmt, m=m, kernel=kind, us=us, gbps=one.nbytes / us / 1e3,
                           pct_copy=100 * one.nbytes / us / 1e3 / bw["copy_gbps"], **chk)
                if cfg is not None:
                    row["config"] = cfg.as_dict()
                    entry = {"kernel": kind, **cfg.as_dict()}
                    tuned[(key, fmt, _base.m_bucket(m), n, k)] = entry
                rows.append(row)
                print(f"{sname:8s} {fmt:9s} m={m:<3d} {kind:5s} {us:8.2f} us {row['gbps']:7.0f} GB/s "
                      f"{row['pct_copy']:5.1f}% err={chk['rel_err']:.1e} unwritten={chk['unwritten']} {row.get('config', '')}",
                      flush=True)
            # prefill
            if not args.no_prefill:
                x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
                flops = 2 * 2048 * n * k
                if fmt == "bf16":
                    us = per_call_us(qws[:2], [x, x], "auto", None)
                    rows.append(dict(shape=sname, n=n, k=k, fmt=fmt, m=2048, kernel="cublas", us=us,
                                     tflops=flops / us / 1e6))
                else:
                    opts = [("dequant", None)] + [("dot", c) for c in prefill_candidates(fmt)]
                    for kind, cfg in opts:
                        try:
                            us = per_call_us(qws[:2], [x, x], kind, cfg)
                        except Exception as e:
                            print(f"  skip prefill {fmt} {kind}: {type(e).__name__}: {str(e)[:100]}")
                            continue
                        row = dict(shape=sname, n=n, k=k, fmt=fmt, m=2048, kernel=kind, us=us, tflops=flops / us / 1e6)
                        if cfg is not None:
                            row["config"] = cfg.as_dict()
                        if kind == "dot":
                            row.update(check(one, 2048, kind, cfg))
                        rows.append(row)
                        print(f"{sname:8s} {fmt:9s} m=2048 {kind:7s} {us:9.1f} us {row['tflops']:6.0f} TFLOP/s", flush=True)
            del qws, one
            torch.cuda.empty_cache()
        print(f"[{time.time() - t_start:.0f}s]", flush=True)

    # ---- whole-model weight pass ----------------------------------------------------------------------------
    # install the tuned choices so the op (kind="auto") uses them
    for kk, v in tuned.items():
        (K4.TUNED if kk[1].startswith("int4") else K8.TUNED)[kk] = v
    model_rows = []
    if not args.skip_model:
        for fmt in formats:
            layers = []
            for sname, (n, k, count) in SHAPES.items():
                f = "bf16" if sname == "lm_head" else fmt
                layers += [QW(f, n, k) for _ in range(count)]
            nbytes = sum(q.nbytes for q in layers)
            x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, MLP)}
            ms = graph_ms([(lambda q=q: q.call(x[q.k], "auto")) for q in layers], replays=10)
            model_rows.append(dict(fmt=fmt, linears=len(layers), gbytes=nbytes / 1e9, ms=ms, tok_s=1000 / ms,
                                   gbps=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / bw["copy_gbps"]))
            r = model_rows[-1]
            print(f"model {fmt:9s} {r['gbytes']:6.2f} GB {ms:6.3f} ms -> {r['tok_s']:6.0f} tok/s ceiling, "
                  f"{r['gbps']:5.0f} GB/s ({r['pct_copy']:.0f}% of copy)", flush=True)
            del layers
            torch.cuda.empty_cache()

    # ---- torchao --------------------------------------------------------------------------------------------
    torchao_rows = []
    if args.torchao:
        torchao_rows = bench_torchao(bw)

    summary = build_summary(rows, model_rows, torchao_rows, bw, info)
    result = {"summary": summary, "rows": rows, "model": model_rows, "torchao": torchao_rows,
              "tuned": [{"key": list(k), **v} for k, v in tuned.items()]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print_table(rows, model_rows, torchao_rows, bw)
    print(f"wrote {args.out} in {time.time() - t_start:.0f}s")


def bench_torchao(bw) -> list:
    out = []
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:
        print(f"torchao unavailable: {type(e).__name__}: {e}")
        return [{"error": f"{type(e).__name__}: {e}"}]
    for name, make in (("int8wo", lambda: Int8WeightOnlyConfig()), ("int4wo-128", lambda: Int4WeightOnlyConfig(group_size=128))):
        for sname in ("q_o", "gate_up"):
            n, k, _ = SHAPES[sname]
            try:
                mods = []
                for _ in range(8):  # distinct weights, one compiled function over all of them
                    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                    quantize_(lin, make())
                    mods.append(lin)
                fn = torch.compile(lambda x: [m(x) for m in mods])
                x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                us = graph_ms([lambda: fn(x)]) * 1000 / len(mods)
                nbytes = n * k * (1 if name == "int8wo" else 0.5)
                out.append(dict(method=name, shape=sname, n=n, k=k, m=1, us=us, gbps=nbytes / us / 1e3,
                                pct_copy=100 * nbytes / us / 1e3 / bw["copy_gbps"], torchao=torchao.__version__,
                                mode="torch.compile default, CUDA graph"))
                print(f"torchao {name} {sname} {us:.2f} us {out[-1]['gbps']:.0f} GB/s", flush=True)
            except Exception as e:
                out.append(dict(method=name, shape=sname, error=f"{type(e).__name__}: {str(e)[:300]}"))
                print(f"torchao {name} {sname} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                break
    return out


def build_summary(rows, model_rows, torchao_rows, bw, info) -> dict:
    s = dict(info)
    s["copy_bandwidth_gbps"] = round(bw["copy_gbps"], 1)
    by = {(r["shape"], r["fmt"], r["m"]): r for r in rows if r["m"] != 2048 and "us" in r}
    for fmt in ("bf16", "int8", "fp8", "int4g128", "int4g64", "int4g32"):
        sel = [r for r in rows if r["fmt"] == fmt and r["m"] == 1 and r["shape"] != "lm_head" and "us" in r]
        if sel:
            nbytes = sum(r["gbps"] * r["us"] * 1e3 * SHAPES[r["shape"]][2] for r in sel)
            t = sum(r["us"] * SHAPES[r["shape"]][2] for r in sel)
            s[f"{fmt}_m1_gbps_weighted"] = round(nbytes / t / 1e3, 1)
            s[f"{fmt}_m1_pct_copy_weighted"] = round(100 * nbytes / t / 1e3 / bw["copy_gbps"], 1)
    for r in model_rows:
        s[f"model_pass_ms_{r['fmt']}"] = round(r["ms"], 4)
        s[f"model_tok_s_ceiling_{r['fmt']}"] = round(r["tok_s"], 1)
        s[f"model_pct_copy_{r['fmt']}"] = round(r["pct_copy"], 1)
    mr = {r["fmt"]: r for r in model_rows}
    if "bf16" in mr:
        for fmt in mr:
            if fmt != "bf16":
                s[f"model_speedup_{fmt}_vs_bf16"] = round(mr["bf16"]["ms"] / mr[fmt]["ms"], 3)
    for m in (1, 4, 16):
        for fmt in ("int8", "fp8", "int4g128", "int4g64"):
            a, b = by.get(("gate_up", fmt, m)), by.get(("gate_up", "bf16", m))
            if a and b:
                s[f"gate_up_m{m}_speedup_{fmt}_vs_bf16"] = round(b["us"] / a["us"], 3)
    pre = [r for r in rows if r["m"] == 2048]
    for fmt in ("int8", "fp8", "int4g128", "int4g64"):
        for kind in ("dequant", "dot"):
            sel = [r for r in pre if r["fmt"] == fmt and r["kernel"] == kind and r["shape"] == "gate_up"]
            if sel:
                s[f"prefill_gate_up_{fmt}_{kind}_tflops"] = round(max(r["tflops"] for r in sel), 1)
    sel = [r for r in pre if r["fmt"] == "bf16" and r["shape"] == "gate_up"]
    if sel:
        s["prefill_gate_up_bf16_tflops"] = round(sel[0]["tflops"], 1)
    s["max_rel_err"] = max([r.get("rel_err", 0) for r in rows] or [0])
    s["unwritten_outputs"] = sum(r.get("unwritten", 0) for r in rows)
    for r in torchao_rows:
        if "us" in r:
            s[f"torchao_{r['method'].replace('-', '_')}_{r['shape']}_gbps"] = round(r["gbps"], 1)
    return s


def print_table(rows, model_rows, torchao_rows, bw) -> None:
    print(f"\ncopy bandwidth {bw['copy_gbps']:.0f} GB/s (read+write)")
    print(f"{'shape':8s} {'fmt':9s} {'M':>4s} {'kernel':7s} {'us':>8s} {'GB/s':>6s} {'%copy':>6s}")
    for r in rows:
        if r["m"] == 1 and "us" in r:
            print(f"{r['shape']:8s} {r['fmt']:9s} {r['m']:4d} {r['kernel']:7s} {r['us']:8.2f} {r['gbps']:6.0f} {r['pct_copy']:6.1f}")
    for r in model_rows:
        print(f"model {r['fmt']:9s} {r['ms']:.3f} ms  {r['tok_s']:.0f} tok/s ceiling  {r['pct_copy']:.0f}% of copy")


if __name__ == "__main__":
    main()
