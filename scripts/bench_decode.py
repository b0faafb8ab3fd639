"""Decode speed of a Llama-3-8B-shaped model (random bf16 weights): transformers eager, transformers static cache
(its own torch.compile) and hf_accel `fast`, side by side, plus the fast runtime's correctness and stability checks.

    python scripts/bench_decode.py --out benchmarks/results/bench_decode.json            # everything, one GPU
    python scripts/bench_decode.py --modes fast --batch 1 --prompt 512 --out /tmp/x.json # a slice
    python scripts/bench_decode.py --plot benchmarks/results/bench_decode.json           # redraw the PNG

Each mode runs in its own process (a compiled transformers model keeps its graphs and caches). The model is built
on the meta device and materialised on the GPU. Decode speed = batch x (N - 1) / (t(N) - t(1)), medians; see
`hf_accel.runtime.bench`. `--merge` adds the rows of an earlier JSON (a run split over two calls of one machine).
Checks (`--checks`, with mode fast): greedy agreement with transformers in bf16 on the 8B model; 1,000 generate
calls of random batch and lengths on a small model with no new capture, compile or memory.

Full vs regional compile (`fast` = `--spec` as given, `fast_regional` = the same with `fast(compile=regional)`):
every fast row records `compile_and_capture_s`, the seconds the runtime spent warming up (the first warm-up of a
step compiles it) and capturing that row's graphs; `--cold-cache` gives each worker an empty inductor/Triton cache,
so neither mode reuses kernels or tuning results the other (or an earlier run) left on disk.

    python scripts/bench_decode.py --modes fast_regional fast --batch 1 8 --prompt 512 --cold-cache --profile \
        --worker-timeout 280 --out /tmp/regional.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
                 bos_token_id=128000, eos_token_id=128001)
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)
SHAPES = {"8b": LLAMA3_8B, "small": SMALL}
MODES = {"hf_eager": {}, "hf_static": {"cache_implementation": "static"}, "fast": {}, "fast_regional": {}}
FAST_MODES = ("fast", "fast_regional")  # the hf_accel runtime: compile as `--spec` says, or regional


def spec_for(mode: str, spec: str) -> str:
    """`--spec` for mode fast; for fast_regional the same plugins with the fast plugin's `compile=regional`."""
    if mode != "fast_regional":
        return spec
    from hf_accel.spec import format_spec, parse_spec

    items = parse_spec(spec)
    if not any(name == "fast" for name, _ in items):
        raise SystemExit(f"--spec {spec!r} has no 'fast' plugin to compile regionally")
    return format_spec([(name, {**options, "compile": "regional"} if name == "fast" else options)
                        for name, options in items])


def build_model(shape: dict, dtype=None, device="cuda", seed: int = 0):
    """Random weights, built on the meta device and materialised on `device` (no CPU copy of the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)  # CPU smoke tests: bf16 is slow there
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)  # non-persistent buffers
    return model.eval()


def versions() -> dict:
    import transformers
    import triton

    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__,
            "python": platform.python_version()}


# --- checks (run in the fast worker) ---------------------------------------------------------------------------------

def agreement_8b(model, n_prompts: int = 16, new_tokens: int = 32) -> tuple[list, dict]:
    """transformers' greedy outputs for n prompts (before the plugin is applied): returns (prompts, outputs)."""
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    prompts = [torch.randint(10, model.config.vocab_size, (1, int(torch.randint(16, 200, (1,), generator=g))),
                             generator=g).to(device) for _ in range(n_prompts)]
    outs = [model.generate(p, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False) for p in prompts]
    return prompts, outs


def compare_agreement(model, prompts, expected, new_tokens: int = 32) -> dict:
    same, prefix = 0, []
    for p, e in zip(prompts, expected):
        got = model.generate(p, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        new_e, new_g = e[0, p.shape[1]:], got[0, p.shape[1]:]
        diff = (new_e != new_g).nonzero()
        prefix.append(int(diff[0]) if len(diff) else new_tokens)
        same += int(len(diff) == 0)
    # the same prompts in one left-padded batch
    t = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - p.shape[1]:] = p[0]
        mask[i, t - p.shape[1]:] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    batch_same = sum(int(torch.equal(batched[i, t:], e[0, p.shape[1]:])) for i, (p, e) in enumerate(zip(prompts, expected)))
    return {"agreement_prompts": len(prompts), "agreement_new_tokens": new_tokens,
            "agreement_identical_bs1": same / len(prompts),
            "agreement_mean_common_prefix": sum(prefix) / len(prefix) / new_tokens,
            "agreement_identical_batched_left_padded": batch_same / len(prompts)}


