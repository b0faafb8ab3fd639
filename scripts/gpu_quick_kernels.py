"""A ~30-second GPU check of the two unmeasured weight kernels, for a device call with little time left: the 3-bit
lossless GEMV (`kernels/lossless.py`, code3) and the 2:4 tensor-core kernel (`kernels/sparse24.py`, mma) against
bf16 cuBLAS on Llama-3-8B linear shapes. Rows are written to --out after each one, so a run cut short keeps what it
measured; the most wanted rows come first (code3 at M=1, then mma at M=1 and M=32).

    python scripts/gpu_quick_kernels.py --out $OUT/gpu_quick_kernels.json      # CUDA
    TRITON_INTERPRET=1 python scripts/gpu_quick_kernels.py --smoke --out /tmp/q.json   # CPU: tiny shapes, no timing

Weights: for code3, bf16 values whose exponents follow the trained `tiny` reference's histogram (sign and mantissa
uniform, as bench_lossless does for its 8B model; the escape rate is recorded per shape); for 2:4, Gaussian weights
pruned 2:4 by magnitude (the kernel's speed does not depend on the values).
Time per call: all `--copies` distinct weights of a shape run once in one CUDA graph (more bytes than L2), the
median replay divided by the copies (`hf_accel.runtime.bench.graph_ms`). Bandwidth: bytes the kernel must read
(weights + side data) per second, and that as a fraction of --copy-gbps (H200 copy bandwidth measured by
bench_lossless in session 6 is used when not given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the kernels package without installing hf_accel
import kernels.lossless as KL  # noqa: E402
import kernels.sparse24 as KS  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "hf_accel" / "quality" / "assets" / "tiny"

SHAPES = {"q_o": (4096, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)}
SMOKE_SHAPES = {"q_o": (64, 128), "down": (32, 256)}


def graph_ms(fns, replays: int = 10) -> float:
    """Median ms of a CUDA graph replay running every fn once (hf_accel.runtime.bench.graph_ms, without importing
    the installed package: this script runs from the bare tree to save the install's seconds)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def trained_like(n: int, k: int, cdf: torch.Tensor, gen: torch.Generator, dev) -> torch.Tensor:
    """bf16 [n, k] whose exponents follow the trained tiny reference's histogram; sign and mantissa uniform (as
    bench_lossless.sample_bf16)."""
    e = torch.searchsorted(cdf, torch.rand(n * k, generator=gen, device=dev)).clamp_(max=254).to(torch.int32)
    sm = torch.randint(0, 256, (n * k,), generator=gen, device=dev, dtype=torch.int32)
    return (((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)).to(torch.int16).view(torch.bfloat16).view(n, k)


def tiny_cdf(dev) -> torch.Tensor:
    from safetensors.torch import load_file

    hist = torch.zeros(256, dtype=torch.int64)
    for f in sorted(TINY.glob("*.safetensors")):
        for t in load_file(f).values():
            if t.ndim == 2 and t.is_floating_point():
                hist += KL.exponent_histogram(t.to(torch.bfloat16))
    return (hist.double().cumsum(0) / hist.sum()).to(dev)


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest of every four consecutive inputs (magnitude 2:4)."""
    g = w.view(w.shape[0], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return torch.where(keep, g, torch.zeros_like(g)).view_as(w)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def code3_rows(shape_name, n, k, copies, dev, timing):
    g = torch.Generator(device=dev).manual_seed(0)
    cdf = tiny_cdf(dev)
    ws = [trained_like(n, k, cdf, g, dev) for _ in range(copies)]
    parts = [KL.encode3(w) for w in ws]
    x = (torch.randn(1, k, device=dev, generator=g)).to(torch.bfloat16)
    args = lambda p: (p["sm"], p["code"], p["base"], p["ptr"], p["esc"])  # noqa: E731
    y = KL.ll3_gemv(x, *args(parts[0]), None)
    ref = F.linear(x, ws[0])
    exact = F.linear(x, KL.ll3_decode(*args(parts[0])))
    row = dict(kernel="code3_gemv", shape=shape_name, n=n, k=k, m=1,
               escape_rate=round(int(parts[0]["ptr"][-1]) / (n * k), 6),
               bits_per_weight=round(8 * nbytes(*args(parts[0])) / (n * k), 3),
               decode_bit_exact=bool(torch.equal(KL.ll3_decode(*args(parts[0])).view(torch.int16), ws[0].view(torch.int16))),
               max_abs_diff_vs_cublas=float((y.float() - ref.float()).abs().max()),
               equal_share_vs_cublas=float((y == ref).float().mean()),
               exact_path_bit_identical=bool(torch.equal(exact, ref)))
    if timing:
        outs = [torch.empty(1, n, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        dense = graph_ms([lambda w=w, o=o: torch.matmul(x, w.t(), out=o) for w, o in zip(ws, outs)]) / copies
        ll = graph_ms([lambda p=p, o=o: KL.ll3_gemv(x, *args(p), None, out=o) for p, o in zip(parts, outs)]) / copies
        row.update(bf16_us=round(dense * 1e3, 2), code3_us=round(ll * 1e3, 2), speedup_vs_bf16=round(dense / ll, 3),
                   code3_gbps=round(nbytes(*args(parts[0])) / ll / 1e6, 1),
                   bf16_gbps=round(nbytes(ws[0]) / dense / 1e6, 1))
    return row


def mma_rows(shape_name, n, k, ms, copies, dev, timing):
    g = torch.Generator(device=dev).manual_seed(1)
    ws = [prune_24((torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)) for _ in range(copies)]
    packed = [KS.compress_24(w) for w in ws]
    dense_w = [KS.decompress_24(v, mt) for v, mt in packed]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
        cfg = KS._DEFAULTS["mma"](m, n, k, KS.sm_count(x.device))
        y = KS.sparse24_launch(x, *packed[0], None, "mma")
        ref = F.linear(x, dense_w[0])
        rel = float((y.float() - ref.float()).norm() / ref.float().norm())
        row = dict(kernel="s24_mma", shape=shape_name, n=n, k=k, m=m, config=str(cfg), rel_err_vs_dense=rel,
                   all_written=bool(torch.isfinite(y).all()))
        if timing:
            outs = [torch.empty(m, n, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
            dense = graph_ms([lambda w=w, o=o: torch.matmul(x, w.t(), out=o) for w, o in zip(dense_w, outs)]) / copies
            sp = graph_ms([lambda p=p, o=o: KS.sparse24_launch(x, *p, None, "mma", out=o)
                           for p, o in zip(packed, outs)]) / copies
            row.update(dense_us=round(dense * 1e3, 2), mma_us=round(sp * 1e3, 2), speedup_vs_dense=round(dense / sp, 3),
                       mma_gbps=round(nbytes(*packed[0]) / sp / 1e6, 1))
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1): no timing")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--copy-gbps", type=float, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    shapes = SHAPES if not args.smoke else SMOKE_SHAPES
    copies = args.copies if cuda else 1
    result = dict(rows=[], errors=[], summary={})
    t0 = time.time()
    command = "python " + " ".join(sys.argv)

    def save():
        s = result["summary"]
        for r in result["rows"]:
            key = f"{r['kernel']}_{r['shape']}_m{r['m']}"
            for f in ("speedup_vs_bf16", "speedup_vs_dense"):
                if f in r:
                    s[f"{key}_{f}"] = r[f]
        s.update(gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                 triton=__import__("triton").__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"), command=command, wall_s=round(time.time() - t0, 1),
                 weights="code3: exponents from the tiny reference histogram; mma: gaussian pruned 2:4")
        Path(args.out).write_text(json.dumps(result, indent=1))

    jobs = [("code3", name, n, k) for name, (n, k) in shapes.items()]
    jobs += [("mma", name, n, k, (1,)) for name, (n, k) in shapes.items()]
    jobs += [("mma", name, n, k, (32,)) for name, (n, k) in shapes.items()]
    for job in jobs:
        try:
            if job[0] == "code3":
                result["rows"].append(code3_rows(*job[1:], copies, dev, cuda))
            else:
                result["rows"].extend(mma_rows(*job[1:], copies, dev, cuda))
        except Exception as e:  # record, go on: one broken kernel must not lose the other rows
            result["errors"].append(f"{job[:2]}: {type(e).__name__}: {e}"[:500])
        save()
        print(f"{time.time() - t0:6.1f}s {json.dumps(result['rows'][-1] if result['rows'] else result['errors'])}",
              flush=True)
    for r in result["rows"]:
        print(r["kernel"], r["shape"], r["m"], r.get("speedup_vs_bf16", r.get("speedup_vs_dense")))
    print("errors:", result["errors"])


if __name__ == "__main__":
    main()
