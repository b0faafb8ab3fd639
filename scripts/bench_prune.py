"""Pruning on the GPU, one command: 2:4 semi-structured linears of the Llama-3-8B shape against dense cuBLAS, and
end-to-end speed and memory of pruned 8B-shaped models (random weights) inside plain transformers.

    python scripts/bench_prune.py --out $OUT/bench_prune.json                    # H200/H100: ~2-3 minutes
    python scripts/bench_prune.py --out $OUT/bench_prune.json --budget-s 120 --skip-e2e   # linears only, ~2 min
    python scripts/bench_prune.py --device cpu --smoke --out /tmp/bench_prune.json  # CPU dry run, tiny shapes
                                                   # (sets TRITON_INTERPRET=1: the Triton 2:4 kernel interpreted)

1. linears: for each 8B shape (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336), weights pruned
   2:4 by magnitude; dense bf16 `F.linear` vs `to_sparse_semi_structured` with cuSPARSELt and with CUTLASS, at
   M = 2048 (prefill), 32 (batch-32 decode), 16 and 1. Each timed call reads its own weight copy (>= 400 MB of copies,
   past L2), all copies replayed in one CUDA graph (eager if capture fails; the row says), median of
   triton.testing.do_bench. Also our module `Sparse24Linear` (what `prune(pattern=2:4)` installs, timed eagerly
   after 1b, so with its compiled and tuned kernels), checked against the dense product. The device-to-device copy bandwidth is measured in the same run; decode rows give weight bytes
   / time as % of it. `layer_speedup_*`: the 7 linears of one decoder layer, dense time / sparse time.
1b. triton24: our Triton 2:4 kernels (hf_accel.kernels.sparse24: values + 2-bit positions, 0.5625x the dense bytes;
   "mma" / "mma_xa": the tile decompressed in registers onto tensor cores) on the same pruned weights at M <= 64
   (prefill is the semi-structured path's), its own weight copies past L2, CUDA graph. First the library's choice
   for every (shape, M), then, on CUDA and while the budget lasts, a launch-config sweep (8-11 candidates per case,
   round-robin over the cases so each gets its likeliest ones first); a row keeps the fastest correct candidate
   (`kernel`, `config`, `default_ms`, `candidates`, `swept`), and `tuned_sparse24` in the JSON is the table to paste
   into kernels/sparse24.py's TUNED. Every configuration compiles in worker processes from the start of the run
   (`--warm-workers`, JSON `triton24_warmup`), so the sweep mostly finds them in Triton's cache.
   `layer_speedup_best_m*` counts the best of cuSPARSELt, CUTLASS and triton24 per shape.
2. end to end (transformers `generate`, greedy, eager): dense 8B shape; the same with `prune(method=magnitude,
   pattern=2:4)` (Sparse24Linear); `shrink` 25% and 50% (structured, weight-norm scores: random weights).
   Prefill: one forward of 2048 tokens. Decode tok/s = (time(N new) - time(1 new)) / (N - 1) at batch 1 and 32,
   prompt 128. Memory: parameter bytes and peak allocated during decode.
Every variant is in try/except: a failure is recorded in its row and the rest still run.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

if "--smoke" in sys.argv and "cpu" in sys.argv:  # the Triton 2:4 kernel under the interpreter on a CPU dry run
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_accel.runtime.bench import copy_bandwidth  # noqa: E402 - after the path insert; NaN off CUDA

FULL = dict(hidden=4096, mlp=14336, layers=32, vocab=128256, heads=32, kv_heads=8, head_dim=128)
SMOKE = dict(hidden=256, mlp=512, layers=2, vocab=1000, heads=4, kv_heads=2, head_dim=64)


def shapes_of(d):
    kv = d["kv_heads"] * d["head_dim"]
    h, m = d["hidden"], d["mlp"]
    # name: (out, in, count per layer)
    return {"q_o": (h, h, 2), "k_v": (kv, h, 2), "gate_up": (m, h, 2), "down": (h, m, 1)}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, dev, reps=20):
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def graphed(fn, dev):
    """A CUDA graph replaying fn (no CPU launch overhead), or fn itself when capture fails / no CUDA."""
    if dev.type != "cuda":
        return fn, False
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay, True
    except Exception:
        torch.cuda.synchronize()
        return fn, False


def sparse_bytes(t) -> int:
    total = 0
    for name in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask"):
        x = getattr(t, name, None)
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
    return total


# -------------------------------------------------------------------------------------------------------------
def linear_phase(args, dev, dims, bw, rows, deadline, backends=("dense", "cusparselt", "cutlass", "module")):
    from hf_accel.plugins.pruning.methods import nm_mask
    from hf_accel.plugins.pruning.sparse24 import Sparse24Linear

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ms_list = [int(m) for m in args.ms.split(",")]
    for shape, (n, k, per_layer) in shapes_of(dims).items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        keep = nm_mask(w.float().abs(), 2, 4)
        wp = (w * keep).contiguous()
        del w
        nbytes = wp.numel() * wp.element_size()
        copies = max(1, min(16, math.ceil(args.l2_bytes / nbytes))) if dev.type == "cuda" else 1
        dense_ws = [wp.clone() for _ in range(copies)]
        for backend in backends:
            if time.time() > deadline:
                rows.append({"phase": "linear", "shape": shape, "backend": backend, "skipped": "budget"})
                continue
            weights, wbytes, err = None, nbytes, None
            try:
                if backend == "dense":
                    weights = dense_ws
                elif backend == "module":
                    if dev.type == "cuda":  # the cutlass rows leave CUTLASS forced: the module takes torch's default
                        from torch.sparse import SparseSemiStructuredTensor

                        SparseSemiStructuredTensor._FORCE_CUTLASS = False
                    mod = Sparse24Linear.from_dense(wp, keep, None)
                    weights = [mod]
                else:
                    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

                    if dev.type != "cuda":
                        raise RuntimeError("semi-structured sparse tensors need CUDA")
                    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                    weights = [to_sparse_semi_structured(x) for x in dense_ws]
                    wbytes = sparse_bytes(weights[0]) or nbytes // 2
            except Exception as e:
                err = f"{type(e).__name__}: {e}"[:300]
            for m in ms_list:
                row = {"phase": "linear", "shape": shape, "n": n, "k": k, "m": m, "backend": backend,
                       "copies": copies if backend != "module" else 1, "weight_bytes": wbytes}
                if err:
                    rows.append({**row, "error": err})
                    continue
                try:
                    x = torch.randn(m, k, device=dev, dtype=dtype)
                    outs = [None] * len(weights)
                    if backend == "module":
                        mod = weights[0]
                        fn = lambda: mod(x)
                        ref = F.linear(x.float(), wp.float())
                        got = mod(x).float()
                        row["rel_err"] = ((got - ref).norm() / ref.norm()).item()
                        row["sparse_kernel"] = mod._sparse is not None
                        row["sparse_error"] = mod._sparse_error
                        row["ms"] = bench_ms(fn, dev)
                        row["graph"] = False
                    else:
                        def fn():
                            for i, wt in enumerate(weights):
                                outs[i] = F.linear(x, wt)
                        if backend != "dense":
                            ref = F.linear(x.float(), wp.float())
                            got = F.linear(x, weights[0]).float()
                            row["rel_err"] = ((got - ref).norm() / ref.norm()).item()
                        run, row["graph"] = graphed(fn, dev)
                        row["ms"] = bench_ms(run, dev) / len(weights)
                    row["tflops"] = 2 * m * n * k / (row["ms"] * 1e-3) / 1e12
                    row["weight_gbps"] = wbytes / (row["ms"] * 1e-3) / 1e9
                    if math.isfinite(bw):  # measured on CUDA only
                        row["pct_copy_bw"] = 100 * wbytes / (row["ms"] * 1e-3) / bw
                    del outs
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(f"  linear {shape:8s} m={m:5d} {backend:11s} " +
                      (f"{row['ms'] * 1e3:9.1f} us" if "ms" in row else row.get("error", "")[:80]), flush=True)
            weights = None
            gc.collect()
        del dense_ws, wp, keep
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cuda":
        from torch.sparse import SparseSemiStructuredTensor

        SparseSemiStructuredTensor._FORCE_CUTLASS = False


# -------------------------------------------------------------------------------------------------------------
def triton24_candidates(m, n, k, sms):
    """A few launch configurations around the library default for (M, N, K), likeliest first: (kind, LaunchConfig).
    "mma" / "mma_xa" (the decompressed tile on tensor cores, W as the A or the B operand) in their tile shapes and
    split-K choices; at M <= 4 also the old "xsel" GEMV in its best measured configuration (H200, 2026-12-01)."""
    from hf_accel.kernels import sparse24 as S
    from hf_accel.kernels._base import LaunchConfig

    groups = k // 4
    p2 = lambda v: 1 << max(0, (v - 1).bit_length())
    bm = max(16, min(64, p2(m)))

    def mma(bn, bkg, warps, stages=3, split=None, kind="mma", rows=bm):
        bkg = min(bkg, max(8, p2(groups)))
        if split is None:
            split = S._split_for_warps(-(-n // bn) * -(-m // rows), warps, -(-groups // bkg), sms)
        return kind, LaunchConfig(block_n=bn, block_k=4 * bkg, block_m=rows, num_warps=warps, num_stages=stages,
                                  split_k=split)

    if not S.mma_supported(k):
        return []
    xa64 = dict(kind="mma_xa", rows=64)  # x as the A operand of a 64-row wgmma: W^T from shared, no per-MMA wait
    if bm <= 16:
        cands = [mma(32, 64, 2), mma(64, 64, 4), mma(64, 32, 4, **xa64), mma(128, 32, 8), mma(32, 64, 2, split=2),
                 mma(64, 32, 4, 4), mma(128, 32, 8, **xa64), mma(32, 64, 2, split=1), mma(64, 64, 4, split=1),
                 mma(128, 32, 8, kind="mma_xa"), mma(16, 64, 1)]
    else:
        cands = [mma(64, 64, 4), mma(64, 32, 4, **xa64), mma(128, 32, 8), mma(64, 64, 4, split=2), mma(64, 32, 4, 4),
                 mma(128, 32, 8, **xa64), mma(64, 64, 4, split=1), mma(128, 64, 8)]
    if m <= S.XSEL_MAX_M:
        cands.append(("xsel", LaunchConfig(block_n=4, block_k=min(1024, 4 * p2(groups)), block_m=p2(m),
                                           num_warps=4, split_k=2 if n <= 2048 else 1)))
    unique = {(kind, tuple(sorted(c.as_dict().items()))): (kind, c) for kind, c in reversed(cands)}
    return [unique[key] for key in dict.fromkeys((kind, tuple(sorted(c.as_dict().items()))) for kind, c in cands)]


def _warm_jobs(jobs):
    """Worker process: compile every (N, K, M, kind, config) into Triton's on-disk cache without launching (the GPU
    is being timed meanwhile), for the same argument specialisation as the timed launches (same shapes, fresh
    aligned tensors)."""
    from hf_accel.kernels import sparse24 as S
    from hf_accel.kernels._base import LaunchConfig

    done = 0
    for n, k, m, kind, cfg in jobs:
        try:
            values = torch.empty(n, k // 2, device="cuda", dtype=torch.bfloat16)
            meta = torch.empty(n, k // 8, device="cuda", dtype=torch.uint8)
            x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
            S.sparse24_launch(x, values, meta, None, kind, LaunchConfig(**cfg), compile_only=True)
            done += 1
        except Exception:
            pass
    return done


def start_triton24_warmup(args, dims, sms):
    """Compile the triton24 defaults and sweep candidates in parallel worker processes while the semi-structured
    rows are timed: each "mma" configuration takes seconds to compile, which would otherwise come out of the sweep's
    budget. Returns (pool, async result, jobs) or None (a failure here only costs the head start)."""
    from hf_accel.kernels import sparse24 as S

    cases = []  # per (shape, M): the default first, then the candidates, in the sweep's order
    for n, k, _ in shapes_of(dims).values():
        for m in (int(v) for v in args.ms.split(",")):
            if m > S.DOT_M:
                continue
            kind, cfg = S.default_config(m, n, k, sms)
            cands = ([(kind, cfg)] if cfg is not None else []) + (triton24_candidates(m, n, k, sms) if args.tune24
                                                                   else [])
            cases.append([(n, k, m, kd, c.as_dict()) for kd, c in cands])
    jobs = [case[i] for i in range(max(map(len, cases), default=0)) for case in cases if i < len(case)]
    workers = max(1, min(args.warm_workers, len(jobs)))
    if not jobs or args.warm_workers <= 0:
        return None
    try:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
        batches = [jobs[i::workers] for i in range(workers)]  # round-robin: each worker gets every shape
        return pool, pool.map_async(_warm_jobs, batches), len(jobs)
    except Exception as e:
        print(f"  triton24 warm-up not started: {type(e).__name__}: {e}", flush=True)
        return None


def finish_triton24_warmup(warm, deadline):
    """Wait (until `deadline`) for the warm-up workers, then stop them; returns a dict for the JSON."""
    if warm is None:
        return {"started": False}
    pool, result, count = warm
    info = {"started": True, "jobs": count}
    try:
        result.wait(max(0.0, deadline - time.time()))
        info["finished"] = result.ready()
        if result.ready():
            info["compiled"] = sum(result.get())
    except Exception as e:
        info["error"] = f"{type(e).__name__}: {e}"[:300]
    pool.terminate()
    print(f"  triton24 warm-up: {info}", flush=True)
    return info


def triton24_phase(args, dev, dims, bw, rows, deadline, sweep_deadline):
    """Rows of backend "triton24" (the library's launch choice first), then the sweep on CUDA; returns the tuned
    table entries [(key, value)] for kernels/sparse24.py's TUNED."""
    from hf_accel.kernels import sparse24 as S
    from hf_accel.kernels._base import device_key, m_bucket, sm_count
    from hf_accel.plugins.pruning.methods import nm_mask

    kernel = S.HAS_TRITON and (dev.type == "cuda" or S.interpreting())
    ms_list = [int(m) for m in args.ms.split(",")]
    cases, state = [], {}
    for shape, (n, k, _) in shapes_of(dims).items():
        if time.time() > deadline:
            rows.append({"phase": "linear", "shape": shape, "backend": "triton24", "skipped": "budget"})
            continue
        try:
            torch.manual_seed(0)  # the same pruned weight as the other backends' rows
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32) * 0.02
            wp = (w * nm_mask(w.float().abs(), 2, 4)).to(torch.bfloat16)
            del w
            values, meta = S.compress_24(wp)
            wbytes = values.numel() * values.element_size() + meta.numel() * meta.element_size()
            copies = max(1, min(32, math.ceil(args.l2_bytes / wbytes))) if dev.type == "cuda" else 1
            state[shape] = dict(n=n, k=k, wref=wp.float(), wbytes=wbytes, copies=copies,
                                vs=[(values.clone(), meta.clone()) for _ in range(copies)])
            del wp, values, meta
        except Exception as e:
            rows.append({"phase": "linear", "shape": shape, "backend": "triton24", "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        for m in ms_list:
            row = {"phase": "linear", "shape": shape, "n": n, "k": k, "m": m, "backend": "triton24",
                   "copies": copies, "weight_bytes": wbytes, "bytes_read": wbytes + 2 * m * k, "candidates": []}
            rows.append(row)
            if kernel:
                kind, cfg = S.choose(m, n, k, dev)
                if kind == "dense":  # prefill: the module runs the semi-structured kernels; not ours to time
                    row["skipped"] = "M > DOT_M: prefill runs on the semi-structured (cuSPARSELt) path"
                    continue
            else:
                kind, cfg = "reference", None
            cases.append((row, state[shape], kind, cfg))

    def measure(row, st, kind, cfg):
        m, n, k = row["m"], st["n"], st["k"]
        res = {"kernel": kind, "config": cfg.as_dict() if cfg is not None else None}
        try:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            if kind == "reference":
                call = lambda v, mt: S.sparse24_linear(x, v, mt, None)
            else:
                call = lambda v, mt: S.sparse24_launch(x, v, mt, None, kind, cfg)
            ref = F.linear(x.float(), st["wref"])
            t = time.perf_counter()
            got = call(*st["vs"][0]).float()
            first_ms = (time.perf_counter() - t) * 1e3
            res["rel_err"] = ((got - ref).norm() / ref.norm()).item()
            res["unwritten"] = int(got.isnan().sum())
            if dev.type == "cuda":
                outs = [None] * len(st["vs"])

                def fn():
                    for i, (v, mt) in enumerate(st["vs"]):
                        outs[i] = call(v, mt)
                run, res["graph"] = graphed(fn, dev)
                res["ms"] = bench_ms(run, dev) / len(st["vs"])
            else:  # CPU dry run (interpreter: seconds per call): the one checked call's wall time
                res["ms"], res["graph"] = first_ms, False
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"[:300]
        row["candidates"].append(res)
        ok = [c for c in row["candidates"] if "ms" in c and c["rel_err"] < 2e-2 and not c["unwritten"]]
        if ok:
            best = min(ok, key=lambda c: c["ms"])
            first = row["candidates"][0]
            row.update(ms=best["ms"], kernel=best["kernel"], config=best["config"], rel_err=best["rel_err"],
                       graph=best["graph"], default_ms=first.get("ms"))
            row["tflops"] = 2 * m * n * k / (row["ms"] * 1e-3) / 1e12
            row["weight_gbps"] = st["wbytes"] / (row["ms"] * 1e-3) / 1e9
            if math.isfinite(bw):
                row["pct_copy_bw"] = 100 * st["wbytes"] / (row["ms"] * 1e-3) / bw
        elif "error" in res and "ms" not in row:
            row["error"] = res["error"]
        return res

    for row, st, kind, cfg in cases:
        if time.time() > deadline:
            row["skipped"] = "budget"
            continue
        res = measure(row, st, kind, cfg)
        print(f"  linear {row['shape']:8s} m={row['m']:5d} triton24    " +
              (f"{res['ms'] * 1e3:9.1f} us ({kind})" if "ms" in res else res.get("error", "")[:80]), flush=True)
    tuned = []
    if dev.type == "cuda" and kernel and args.tune24:
        sms = sm_count(dev)
        queues = [(row, st, [c for c in triton24_candidates(row["m"], st["n"], st["k"], sms)
                             if c[1].as_dict() != (row["candidates"][0]["config"] or {})])
                  for row, st, _, _ in cases if row["m"] <= S.DOT_M and "ms" in row]
        for i in range(max((len(q[2]) for q in queues), default=0)):  # round-robin: every case's i-th candidate
            for row, st, cands in queues:
                if i < len(cands) and time.time() < sweep_deadline:
                    measure(row, st, *cands[i])
        for row, st, _ in queues:
            row["swept"] = len(row["candidates"])
            if "ms" in row and row["config"] is not None:
                key = (device_key(dev), m_bucket(row["m"]), st["n"], st["k"])
                entry = {"kernel": row["kernel"], **row["config"]}
                tuned.append([list(key), entry])
                S.TUNED[key] = entry  # later phases (module rows are already done; e2e) use the tuned choice
            print(f"  sweep {row['shape']:8s} m={row['m']:5d}: {row['swept']} configs, best {row.get('kernel')} "
                  f"{row.get('config')} {row.get('ms', float('nan')) * 1e3:.1f} us "
                  f"(default {(row.get('default_ms') or float('nan')) * 1e3:.1f} us)", flush=True)
    state.clear()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return tuned


# -------------------------------------------------------------------------------------------------------------
def build_model(dims, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=dims["hidden"], intermediate_size=dims["mlp"], num_hidden_layers=dims["layers"],
                      num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                      head_dim=dims["head_dim"], vocab_size=dims["vocab"], max_position_embeddings=8192,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


@torch.no_grad()
def measure_model(model, dev, args, label, rows, deadline):
    vocab = model.config.vocab_size
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    base = {"phase": "e2e", "variant": label, "param_bytes": params,
            "intermediate_size": model.config.intermediate_size, "num_key_value_heads": model.config.num_key_value_heads,
            "num_attention_heads": model.config.num_attention_heads}
    g = torch.Generator().manual_seed(0)
    # prefill
    row = {**base, "mode": "prefill", "tokens": args.prefill}
    try:
        ids = torch.randint(3, vocab, (1, args.prefill), generator=g).to(dev)
        fn = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)
        for _ in range(2):
            fn()
        sync(dev)
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t)
        row["ms"] = statistics.median(ts) * 1e3
        row["tok_s"] = args.prefill / statistics.median(ts)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    rows.append(row)
    print(f"  e2e {label:14s} prefill {args.prefill}: " + (f"{row['ms']:.1f} ms" if "ms" in row else row["error"][:80]),
          flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        row = {**base, "mode": "decode", "batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens}
        if time.time() > deadline:
            rows.append({**row, "skipped": "budget"})
            continue
        try:
            ids = torch.randint(3, vocab, (batch, args.prompt), generator=g).to(dev)

            def gen(n):
                sync(dev)
                t = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
                sync(dev)
                return time.perf_counter() - t

            gen(4)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            steps = []
            for _ in range(args.repeats):
                steps.append((gen(args.new_tokens) - gen(1)) / (args.new_tokens - 1))
            row["ms_per_step"] = statistics.median(steps) * 1e3
            row["tok_s"] = batch / statistics.median(steps)
            if dev.type == "cuda":
                row["peak_bytes"] = torch.cuda.max_memory_allocated()
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(f"  e2e {label:14s} decode b{batch}: " +
              (f"{row['tok_s']:.1f} tok/s" if "tok_s" in row else row["error"][:80]), flush=True)


def e2e_phase(args, dev, dims, rows, deadline):
    import hf_accel
    from hf_accel.plugins.pruning.structured import plan, shrink_model, weight_scores

    def run(label, make):
        if time.time() > deadline:
            rows.append({"phase": "e2e", "variant": label, "skipped": "budget"})
            return None
        try:
            model = make()
        except Exception as e:
            rows.append({"phase": "e2e", "variant": label, "error": f"{type(e).__name__}: {e}"[:300],
                         "trace": traceback.format_exc()[-800:]})
            print(f"  e2e {label}: {type(e).__name__}: {e}", flush=True)
            return None
        measure_model(model, dev, args, label, rows, deadline)
        return model

    state = {}

    def dense():
        state["m"] = build_model(dims, dev)
        return state["m"]

    def sparse24():
        hf_accel.apply(state["m"], "prune(method=magnitude, pattern=2:4, progress=false)")
        return state["m"]

    def fresh_shrink25():
        state.pop("m", None)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        m = build_model(dims, dev)
        state["cfg"] = copy.deepcopy(m.config)
        hf_accel.apply(m, "shrink(ratio=0.25, score=weight, progress=false)")
        state["m"] = m
        return m

    def shrink50():
        m = state["m"]
        keep_mlp, keep_kv = plan(state["cfg"], 0.5, "both")  # 50% of the original sizes, cut from the 25% model
        shrink_model(m, weight_scores(m), keep_mlp, keep_kv)
        return m

    ok = run("dense", dense) is not None
    if "2:4" in args.e2e and ok:
        run("prune_2:4", sparse24)
    if "shrink" in args.e2e:
        run("shrink_25", fresh_shrink25)
        if state.get("m") is not None:
            run("shrink_50", shrink50)


# -------------------------------------------------------------------------------------------------------------
# written before the first H200 run of the "mma" kernel (kernels/NOTES.md, 2:4 section): compare with the
# measured layer_speedup_triton24_m* / triton24_pct_copy_bw_m*
TRITON24_PREDICTED = {"triton24_predicted_layer_speedup_m1": 1.4, "triton24_predicted_layer_speedup_m16": 1.4,
                      "triton24_predicted_layer_speedup_m32": 1.4, "triton24_predicted_pct_copy_bw_m32": 60}


def summarize(rows, bw, dims):
    s = {}
    lin = {(r["shape"], r["m"], r["backend"]): r for r in rows if r["phase"] == "linear" and "ms" in r}
    per_layer = {name: c for name, (_, _, c) in shapes_of(dims).items()}
    ms_values = sorted({k[1] for k in lin})
    for m in ms_values:
        dense = sum(lin[(sh, m, "dense")]["ms"] * c for sh, c in per_layer.items() if (sh, m, "dense") in lin)
        for be in ("cusparselt", "cutlass", "module", "triton24"):
            if all((sh, m, be) in lin for sh in per_layer) and all((sh, m, "dense") in lin for sh in per_layer):
                sp = sum(lin[(sh, m, be)]["ms"] * c for sh, c in per_layer.items())
                s[f"layer_speedup_{be}_m{m}"] = round(dense / sp, 3)
        best = {}
        for sh in per_layer:
            cands = {be: lin[(sh, m, be)]["ms"] for be in ("cusparselt", "cutlass", "triton24") if (sh, m, be) in lin}
            if cands and (sh, m, "dense") in lin:
                best[sh] = min(cands.values())
                s[f"speedup_best_{sh}_m{m}"] = round(lin[(sh, m, "dense")]["ms"] / best[sh], 3)
                s[f"best_backend_{sh}_m{m}"] = min(cands, key=cands.get)
            if (sh, m, "triton24") in lin and (sh, m, "dense") in lin:
                s[f"speedup_triton24_{sh}_m{m}"] = round(lin[(sh, m, "dense")]["ms"] / lin[(sh, m, "triton24")]["ms"], 3)
        if len(best) == len(per_layer) and dense:
            s[f"layer_speedup_best_m{m}"] = round(dense / sum(best[sh] * c for sh, c in per_layer.items()), 3)
        dpct = [lin[(sh, m, "dense")]["pct_copy_bw"] for sh in per_layer
                if "pct_copy_bw" in lin.get((sh, m, "dense"), {})]
        if dpct:
            s[f"dense_pct_copy_bw_m{m}"] = round(statistics.mean(dpct), 1)
        tpct = [lin[(sh, m, "triton24")]["pct_copy_bw"] for sh in per_layer
                if "pct_copy_bw" in lin.get((sh, m, "triton24"), {})]
        if tpct:
            s[f"triton24_pct_copy_bw_m{m}"] = round(statistics.mean(tpct), 1)
    for m in (1, 16, 32):  # what the Triton kernel chose per shape (kernel, tile, split)
        for sh in per_layer:
            r = lin.get((sh, m, "triton24"))
            if r and r.get("config"):
                c = r["config"]
                s[f"triton24_config_{sh}_m{m}"] = (f"{r['kernel']} bn{c['block_n']} bk{c['block_k']} bm{c['block_m']} "
                                                   f"w{c['num_warps']} s{c['num_stages']} split{c.get('split_k', 1)}")
    for key in ("layer_speedup_best_m2048", "layer_speedup_best_m32", "layer_speedup_best_m16",
                "layer_speedup_best_m1"):
        if key in s:
            s[key.replace("layer_speedup_best", "goal_1_4x_met")] = s[key] >= 1.4
    s.update(TRITON24_PREDICTED)
    s["triton24_bytes_vs_dense"] = 0.5625  # bf16 values (0.5) + 2-bit positions (0.0625): the bandwidth-bound ceiling
    s["triton24_predicted_speedup_bw"] = round(1 / 0.5625, 3)  # at equal % of copy bandwidth, M <= 32
    errs = [r["rel_err"] for r in rows if "rel_err" in r]
    if errs:
        s["max_rel_err_sparse_vs_dense"] = max(errs)
    e2e = [r for r in rows if r["phase"] == "e2e" and ("tok_s" in r)]
    get = lambda v, mode, b=None: next((r for r in e2e if r["variant"] == v and r["mode"] == mode
                                        and (b is None or r.get("batch") == b)), None)
    d_pre = get("dense", "prefill")
    for v in ("prune_2:4", "shrink_25", "shrink_50", "dense"):
        pre = get(v, "prefill")
        if pre:
            s[f"{v.replace(':', '')}_prefill_tok_s"] = round(pre["tok_s"], 1)
            if d_pre and v != "dense":
                s[f"{v.replace(':', '')}_prefill_speedup"] = round(pre["tok_s"] / d_pre["tok_s"], 3)
            s[f"{v.replace(':', '')}_param_gb"] = round(pre["param_bytes"] / 1e9, 2)
        for b in (1, 32):
            r, d = get(v, "decode", b), get("dense", "decode", b)
            if r:
                s[f"{v.replace(':', '')}_decode_b{b}_tok_s"] = round(r["tok_s"], 1)
                if d and v != "dense":
                    s[f"{v.replace(':', '')}_decode_b{b}_speedup"] = round(r["tok_s"] / d["tok_s"], 3)
                if "peak_bytes" in r:
                    s[f"{v.replace(':', '')}_decode_b{b}_peak_gb"] = round(r["peak_bytes"] / 1e9, 2)
    s["copy_bandwidth_tb_s"] = round(bw / 1e12, 3) if math.isfinite(bw) else None
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/bench_prune.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU dry run)")
    ap.add_argument("--budget-s", type=float, default=150)
    ap.add_argument("--ms", default="2048,32,16,1")
    ap.add_argument("--l2-bytes", type=float, default=400 * 2**20)
    ap.add_argument("--e2e", default="2:4,shrink", help="which pruned e2e variants ('' = dense only)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--warm-workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)),
                    help="processes compiling the triton24 configurations ahead of the sweep (0 = none)")
    ap.add_argument("--no-tune24", dest="tune24", action="store_false",
                    help="no launch-config sweep of the Triton 2:4 kernel (library default only)")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.smoke:
        args.prefill, args.ms, args.new_tokens, args.prompt, args.repeats = 64, "64,8,1", 4, 16, 1
    dims = SMOKE if args.smoke else FULL
    dev = torch.device(args.device)
    t0 = time.time()
    deadline = t0 + args.budget_s
    rows = []
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    # budget shares: semi-structured linears, then triton24 (defaults, then the sweep), module rows, end to end
    # (without e2e the sweep takes most of what is left: each new "mma" configuration compiles once, seconds, so
    # worker processes compile them ahead, from the start)
    shares = (0.3, 0.5, 0.88) if args.skip_e2e else (0.25, 0.35, 0.45)
    from hf_accel.kernels._base import sm_count

    warm = start_triton24_warmup(args, dims, sm_count(dev)) if dev.type == "cuda" else None
    try:  # the module rows come after triton24: they run the same kernels, compiled (and tuned) by then
        linear_phase(args, dev, dims, bw, rows, t0 + shares[0] * args.budget_s, ("dense", "cusparselt", "cutlass"))
    except Exception as e:
        rows.append({"phase": "linear", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]})
    tuned24 = []  # the warm-up keeps compiling, in the sweep's order, while triton24 runs
    try:
        tuned24 = triton24_phase(args, dev, dims, bw, rows,  # CPU: no sweep, the interpreter gets its time
                                 t0 + shares[1 if dev.type == "cuda" else 2] * args.budget_s,
                                 t0 + shares[2] * args.budget_s)
    except Exception as e:
        rows.append({"phase": "linear", "backend": "triton24", "error": f"{type(e).__name__}: {e}",
                     "trace": traceback.format_exc()[-800:]})
    warm_info = finish_triton24_warmup(warm, time.time()) if dev.type == "cuda" else None
    try:
        linear_phase(args, dev, dims, bw, rows, t0 + (0.98 if args.skip_e2e else shares[2] + 0.07) * args.budget_s,
                     ("module",))
    except Exception as e:
        rows.append({"phase": "linear", "backend": "module", "error": f"{type(e).__name__}: {e}",
                     "trace": traceback.format_exc()[-800:]})
    if not args.skip_e2e:
        try:
            e2e_phase(args, dev, dims, rows, deadline)
        except Exception as e:
            rows.append({"phase": "e2e", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]})
    from hf_accel.quality.records import versions

    summary = summarize(rows, bw, dims)
    summary.update(gpu=torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
                   versions={**versions(), "triton": _version("triton")}, date=datetime.datetime.now(
                       datetime.timezone.utc).isoformat(timespec="seconds"),
                   command="python " + " ".join(sys.argv), shapes=dims, smoke=args.smoke,
                   wall_s=round(time.time() - t0, 1), triton_interpret=os.environ.get("TRITON_INTERPRET"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"summary": summary, "rows": rows, "tuned_sparse24": tuned24, "triton24_warmup": warm_info}, fh, indent=1, default=str)
    print(f"\nwrote {args.out} ({summary['wall_s']} s)")
    backends = ("dense", "cusparselt", "cutlass", "module", "triton24")
    print(f"{'shape':8s} {'m':>5s} " + " ".join(f"{b:>11s}" for b in ("dense us",) + backends[1:]))
    lin = {(r["shape"], r["m"], r["backend"]): r for r in rows if r["phase"] == "linear" and "ms" in r}
    for sh in shapes_of(dims):
        for m in sorted({k[1] for k in lin}, reverse=True):
            cells = [f"{lin[(sh, m, b)]['ms'] * 1e3:11.1f}" if (sh, m, b) in lin else f"{'-':>11s}"
                     for b in backends]
            print(f"{sh:8s} {m:5d} " + " ".join(cells))
    for k, v in summary.items():
        if isinstance(v, (int, float, bool)):
            print(f"  {k}: {v}")


def _version(name):
    try:
        import importlib.metadata

        return importlib.metadata.version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