def thousand_calls(n_calls: int = 1000, seed: int = 0, device: str = "cuda") -> dict:
    """Random batch (1-4, left-padded rows of different lengths), prompt (1-440) and new tokens (1-64) on a small
    model: after one warm-up pass over the buckets, no capture, no compile and no memory may be added."""
    import torch._dynamo.utils as dynamo_utils

    import hf_accel
    from hf_accel.runtime import bucket_capacity, get_runtime
    from hf_accel.runtime.bench import sync

    model = build_model(SMALL, seed=seed, device=device)
    cuda = device == "cuda"
    memory = (lambda: (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())) if cuda else (lambda: (0, 0))
    hf_accel.apply(model, "fast")
    rt = get_runtime(model)
    rng = random.Random(seed)

    def call(batch, lengths, new):
        t = max(lengths)
        ids = torch.randint(10, SMALL["vocab_size"], (batch, t), device=device)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, t - n:] = 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert out.shape[0] == batch

    start = time.perf_counter()
    caps = sorted({bucket_capacity(n) for n in range(2, 440 + 64 + 1)}, reverse=True)
    for batch in (4, 2, 1):  # largest first: the KV pool is sized once
        for cap in caps:
            call(batch, [cap - 2] * batch, 2)
    sync(device)
    warmup_s = time.perf_counter() - start
    before = (rt.stats["captures"], dict(dynamo_utils.counters["stats"]), *memory(), rt.stats["pool_moves"])
    start = time.perf_counter()
    tokens = 0
    mid = None
    for i in range(n_calls):
        if i == n_calls // 2:
            sync(device)
            mid = memory()
        batch = rng.randint(1, 4)
        lengths = [rng.randint(1, 440) for _ in range(batch)]
        new = rng.randint(1, 64)
        call(batch, lengths, new)
        tokens += batch * new
    sync(device)
    after = (rt.stats["captures"], dict(dynamo_utils.counters["stats"]), *memory(), rt.stats["pool_moves"])
    return {"calls": n_calls, "calls_s": time.perf_counter() - start, "calls_tokens": tokens,
            "warmup_buckets_s": warmup_s, "captures_before": before[0], "captures_after": after[0],
            "dynamo_graphs_before": before[1].get("unique_graphs", 0), "dynamo_graphs_after": after[1].get("unique_graphs", 0),
            "mem_allocated_before": before[2], "mem_allocated_after": after[2],
            "mem_reserved_before": before[3], "mem_reserved_after": after[3], "pool_moves_during_calls": after[4] - before[4],
            "mem_reserved_mid": mid[1], "fallbacks": rt.stats["fallbacks"],
            # strict: nothing new at all; steady: no capture, compile or allocated growth, and the allocator's
            # reserved pool stops growing (no growth over the second half of the calls)
            "passed": before[0] == after[0] and before[1] == after[1] and after[2] <= before[2] and after[3] <= before[3],
            "passed_steady": before[0] == after[0] and before[1] == after[1] and after[2] <= before[2]
                             and after[3] <= mid[1]}


