"""Where a W8A8 diffusion linear spends its time: host (launch) cost against GPU time, per piece, on the SD1.5 and
FLUX linear shapes. Session 8's bench_diffusers measured the whole op at 91-154 us on SD1.5 shapes where bf16
F.linear took 11-31 us (triton do_bench, so host cost shows whenever it exceeds the GPU's), and end-to-end W8A8 was
slower than bf16 on both pipelines (eager). This script tells host-bound from GPU-bound for each piece:

- `gpu_us`: the piece alone, many calls captured in one CUDA graph (no host cost), median replay / calls;
- `host_us`: Python + dispatch + launch time per call, calls enqueued back to back without synchronising
  (wall time / calls; when the GPU is slower than the host the queue fills and this reads the GPU's rate: the
  report keeps both and says which bound it is);
- pieces: bf16 F.linear; the whole op through `torch.ops.hf_accel.w8a8_diffusion_linear` (custom-op dispatch) and
  through its Python body directly; the activation quantizer (Triton); the 8-bit GEMM alone (torch._int_mm /
  torch._scaled_mm on pre-quantized inputs); the int8 epilogue (Triton).

    python scripts/bench_w8a8_overhead.py --out $OUT/bench_w8a8_overhead.json      # CUDA, ~20 s
    python scripts/bench_w8a8_overhead.py --smoke --out /tmp/w8.json              # CPU: the pieces run, no timing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [("sd15 attn proj 64x64, cfg", 8192, 320, 320), ("sd15 ff 64x64", 8192, 320, 2560),
          ("sd15 ff 32x32", 2048, 640, 5120), ("sd15 attn proj 8x8", 128, 1280, 1280),
          ("flux qkv", 4608, 3072, 9216), ("flux mlp down", 4608, 12288, 3072)]


def host_us(fn, calls: int) -> float:
    """Wall time per call of `calls` back-to-back calls, synchronised only at the end."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    enqueue = time.perf_counter() - t
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1e6 * enqueue / calls


def gpu_us(fn, calls: int) -> float:
    from hf_accel.runtime.bench import graph_ms

    return 1e3 * graph_ms([fn] * calls) / calls


def pieces(m: int, k: int, n: int, fmt: str, device: str, dtype: torch.dtype) -> dict:
    from hf_accel.kernels import w8a8_act as W
    from hf_accel.plugins.quantization.w8a8_diffusion import quantize_weight

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) * 0.02
    bias = torch.randn(n, device=device, dtype=dtype, generator=g)
    q, s = quantize_weight(w, fmt)
    xq, xs = W.quantize_tokens(x, fmt)
    body = W.w8a8_linear._init_fn  # the op's Python body, without the custom-op dispatcher (torch 2.4+)
    out = {
        "bf16_linear": lambda: F.linear(x, w, bias),
        "op_dispatch": lambda: torch.ops.hf_accel.w8a8_diffusion_linear(x, q, s, bias, fmt),
        "op_body": lambda: body(x, q, s, bias, fmt),
        "quantizer": lambda: W.quantize_tokens(x, fmt),
    }
    if device == "cuda" and fmt == "int8":
        acc = torch._int_mm(xq, q.t())
        out["gemm"] = lambda: torch._int_mm(xq, q.t())
        out["epilogue"] = lambda: W.int8_epilogue(acc, xs, s, bias, dtype)
    elif device == "cuda":
        y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s[None, :], out_dtype=torch.bfloat16)
        out["gemm"] = lambda: torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s[None, :], out_dtype=torch.bfloat16)
        out["bias_add"] = lambda: y + bias
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU: run each piece once on tiny shapes, no timing")
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = SHAPES if cuda else [(name, m // 64, k // 16, n // 16) for name, m, k, n in SHAPES[:2]]
    rows, t0 = [], time.time()
    for name, m, k, n in shapes:
        for fmt in ("int8", "fp8"):
            for piece, fn in pieces(m, k, n, fmt, device, dtype).items():
                row = {"shape": name, "m": m, "k": k, "n": n, "format": fmt, "piece": piece}
                try:
                    fn()
                    if cuda:
                        row["gpu_us"] = round(gpu_us(fn, args.calls), 2)
                        row["host_us"] = round(host_us(fn, args.calls), 2)
                        row["bound"] = "host" if row["host_us"] > 1.1 * row["gpu_us"] else "gpu"
                except Exception as e:  # one piece failing is a result too
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
               "python": platform.python_version(), "smoke": args.smoke, "wall_s": round(time.time() - t0, 1)}
    timed = {(r["shape"], r["format"], r["piece"]): r for r in rows if "gpu_us" in r}
    for (shape, fmt, piece), r in timed.items():
        key = f"{re.sub(r'[^0-9a-z]+', '_', shape.lower()).strip('_')}_{fmt}"
        summary[f"{key}_{piece}_gpu_us"], summary[f"{key}_{piece}_host_us"] = r["gpu_us"], r["host_us"]
        if piece == "op_dispatch" and (shape, fmt, "bf16_linear") in timed:  # the headline: GPU-only speedup
            summary[f"{key}_op_speedup_vs_bf16_gpu"] = round(timed[(shape, fmt, "bf16_linear")]["gpu_us"] / r["gpu_us"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(f"{'shape':28s} {'fmt':5s} {'piece':12s} {'gpu us':>8s} {'host us':>8s}")
    for r in rows:
        print(f"{r['shape'][:28]:28s} {r['format']:5s} {r['piece']:12s} {r.get('gpu_us', float('nan')):8.2f} "
              f"{r.get('host_us', float('nan')):8.2f} {r.get('bound', r.get('error', ''))[:40]}")


if __name__ == "__main__":
    main()
