"""Tensor-parallel decode: Llama-3-8B shape TP=1 vs TP=2 in bf16 and int4, and a Llama-3-70B shape in int4 on two
GPUs (batch 1 and 16, memory per GPU). Random weights, built on the meta device and materialised shard by shard on
each GPU (hf_accel.distributed.shard_model + materialize): no rank ever holds, or touches the CPU with, a whole model.

    torchrun --nproc_per_node=2 scripts/bench_tp.py --out $OUT/bench_tp.json          # everything (2 GPUs)
    python scripts/bench_tp.py --out /tmp/tp1.json                                      # TP=1 baseline only (1 GPU)
    torchrun --nproc_per_node=2 scripts/bench_tp.py --device cpu --smoke --out /tmp/x.json   # CPU check, tiny shapes

First (seconds): transformers' own `tp_plan="auto"` on small int8/fp8/int4 artifacts vs one device (the version of
transformers on the machine, e.g. 5.17 on the GPU image), logits and greedy output, plain and with `fast`.

TP=1 rows run on both GPUs at once (rank 0: bf16, rank 1: int4; no collective), then the TP=2 rows. Modes:
`hf_eager` = transformers' generate with its dynamic cache; `fast_graphs` = hf_accel's `fast(compile=False)`
(static KV, each decode step one CUDA graph, the row-parallel all-reduces captured in it). Decode speed =
batch x (N - 1) / (t(N) - t(1)), medians after warm-up (hf_accel.runtime.bench.measure, synchronised wall clock);
`pct_of_limit` compares it with this rank's weight (+ KV) bytes per step at the device-to-device copy bandwidth
measured in the same run (TP=2 rows: local shards, so the limit is per GPU). Every variant is wrapped: an error is
recorded in its row and the next variant runs; the JSON is rewritten after every variant. `--budget-s` stops
starting new variants after that many seconds (default 330, for a 6-minute slot).
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
import traceback

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)
SMOKE_8B = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)
SMOKE_70B = dict(SMOKE_8B, num_hidden_layers=3, num_attention_heads=8)
INT4 = "int4(group_size=128, method=rtn)"
MODES = {"hf_eager": None, "fast_graphs": "fast(compile=False)"}


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def random_init(seed: int):
    """Same stream on every rank: replicated tensors (embeddings, norms, head) come out identical on all ranks."""
    state = {"g": None}

    def init(name: str, t: torch.Tensor) -> None:
        if state["g"] is None:
            state["g"] = torch.Generator(t.device).manual_seed(seed)
        g = state["g"]
        if t.dtype == torch.int32:  # packed int4 words: random nibbles
            t.random_(-2**31, 2**31 - 1, generator=g)
        elif t.dtype == torch.int8:
            t.random_(-127, 128, generator=g)
        elif name.endswith("weight_scale"):
            t.uniform_(0.002, 0.004, generator=g)
        elif name.endswith("weight_zero"):
            t.fill_(7.5)
        elif t.ndim == 1:
            t.fill_(1.0)  # norms
        else:
            t.normal_(0.0, 0.02, generator=g)

    return init


def build(shape: dict, fmt: str, tp: int, device, dtype):
    """Meta skeleton -> int4 layers (as when an artifact loads) -> TP shards -> local tensors on `device`."""
    import hf_accel
    from hf_accel.distributed import materialize, shard_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    if fmt == "int4":
        hf_accel.apply(model, INT4, loading=True)
    if tp > 1:
        shard_model(model)
    materialize(model, device, random_init(0))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def memory(device) -> dict:
    if torch.device(device).type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated_gb": torch.cuda.memory_allocated(device) / 1e9, "device_used_gb": (total - free) / 1e9}


def run_variant(shape_name, shape, fmt, tp, batches, args, device, dtype, copy_bw, rank) -> list[dict]:
    """Build one model and measure every mode x batch on it. Returns this rank's rows."""
    import hf_accel
    from hf_accel.runtime.bench import measure

    rows = []
    base = {"shape": shape_name, "format": fmt, "tp": tp, "rank": rank}
    t0 = time.perf_counter()
    try:
        model = build(shape, fmt, tp, device, dtype)
    except Exception as e:  # noqa: BLE001
        return [{**base, "error": f"build: {type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}]
    build_s = time.perf_counter() - t0
    mem = memory(device)
    for mode in args.modes:
        spec = MODES[mode]
        try:
            if spec:
                hf_accel.apply(model, spec)
            for batch in batches:
                row = {**base, "mode": mode, "build_s": build_s, "weights": mem}
                try:
                    new = args.new_tokens
                    row.update(measure(model, mode, batch, args.prompt, new, repeats=args.repeats, copy_bw=copy_bw,
                                       synced_gpus=False))
                    row["mem_after"] = memory(device)
                    if spec:
                        from hf_accel.runtime import get_runtime

                        rt = get_runtime(model)
                        row["runtime_stats"] = dict(rt.stats) if rt is not None else None
                        row["runtime_warnings"] = sorted(rt.warned) if rt is not None else None
                        # a fallback to transformers' loop measures transformers, not the fast path
                        row["fast_path_used"] = rt is not None and rt.stats["calls"] > 0 and not rt.stats["fallbacks"]
                except Exception as e:  # noqa: BLE001
                    row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
                rows.append(row)
        except Exception as e:  # noqa: BLE001
            rows.append({**base, "mode": mode, "error": f"apply {spec}: {type(e).__name__}: {e}"})
        finally:
            if spec:
                try:
                    hf_accel.remove(model)
                except Exception:  # noqa: BLE001
                    pass
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def check_transformers_tp(device, distributed: bool, rank: int) -> list[dict]:
    """transformers' own TP (tp_plan="auto", this machine's transformers version) on small hf_accel artifacts:
    logits and greedy output against the same artifact loaded on one device, plain and with fast(compile=False)."""
    import tempfile

    import hf_accel
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    holder = [tempfile.mkdtemp(prefix="bench_tp_") if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(holder, 0)
    root = holder[0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if rank == 0:
        torch.manual_seed(0)
        cfg = LlamaConfig(**SMOKE_8B, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        LlamaForCausalLM(cfg).to(dtype).save_pretrained(f"{root}/float")
        for spec in ("int8", "fp8", INT4):
            m = AutoModelForCausalLM.from_pretrained(f"{root}/float", dtype=dtype, accel=spec)
            m.save_pretrained(f"{root}/{spec.split('(')[0]}")
    if distributed:
        dist.barrier()
    rows = []
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    for fmt in ("float", "int8", "fp8", "int4"):
        row = {"shape": "check", "format": fmt, "tp": dist.get_world_size() if distributed else 1, "rank": rank,
               "mode": "transformers_tp_plan_auto"}
        try:
            ref = AutoModelForCausalLM.from_pretrained(f"{root}/{fmt}", dtype=dtype, device_map=device)
            kw = {"tp_plan": "auto"} if distributed else {"device_map": device}
            tp = AutoModelForCausalLM.from_pretrained(f"{root}/{fmt}", dtype=dtype, **kw)
            with torch.no_grad():
                row["max_abs_logit_diff"] = float((tp(ids).logits.float() - ref(ids).logits.float()).abs().max())
                g = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
                expected = ref.generate(ids, **g)
                row["greedy_same"] = bool(torch.equal(tp.generate(ids, **g), expected))
                for m in (ref, tp):
                    hf_accel.apply(m, "fast(compile=False)")
                row["greedy_same_fast"] = bool(torch.equal(tp.generate(ids, **g), ref.generate(ids, **g)))
            row["tp_layer"] = type(tp.model.layers[0].self_attn.o_proj).__name__
        except Exception as e:  # noqa: BLE001
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        rows.append(row)
    return rows


def key(r: dict) -> str:
    return f"{r['shape']}_{r['format']}_tp{r['tp']}_b{r.get('batch', '?')}_{r.get('mode', '?')}"


def summarize(rows: list[dict], meta: dict) -> dict:
    s: dict = {}
    ok = [r for r in rows if "decode_tok_s" in r and r.get("rank") == 0 or "decode_tok_s" in r and r["tp"] == 1]
    for r in ok:
        s[f"tok_s_{key(r)}"] = round(r["decode_tok_s"], 2)
        if "pct_of_limit" in r:
            s[f"pct_copy_limit_{key(r)}"] = round(r["pct_of_limit"], 1)
    for name in list(s):
        if name.startswith("tok_s_") and "_tp2_" in name:
            base = name.replace("_tp2_", "_tp1_")
            if base in s:
                s["speedup_tp2_vs_tp1_" + name[len("tok_s_"):].replace("_tp2", "")] = round(s[name] / s[base], 3)
    for shape in ("70b", "8b"):
        mems = {r["rank"]: r["weights"].get("allocated_gb") for r in rows
                if r["shape"] == shape and r["tp"] == 2 and r.get("weights") and r["format"] == "int4"}
        peaks = {r["rank"]: r.get("peak_mem_gb") for r in rows
                 if r["shape"] == shape and r["tp"] == 2 and r["format"] == "int4" and "peak_mem_gb" in r}
        if mems:
            s[f"mem_weights_gb_per_gpu_{shape}_int4_tp2"] = [round(mems[k], 2) for k in sorted(mems)]
        if peaks:
            s[f"peak_mem_gb_rank0_{shape}_int4_tp2"] = round(max(v for v in peaks.values()), 2)
    checks = [r for r in rows if r["shape"] == "check"]
    if checks:
        s["tp_plan_auto_max_abs_logit_diff"] = max((r.get("max_abs_logit_diff", float("inf")) for r in checks),
                                                   default=None)
        s["tp_plan_auto_greedy_same_all"] = all(r.get("greedy_same") and r.get("greedy_same_fast") for r in checks)
    s["errors"] = sum(1 for r in rows if "error" in r)
    s.update(meta)
    return s


def write(path: str, report: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':5} {'fmt':5} {'tp':>2} {'b':>3} {'mode':12} {'tok/s':>9} {'ms/step':>8} {'%copy':>6} {'GB/gpu':>7}"]
    for r in rows:
        if r.get("rank") != 0 and r["tp"] == 2:
            continue
        if r["shape"] == "check" and "error" not in r:
            lines.append(f"check {r['format']:5} {r['tp']:>2}   - tp_plan=auto  max|dlogit|={r['max_abs_logit_diff']:.3g} "
                         f"greedy_same={r['greedy_same']} with_fast={r['greedy_same_fast']}")
            continue
        if "error" in r:
            lines.append(f"{r['shape']:5} {r['format']:5} {r['tp']:>2} {r.get('batch', '-')!s:>3} "
                         f"{r.get('mode', '-'):12} ERROR {r['error'][:70]}")
            continue
        lines.append(f"{r['shape']:5} {r['format']:5} {r['tp']:>2} {r['batch']:>3} {r['mode']:12} "
                     f"{r['decode_tok_s']:9.1f} {r['ms_per_step']:8.2f} {r.get('pct_of_limit', float('nan')):6.1f} "
                     f"{r['weights'].get('allocated_gb', float('nan')):7.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the whole script)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--skip", nargs="*", default=[], choices=["check", "tp1", "8b_tp2", "70b"])
    args = ap.parse_args()
    if args.smoke:
        args.prompt, args.new_tokens, args.repeats = min(args.prompt, 16), min(args.new_tokens, 6), 1

    t_start = time.perf_counter()
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=300))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    torch.manual_seed(0)

    import hf_accel  # noqa: F401  (integrations, plugins)
    from hf_accel.runtime.bench import copy_bandwidth

    copy_bw = copy_bandwidth(device)
    shape8, shape70 = (SMOKE_8B, SMOKE_70B) if args.smoke else (LLAMA3_8B, LLAMA3_70B)
    meta = {
        "gpu": torch.cuda.get_device_name(device) if args.device == "cuda" else platform.processor() or "cpu",
        "gpus": world if args.device == "cuda" else 0,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ("torchrun --nproc_per_node=%d " % world if distributed else "python ") + " ".join(sys.argv),
        "copy_bandwidth_gbs": round(copy_bw / 1e9, 1) if copy_bw == copy_bw else None,
        "smoke": args.smoke,
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
    }
    report = {"rows": [], "summary": {}, "args": vars(args)}
    rows: list[dict] = report["rows"]

    def gather(mine: list[dict]) -> None:
        if distributed:
            every: list = [None] * world
            dist.all_gather_object(every, mine)
            for part in every:
                rows.extend(part)
        else:
            rows.extend(mine)
        report["summary"] = summarize(rows, {**meta, "elapsed_s": round(time.perf_counter() - t_start, 1)})
        if rank == 0:
            write(args.out, report)

    def in_budget(name: str) -> bool:
        ok = torch.tensor([time.perf_counter() - t_start < args.budget_s], dtype=torch.int32)
        if distributed:
            if args.device == "cuda":
                ok = ok.to(device)
            dist.broadcast(ok, 0)  # rank 0 decides, so every rank runs the same variants
        if not bool(ok.item()):
            rows.append({"shape": name, "format": "-", "tp": 0, "rank": rank, "error": "skipped: over --budget-s"})
            return False
        return True

    # 0. correctness of transformers' own TP path on hf_accel artifacts (small model, seconds)
    if "check" not in args.skip and in_budget("check"):
        gather(check_transformers_tp(device, distributed, rank))
    # 1. TP=1 baselines: one model per GPU, in parallel (rank 0: bf16, rank 1: int4; one process: both in turn)
    if "tp1" not in args.skip and in_budget("tp1"):
        fmts = ["bf16", "int4"] if world == 1 else (["bf16", "int4"][rank:rank + 1] if rank < 2 else [])
        mine = []
        for fmt in fmts:
            mine += run_variant("8b", shape8, fmt, 1, [1], args, device, dtype, copy_bw, rank)
        gather(mine)
    if distributed and world >= 2:
        # 2. TP=2, 8B shape, bf16 and int4
        for fmt in ("bf16", "int4"):
            if "8b_tp2" not in args.skip and in_budget(f"8b_tp2_{fmt}"):
                gather(run_variant("8b", shape8, fmt, world, [1], args, device, dtype, copy_bw, rank))
        # 3. 70B shape, int4, batch 1 and 16
        if "70b" not in args.skip and in_budget("70b"):
            gather(run_variant("70b", shape70, "int4", world, [1, 16], args, device, dtype, copy_bw, rank))
    report["summary"] = summarize(rows, {**meta, "elapsed_s": round(time.perf_counter() - t_start, 1)})
    if rank == 0:
        write(args.out, report)
        print(json.dumps({k: v for k, v in report["summary"].items() if k not in ("versions", "env")}, indent=0))
        print(table(rows))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