def profile(model, steps: int = 16) -> dict:
    """Where a fast decode step's time goes: the batch-1 decode graph replayed, timed with events, and the same
    replays under the profiler (kernel time per step; the difference to the graph time is launch gaps)."""
    from hf_accel.runtime import bucket_capacity, get_runtime

    ids = torch.randint(10, 1000, (1, 512), device="cuda")
    model.generate(ids, max_new_tokens=8, do_sample=False)
    rt = get_runtime(model)
    session = rt.sessions[(1, bucket_capacity(512 + 8))]
    graph = next(g for k, g in session.graphs.items() if k[0] == "decode")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    out: dict = {"graph_step_ms": start.elapsed_time(end) / steps}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    out["kernel_ms_per_step"] = sum(e.device_time_total for e in events) / steps / 1e3
    out["kernels_per_step"] = sum(e.count for e in events) / steps
    out["top_kernels"] = [{"name": e.key[:100], "ms_per_step": round(e.device_time_total / steps / 1e3, 4),
                           "calls_per_step": e.count / steps}
                          for e in sorted(events, key=lambda e: -e.device_time_total)[:30]]
    by_kind: dict = {}
    for e in events:
        kind = kernel_kind(e.key)
        entry = by_kind.setdefault(kind, {"ms_per_step": 0.0, "kernels_per_step": 0.0})
        entry["ms_per_step"] += e.device_time_total / steps / 1e3
        entry["kernels_per_step"] += e.count / steps
    out["by_kind"] = {k: {"ms_per_step": round(v["ms_per_step"], 4), "kernels_per_step": v["kernels_per_step"]}
                      for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]["ms_per_step"])}
    # the weight-streaming kernels read every weight byte once: their effective bandwidth is what a GEMV can reach
    from hf_accel.runtime.bench import weight_bytes_per_step

    mm_ms = by_kind.get("matmul", {}).get("ms_per_step", float("nan"))
    out["matmul_tb_s"] = weight_bytes_per_step(model) / (mm_ms / 1e3) / 1e12
    out["launch_gap_ms_per_step"] = out["graph_step_ms"] - out["kernel_ms_per_step"]
    return out


def kernel_kind(name: str) -> str:
    """Coarse class of a CUDA kernel name: where a decode step's time goes."""
    n = name.lower()
    if any(t in n for t in ("attention", "flash", "fmha", "sdpa", "softmax")):
        return "attention"
    if any(t in n for t in ("gemv", "gemm", "nvjet", "cutlass", "sm90_xmma", "splitk", "_mm_", "mm_", "bmm")):
        return "matmul"
    if "triton" in n:
        return "fused elementwise/reduction (triton)"
    if any(t in n for t in ("copy", "memcpy", "memset", "fill")):
        return "copy/fill"
    return "other"


def reference_agreement(n_prompts: int, dtype: str, batch_size: int, device: str = "cuda") -> dict:
    """Greedy agreement of `fast` with transformers on the trained `tiny` reference model (held-out prompts): random
    weights give near-tied logits, where any kernel change flips the argmax, so bf16 agreement means something only
    on a trained model."""
    import hf_accel
    from hf_accel.quality.agreement import greedy_agreement
    from hf_accel.quality.reference import load_reference

    torch.backends.cuda.matmul.allow_tf32 = False
    ref, tok = load_reference("tiny", device=device, dtype=getattr(torch, dtype))
    model, _ = load_reference("tiny", device=device, dtype=getattr(torch, dtype))
    hf_accel.apply(model, "fast")
    records = greedy_agreement(model, ref, tok, n_prompts=n_prompts, batch_size=batch_size, prompt_len=64, new_tokens=32)
    return {f"reference_tiny_{dtype}_bs{batch_size}_{r['metric']}": r["value"] for r in records}


# --- one mode in one process ---------------------------------------------------------------------------------------

def compile_and_capture(runtime, before: dict) -> dict:
    """What a row's calls cost the runtime beyond running: warm-ups (the first one of a step compiles it) and graph
    captures since `before` (a copy of `runtime.seconds`), and, regional, compiled entries per region function
    (1 each: no recompile)."""
    warmup = runtime.seconds["warmup"] - before.get("warmup", 0.0)
    capture = runtime.seconds["capture"] - before.get("capture", 0.0)
    out = {"compile_and_capture_s": warmup + capture, "compile_warmup_s": warmup, "capture_s": capture,
           "compile": runtime.compile_mode}
    regions = getattr(runtime, "_regions", None)
    if regions is not None:
        out["region_entries"] = regions.compiled_entries()
    return out


