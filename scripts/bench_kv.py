"""KV-cache plugins on an 8B-shaped model (Llama-3-8B config, random bf16 weights): decode speed, peak memory and
KV bytes of full KV vs each policy at budgets 1/2 .. 1/16 of the context, vs transformers' QuantizedCache.

    python scripts/bench_kv.py --contexts 8192 --batches 1 8 --out benchmarks/results/bench_kv_8k.json
    python scripts/bench_kv.py --merge a.json b.json --out benchmarks/results/bench_kv.json   # + summary
    python scripts/bench_kv.py --tiny                                                        # CPU smoke run

Every run is one `model.generate` (greedy, `new` tokens, EOS off); a stopping criterion timestamps each step after
a device sync, so prefill and decode are timed from the same call. `kv_mb` is the CUDA memory still held by the
returned cache; `peak_gb` is the peak allocated memory of the call (weights included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

import hf_accel

FRACTIONS = {"1/2": 2, "1/4": 4, "1/8": 8, "1/16": 16}


def build_model(tiny: bool, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if tiny:
        config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    else:  # Llama-3-8B shape
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                             rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)  # inv_freq was on meta
    return model.eval()


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("optimum"):
        return sum(tensor_bytes(v) for v in vars(obj).values())
    return 0


class Clock:
    """StoppingCriteria that records a synced timestamp after every generated token."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_one(model, spec, ctx, batch, new, device, quantized_cache=None):
    from transformers import StoppingCriteriaList

    if spec:
        hf_accel.apply(model, spec)
    g = torch.Generator().manual_seed(ctx + batch)
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, ctx), generator=g).to(device)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids), return_dict_in_generate=True)
    if quantized_cache:
        kwargs.update(cache_implementation="quantized", cache_config=dict(quantized_cache))  # generate() adds to it
    clock = Clock(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    row = {"context": ctx, "batch": batch, "new_tokens": new}
    row["prefill_s"] = round(clock.times[0] - t0, 4)
    steps = len(clock.times) - 1
    row["decode_tok_s"] = round(batch * steps / (clock.times[-1] - clock.times[0]), 2)
    row["decode_ms_per_step"] = round(1000 * (clock.times[-1] - clock.times[0]) / steps, 3)
    cache = out.past_key_values
    if device == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["kv_mb_allocated_delta"] = round((torch.cuda.memory_allocated() - base) / 2**20, 1)
    if hasattr(cache, "stored_tokens"):
        row["stored_tokens_per_layer"] = cache.stored_tokens()[0]
        row["kv_mb"] = round(cache.nbytes() / 2**20, 1)  # K/V (codes + scales) + positions/scores, counted
    else:  # DynamicCache, QuantizedCache: every tensor the layers hold (quantized tensor subclasses unflattened)
        row["kv_mb"] = round(sum(tensor_bytes(v) for l in cache.layers for v in vars(l).values()) / 2**20, 1)
    row["seen_tokens"] = int(cache.get_seq_length())
    del out, cache
    return row


def plan(ctx, batch, sweep):
    """(label, spec, budget fraction, QuantizedCache config) for one (context, batch)."""
    runs = [("full", "", None, None)]
    fracs = list(FRACTIONS) if sweep else ["1/8"]
    for frac in fracs:
        b = ctx // FRACTIONS[frac]
        runs += [(f"sink {frac}", f"sink(window={b - 4}, sinks=4)", frac, None),
                 (f"h2o {frac}", f"h2o(budget={b})", frac, None),
                 (f"snapkv {frac}", f"snapkv(budget={b})", frac, None)]
    runs += [("kvquant int4", "kvquant(bits=4)", None, None)]
    if sweep:
        runs += [("kvquant int8", "kvquant(bits=8)", None, None)]
    runs += [("h2o 1/8 + kvquant int4", f"h2o(budget={ctx // 8})+kvquant(bits=4)", "1/8", None)]
    return runs


def versions(device):
    import transformers
    v = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
         "hf_accel": hf_accel.__version__}
    if device == "cuda":
        v["gpu"] = torch.cuda.get_device_name()
        v["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return v


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--sweep-batches", type=int, nargs="+", default=[1], help="batches that get the budget sweep")
    ap.add_argument("--time-limit", type=float, default=1e9, help="stop starting runs after this many seconds")
    ap.add_argument("--int8", action="store_true", help="also int8 weights + h2o 1/8 at the first context, batch 1")
    ap.add_argument("--qc-contexts", type=int, nargs="*", help="contexts for the QuantizedCache rows (default: --contexts)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--quality", action="store_true", help="CPU quality rows on the 'tiny' reference model")
    ap.add_argument("--merge", nargs="+")
    ap.add_argument("--out", default="benchmarks/results/bench_kv.json")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.quality:
        return quality(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.contexts, args.batches, args.new = [64], [1, 2], 4
    start = time.perf_counter()
    model = build_model(args.tiny, device)
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "versions": versions(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": "Llama-3-8B shape, random bf16 weights" if not args.tiny else "tiny llama", "rows": []}

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)

    jobs = []
    for ctx in args.contexts:
        for batch in args.batches:
            jobs += [(ctx, batch) + r for r in plan(ctx, batch, batch in args.sweep_batches)]
    jobs += [(ctx, batch, "QuantizedCache quanto int4", "", None, {"backend": "quanto", "nbits": 4})
             for batch in args.batches for ctx in (args.qc_contexts or args.contexts)]  # last: quanto may build first
    if args.int8:
        jobs.append((args.contexts[0], 1, "int8 + h2o 1/8", f"int8+h2o(budget={args.contexts[0] // 8})", "1/8", None))
    run_one(model, "", 256, 1, 4, device)  # warm-up: kernels, allocator
    for ctx, batch, label, spec, frac, qc in jobs:
        if time.perf_counter() - start > args.time_limit:
            record["rows"].append({"label": label, "context": ctx, "batch": batch, "skipped": "time limit"})
            continue
        try:
            hf_accel.remove(model)
            row = run_one(model, spec, ctx, batch, args.new, device, qc)
        except Exception as e:  # OOM, missing backend: recorded, the sweep goes on
            row = {"context": ctx, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if device == "cuda":
                torch.cuda.empty_cache()
        row.update(label=label, spec=spec or ("QuantizedCache " + json.dumps(qc) if qc else "full KV (DynamicCache)"),
                   budget_fraction=frac)
        print(json.dumps(row), flush=True)
        record["rows"].append(row)
        save()
    hf_accel.remove(model)
    record["wall_s"] = round(time.perf_counter() - start, 1)
    save()


QUALITY_SPECS = ["", "sink(window={b4}, sinks=4, slack=0)", "h2o(budget={b}, slack=0)", "snapkv(budget={b}, window=16, slack=0)",
                 "h2o(budget={b}, slack=0)+kvquant(bits=4, group=16, residual=16)"]


@torch.no_grad()
def quality(out_path, n_rows=8, context=256, prefill=32, new=32):
    """On the `tiny` reference model (CPU): decode-mode perplexity of held-out text streamed through each cache
    (prefill `prefill` tokens, then one token per step, so eviction and quantization act as in generation), and
    greedy agreement of `new` generated tokens with the full cache after a `context - new` token prompt."""
    from hf_accel.plugins.kv_cache import KVCache
    from hf_accel.plugins.kv_cache._generate import POLICY_ATTR, QUANT_ATTR
    from hf_accel.quality import load_reference
    from hf_accel.quality.agreement import greedy_generate, heldout_prompts

    torch.set_num_threads(1)  # a tiny model: more threads only contend
    model, tok = load_reference("tiny")
    layers = model.config.num_hidden_layers
    ids = heldout_prompts(tok, n_rows, context, max_tokens=65536)
    rows, base = [], {}
    specs = [("full", "")] + [(f"kvquant int{b}", f"kvquant(bits={b}, group=16, residual=16)") for b in (8, 4)]
    for frac, div in FRACTIONS.items():
        b = context // div
        specs += [(f"{t.split('(')[0].split('+')[0]}{'+kvquant int4' if '+' in t else ''} {frac}", t.format(b=b, b4=b - 4))
                  for t in QUALITY_SPECS[1:] if not ("kvquant" in t and b <= 16 + 32 + 0) and not ("snapkv" in t and b <= 16)]
    for label, spec in specs:
        hf_accel.remove(model)
        if spec:
            hf_accel.apply(model, spec)
        cache = KVCache(layers, getattr(model, POLICY_ATTR, None), getattr(model, QUANT_ATTR, None))
        logits = [model(input_ids=ids[:, :prefill], past_key_values=cache).logits[:, -1:]]
        for t in range(prefill, context - 1):
            logits.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache).logits)
        logp = torch.log_softmax(torch.cat(logits, 1).float(), -1)
        nll = -logp.gather(-1, ids[:, prefill:, None]).mean().item()
        gen = greedy_generate(model, tok, ids[:, : context - new], new)
        if not spec:
            base = {"nll": nll, "gen": gen}
        row = {"label": label, "spec": spec or "full KV", "context": context, "decode_ppl": round(float(torch.tensor(nll).exp()), 3),
               "decode_ppl_ratio_vs_full": round(float(torch.tensor(nll - base["nll"]).exp()), 4),
               "greedy_agreement_vs_full": round((gen == base["gen"]).float().mean().item(), 4),
               "stored_tokens_end": cache.stored_tokens()[0]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    hf_accel.remove(model)
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "versions": versions("cpu"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": "hf_accel reference 'tiny' (Llama, 4 layers, context 256, trained on the stdlib)",
              "quality_rows": rows}
    with open(out_path, "w") as f:
        json.dump(record, f, indent=1)


def merge(paths, out):
    loaded = [json.load(open(p)) for p in paths]
    parts = [p for p in loaded if "rows" in p]
    quality_parts = [p for p in loaded if "quality_rows" in p]
    record = {"command": [p["command"] for p in parts], "versions": parts[0]["versions"],
              "date": [p["date"] for p in parts], "model": parts[0]["model"],
              "rows": [r for p in parts for r in p["rows"]]}
    for q in quality_parts:
        record["quality"] = {k: q[k] for k in ("command", "versions", "date", "model")}
        record["quality"]["rows"] = q["quality_rows"]
    record["summary"] = summarize(record)
    for q in quality_parts:
        for r in q["quality_rows"]:
            key = r["label"].replace("+", "_").replace(" ", "_").replace("/", "of").lower()
            record["summary"][f"quality_tiny_{key}_decode_ppl_ratio_vs_full"] = r["decode_ppl_ratio_vs_full"]
            record["summary"][f"quality_tiny_{key}_greedy_agreement_vs_full"] = r["greedy_agreement_vs_full"]
        record["summary"]["quality_command"] = q["command"]
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record["summary"], indent=1))