def worker(args) -> dict:
    from hf_accel.runtime.bench import copy_bandwidth, kv_bytes_per_token, measure, sync, weight_bytes_per_step

    result: dict = {"rows": [], "checks": {}}
    copy_bw = copy_bandwidth(args.device)
    result["copy_bandwidth_tb_s"] = copy_bw / 1e12
    start = time.perf_counter()
    model = build_model(SHAPES[args.shape], device=args.device)
    sync(args.device)
    result["build_s"] = time.perf_counter() - start
    result["weight_gb_per_step"] = weight_bytes_per_step(model) / 1e9
    result["kv_kb_per_token"] = kv_bytes_per_token(model) / 1e3
    json.dump(result, open(args.worker_out, "w"), indent=1)
    mode = args.worker
    fast = mode in FAST_MODES
    checks = args.checks and mode == "fast"  # the correctness checks run with the default compile only
    if fast:
        import hf_accel
        from hf_accel.runtime import get_runtime

        if checks:
            prompts, expected = agreement_8b(model)
        result["spec"] = spec_for(mode, args.spec)
        hf_accel.apply(model, result["spec"])
        runtime = get_runtime(model)
    configs = sorted(((b, p) for b in args.batch for p in args.prompt), key=lambda c: c[0] * c[1])
    for batch, prompt in configs:
        t0 = time.perf_counter()
        seconds = dict(runtime.seconds) if fast else {}
        try:
            row = measure(model, mode, batch, prompt, args.new_tokens, repeats=args.repeats, copy_bw=copy_bw,
                          **MODES[mode])
        except torch.OutOfMemoryError as e:
            row = {"mode": mode, "batch": batch, "prompt": prompt, "error": f"OOM: {str(e)[:200]}"}
            if args.device == "cuda":
                torch.cuda.empty_cache()
        row["config_wall_s"] = time.perf_counter() - t0
        if fast:
            row.update(compile_and_capture(runtime, seconds))
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        json.dump(result, open(args.worker_out, "w"), indent=1)  # a worker killed at a time limit keeps its rows
    if fast:
        result["checks"]["runtime_stats" if mode == "fast" else f"runtime_stats_{mode}"] = dict(runtime.stats)
        if args.profile:
            result["profile"] = profile(model)
            json.dump(result, open(args.worker_out, "w"), indent=1)
    if checks:
        result["checks"].update(compare_agreement(model, prompts, expected))
        json.dump(result, open(args.worker_out, "w"), indent=1)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if checks:
        result["checks"].update(thousand_calls(args.calls, device=args.device))
    json.dump(result, open(args.worker_out, "w"), indent=1)
    return result


# --- driver ----------------------------------------------------------------------------------------------------------

def key(mode, b, p) -> str:
    return f"{mode}_bs{b}_p{p}"


def summarize(report: dict) -> dict:
    rows = [r for r in report["rows"] if "decode_tok_s" in r]
    tok = {key(r["mode"], r["batch"], r["prompt"]): r for r in rows}
    s: dict = {}
    for k, r in tok.items():
        s[f"{k}_tok_s"] = round(r["decode_tok_s"], 1)
    for r in rows:
        if r["mode"] != "fast":
            continue
        b, p = r["batch"], r["prompt"]
        s[f"fast_bs{b}_p{p}_pct_of_limit"] = round(r.get("pct_of_limit", float("nan")), 1)
        s[f"fast_bs{b}_p{p}_ttft_s"] = round(r["ttft_s"], 4)
        for base in ("hf_eager", "hf_static"):
            if key(base, b, p) in tok:
                s[f"speedup_vs_{base}_bs{b}_p{p}"] = round(r["decode_tok_s"] / tok[key(base, b, p)]["decode_tok_s"], 2)
    speedups = [v for k, v in s.items() if k.startswith("speedup_vs_")]
    s["fast_ahead_of_both_everywhere"] = bool(speedups) and min(speedups) > 1.0
    if "fast_bs1_p512_tok_s" in s:
        s["goal_bs1_180_tok_s_met"] = s["fast_bs1_p512_tok_s"] >= 180
    s["copy_bandwidth_tb_s"] = round(report.get("copy_bandwidth_tb_s", float("nan")), 3)
    s["weight_gb_per_step"] = round(report.get("weight_gb_per_step", float("nan")), 2)
    for r in rows:
        if "compile_and_capture_s" in r:
            s[f"{key(r['mode'], r['batch'], r['prompt'])}_compile_and_capture_s"] = round(r["compile_and_capture_s"], 1)
    for k, r in tok.items():  # regional against full, same batch and prompt
        full = tok.get(k.replace("fast_regional_", "fast_", 1)) if r["mode"] == "fast_regional" else None
        if full is not None:
            tail = f"bs{r['batch']}_p{r['prompt']}"
            s[f"regional_vs_full_tok_s_{tail}"] = round(r["decode_tok_s"] / full["decode_tok_s"], 3)
            if full.get("compile_and_capture_s") and r.get("compile_and_capture_s"):
                s[f"full_over_regional_compile_s_{tail}"] = round(full["compile_and_capture_s"]
                                                                  / r["compile_and_capture_s"], 1)
    fast_rows = [r for r in rows if r["mode"] == "fast"]
    if fast_rows:
        s["fast_warmup_s_first_config"] = round(fast_rows[0]["warmup_s"], 1)
        s["fast_warmup_s_max_later_config"] = round(max((r["warmup_s"] for r in fast_rows[1:]), default=0.0), 1)
    for k, v in report.get("checks", {}).items():
        if isinstance(v, (int, float, bool)):
            s[k] = round(v, 4) if isinstance(v, float) else v
    for prefix, prof in (("profile", report.get("profile")), ("profile_regional", report.get("profile_fast_regional"))):
        if not prof:
            continue
        s[f"{prefix}_bs1_graph_step_ms"] = round(prof["graph_step_ms"], 3)
        s[f"{prefix}_bs1_kernel_ms"] = round(prof["kernel_ms_per_step"], 3)
        s[f"{prefix}_bs1_kernels_per_step"] = prof["kernels_per_step"]
        s[f"{prefix}_bs1_launch_gap_ms"] = round(prof["launch_gap_ms_per_step"], 3)
        s[f"{prefix}_bs1_matmul_tb_s"] = round(prof["matmul_tb_s"], 3)
        for kind, v in prof.get("by_kind", {}).items():
            s[f"{prefix}_bs1_ms_{kind.split()[0].replace('/', '_')}"] = v["ms_per_step"]
    s.update(gpu=report.get("gpu"), versions=report.get("versions"), date=report.get("date"),
             command=report.get("command"))
    return s


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "decode_tok_s" in r]
    prompts = sorted({r["prompt"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    labels = {"hf_eager": "transformers (dynamic cache)", "hf_static": "transformers static cache + compile",
              "fast": "hf_accel fast", "fast_regional": "hf_accel fast, regional compile"}
    fig, axes = plt.subplots(1, len(prompts), figsize=(5.5 * len(prompts), 4), squeeze=False)
    width = 0.8 / len(modes)
    for ax, prompt in zip(axes[0], prompts):
        for i, mode in enumerate(modes):
            vals = [next((r["decode_tok_s"] for r in rows if r["mode"] == mode and r["batch"] == b and r["prompt"] == prompt), 0)
                    for b in batches]
            bars = ax.bar([j + i * width for j in range(len(batches))], vals, width, label=labels[mode])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        limit = [next((r.get("limit_tok_s", 0) for r in rows if r["batch"] == b and r["prompt"] == prompt), 0) for b in batches]
        ax.scatter([j + width * (len(modes) - 1) / 2 for j in range(len(batches))], limit, marker="_", s=900, color="k",
                   label="bandwidth limit (copy bw / bytes per step)")
        ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_title(f"prompt {prompt}: decode tokens/s (all rows)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    gpu = report.get("gpu", "")
    shape = {"8b": "Llama-3-8B shape, bf16", "small": "small Llama (smoke run)"}.get(report.get("shape"), "")
    fig.suptitle(f"{shape}, greedy, {gpu}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spec", default="fast")
    ap.add_argument("--checks", action="store_true")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true", help="kernel time table of the batch-1 fast decode step")
    ap.add_argument("--cold-cache", action="store_true",
                    help="each worker compiles into an empty inductor/Triton cache (honest first-compile times)")
    ap.add_argument("--out", default="benchmarks/results/bench_decode.json")
    ap.add_argument("--merge", help="an earlier result JSON whose rows (of other modes) are kept")
    ap.add_argument("--plot", help="only redraw the PNG of this JSON")
    ap.add_argument("--reference-agreement", nargs="*", metavar="DTYPE:BATCH",
                    help="greedy agreement of fast vs transformers on the trained tiny reference, e.g. bfloat16:8")
    ap.add_argument("--reference-prompts", type=int, default=128)
    ap.add_argument("--worker-timeout", type=float, help="seconds per mode; a mode that runs out keeps its rows so far")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.plot:
        report = json.load(open(args.plot))
        plot(report, os.path.splitext(args.plot)[0] + ".png")
        return
    if args.worker:
        worker(args)
        return

    command = "python " + " ".join(sys.argv)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {"rows": [], "checks": {}, "gpu": gpu, "versions": versions(), "shape": args.shape,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
              "method": "decode tok/s = batch*(N-1)/(t(N)-t(1)), medians of --repeats after one warm-up of each; "
                        "limit = copy bandwidth / (weights + K/V at the mean length) bytes per step"}
    if args.merge:
        old = json.load(open(args.merge))
        # keep every earlier row this run does not measure again (another mode, batch or prompt)
        again = {(m, b, p) for m in args.modes for b in args.batch for p in args.prompt}
        report["rows"] = [r for r in old["rows"] if (r["mode"], r["batch"], r["prompt"]) not in again]
        report["checks"] = old.get("checks", {}) if "fast" not in args.modes else {}
        report["merged_from"] = {"command": old.get("command"), "date": old.get("date")}
        for k, v in old.items():  # the earlier run's profiles and per-mode copy bandwidths
            if k.startswith("profile") or k.endswith("_copy_bandwidth_tb_s") or k == "merged_from":
                report.setdefault("earlier_" + k if k == "merged_from" else k, v)
    for mode in args.modes:
        tmp = f"{args.out}.{mode}.tmp"
        cmd = [sys.executable, __file__, "--worker", mode, "--worker-out", tmp, "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--spec", args.spec, "--calls", str(args.calls), "--shape", args.shape,
               "--device", args.device, *(["--profile"] if args.profile and mode in FAST_MODES else []),
               "--batch", *map(str, args.batch), "--prompt", *map(str, args.prompt)] + (["--checks"] if args.checks else [])
        print(f"== {mode}", flush=True)
        env, cache = dict(os.environ), None
        if args.cold_cache:  # nothing compiled or tuned before (by the other mode, or an earlier run) is reused
            cache = tempfile.mkdtemp(prefix=f"inductor_{mode}_")
            env.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        try:
            rc = subprocess.run(cmd, timeout=args.worker_timeout, env=env).returncode
        except subprocess.TimeoutExpired:  # the worker wrote its rows so far
            rc = f"timeout after {args.worker_timeout} s"
        finally:
            if cache:
                shutil.rmtree(cache, ignore_errors=True)
        if not os.path.exists(tmp):
            report["rows"].append({"mode": mode, "error": f"worker exited with {rc}"})
            continue
        result = json.load(open(tmp))
        if rc != 0:
            result["rows"].append({"mode": mode, "error": f"worker exited with {rc} after {len(result['rows'])} rows"})
        os.remove(tmp)
        report["rows"] += result["rows"]
        report["checks"].update(result["checks"])
        if "profile" in result:
            report["profile" if mode == "fast" else f"profile_{mode}"] = result["profile"]
        for k in ("copy_bandwidth_tb_s", "weight_gb_per_step", "kv_kb_per_token"):
            report[k] = result.get(k)
        report[f"{mode}_copy_bandwidth_tb_s"] = result["copy_bandwidth_tb_s"]
    for spec in args.reference_agreement or []:
        dtype, batch_size = spec.split(":")
        t0 = time.perf_counter()
        try:
            report["checks"].update(reference_agreement(args.reference_prompts, dtype, int(batch_size), args.device))
        except Exception as e:  # recorded, the rest of the report stands
            report["checks"][f"reference_tiny_{dtype}_bs{batch_size}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"reference agreement {spec}: {time.perf_counter() - t0:.0f} s", flush=True)
    report["summary"] = summarize(report)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    json.dump(report, open(args.out, "w"), indent=1)
    try:
        plot(report, os.path.splitext(args.out)[0] + ".png")
    except ImportError:
        print("matplotlib missing: no plot (redraw with --plot)")
    from hf_accel.runtime.bench import format_table

    print(format_table([r for r in report["rows"] if "decode_tok_s" in r]))
    print(json.dumps({k: v for k, v in report["summary"].items() if k not in ("versions",)}, indent=0)[:3000])


if __name__ == "__main__":
    main()