def summarize(record):
    rows = [r for r in record["rows"] if "decode_tok_s" in r and not r.get("warmup")]
    by = {(r["label"], r["context"], r["batch"]): r for r in rows}
    s = {"gpu": record["versions"].get("gpu"), "versions": record["versions"], "date": record["date"],
         "command": record["command"], "model": record["model"]}
    for (label, ctx, batch), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        key = f"{label.replace(' + ', '_').replace(' ', '_').replace('/', 'of')}_ctx{ctx // 1024}k_b{batch}".lower()
        full = by.get(("full", ctx, batch))
        s[key + "_decode_tok_s"] = r["decode_tok_s"]
        s[key + "_kv_mb"] = r.get("kv_mb")
        s[key + "_peak_gb"] = r.get("peak_gb")
        if full and label != "full":
            s[key + "_decode_speedup_vs_full"] = round(r["decode_tok_s"] / full["decode_tok_s"], 3)
            if full.get("kv_mb") and r.get("kv_mb"):
                s[key + "_kv_memory_ratio_vs_full"] = round(r["kv_mb"] / full["kv_mb"], 4)
    # What fits: the largest (context x batch) measured; the full cache runs out of memory there (prefill), the
    # evicting caches do not. Stored KV per seen token says how far each would go if prefill were chunked.
    for (label, ctx, batch), r in by.items():
        key = f"{label.replace(' + ', '_').replace(' ', '_').replace('/', 'of')}_ctx{ctx // 1024}k_b{batch}".lower()
        s[key + "_fits"] = True
        if r.get("kv_mb"):
            s[key + "_kv_bytes_per_seen_token"] = int(r["kv_mb"] * 2**20 / (r["seen_tokens"] * batch))
    for r in record["rows"]:
        if "OutOfMemory" in r.get("error", ""):
            key = f"{r['label'].replace(' + ', '_').replace(' ', '_').replace('/', 'of')}_ctx{r['context'] // 1024}k_b{r['batch']}"
            s[key.lower() + "_fits"] = False
    return s


if __name__ == "__main__":
    main()
