"""Quality of the KV-cache plugins on a reference model, vs the full KV cache, with the project's harness.

    python scripts/quality_kv.py --model $R/base --out $OUT/quality_kv.json --device cuda     # <= 60 s on an H200
    python scripts/quality_kv.py --model hf_accel/quality/assets/tiny --out /tmp/q.json --device cpu --smoke

For every plugin (sink, h2o, snapkv, adakv, duo, quest; kvquant int8/int4 and h2o+kvquant once) at KV budgets 1/2 .. 1/16
of the context (`ctx` = the model's maximum, 4096 on `base`), per spec:

- needle recall (`hf_accel.quality.needle_recall`, prompts filling the context) and its ratio to the full cache;
- long held-out perplexity in decode mode: each held-out window of `ctx` tokens is prefilled up to its last
  `steps` tokens, which are then fed one per step through the plugin's cache (teacher forcing), so eviction,
  selection and quantization act exactly as in generation; reported with its relative change vs the full cache.
  (The harness's `perplexity()` runs plain forwards without a cache, where a KV plugin does nothing.)
- greedy agreement with the full cache on held-out prompts of `ctx - new` tokens (identical fraction, mean first
  divergence), both generated through `model.generate`;
- the multi-turn check (`hf_accel.quality.multi_turn_recall`: a second question over the returned cache) at 1/8;
- KV bytes held after the perplexity run, relative to the full bf16/fp32 cache of the same tokens.

Budgets: sink(window=b-4, sinks=4), h2o(budget=b), snapkv(budget=b), adakv(budget=b) (mean per KV head), quest(budget=b) (tokens read per step; the
cache itself stays full), duo with the retrieval-head share r chosen so its memory matches b:
r = (b - sinks - window) / (ctx - sinks - window), the head split calibrated once per r with `calibrate_duo` on
needle-format text from the training split. Specs run 1/8 first, then 1/16, 1/4, 1/2, so a time limit drops the
least informative ones; the JSON says what was skipped. Writes harness records + rows + a `summary`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_accel  # noqa: E402
from hf_accel.quality import make_record, multi_turn_recall, needle_recall, versions  # noqa: E402
from hf_accel.quality.agreement import greedy_generate, heldout_prompts  # noqa: E402
from hf_accel.quality.corpus import token_stream  # noqa: E402
from hf_accel.quality.needle import needle_training_example  # noqa: E402

_STREAMS: dict = {}


def _cached_stream(tokenizer, split, max_tokens=None):
    """The harness tokenizes its held-out stream on every call (seconds each); one copy per (split, length) here."""
    key = (id(tokenizer), split, max_tokens)
    if key not in _STREAMS:
        _STREAMS[key] = token_stream(tokenizer, split, max_tokens)
    return _STREAMS[key]


for _module in ("hf_accel.quality.needle", "hf_accel.quality.agreement"):
    sys.modules[_module].token_stream = _cached_stream

FRACTIONS = {"1/8": 8, "1/16": 16, "1/4": 4, "1/2": 2}  # run order
PLUGINS = ("sink", "h2o", "snapkv", "adakv", "duo", "quest")
DUO_SINKS, DUO_WINDOW = 64, 192


def duo_ratio(ctx: int, budget: int, sinks: int, window: int) -> float:
    return max(0.0, min(1.0, (budget - sinks - window) / max(1, ctx - sinks - window)))


def plan(ctx: int, fractions: list[str], plugins: list[str], sinks: int, window: int, quant: bool):
    """(label, plugin, fraction, spec) in run order; duo specs carry a placeholder for the calibrated split."""
    runs = [("full", "full", None, "")]
    for frac in fractions:
        b = ctx // FRACTIONS[frac]
        specs = {
            "sink": f"sink(window={b - 4}, sinks=4)",
            "h2o": f"h2o(budget={b})",
            "snapkv": f"snapkv(budget={b}, window={min(32, b // 2)})",
            "adakv": f"adakv(budget={b}, window={min(32, b // 2)})",  # mean per KV head
            "duo": f"duo(heads='{{heads}}', ratio={duo_ratio(ctx, b, sinks, window):.4f}, sinks={sinks}, window={window})",
            "quest": f"quest(budget={b}, page=16)",
        }
        runs += [(f"{p} {frac}", p, frac, specs[p]) for p in plugins if p in specs and (p != "quest" or b >= 32)]
        if quant and frac == "1/8":
            runs += [("kvquant int8", "kvquant", None, "kvquant(bits=8)"),
                     ("kvquant int4", "kvquant", None, "kvquant(bits=4)"),
                     (f"h2o {frac} + kvquant int4", "h2o+kvquant", frac,
                      f"h2o(budget={max(b, 128 + 32 + 8)})+kvquant(bits=4)")]
    return runs


def calibration_ids(tokenizer, ctx: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    stream = _cached_stream(tokenizer, "train", max(8 * ctx, 65536))
    return torch.stack([needle_training_example(rng, stream, tokenizer, ctx, max_needles=2) for _ in range(n)])


def make_cache(model):
    from transformers import DynamicCache

    from hf_accel.plugins.kv_cache import KVCache
    from hf_accel.plugins.kv_cache._generate import POLICY_ATTR, QUANT_ATTR

    policy, quant = getattr(model, POLICY_ATTR, None), getattr(model, QUANT_ATTR, None)
    if policy is None and quant is None:
        return DynamicCache()
    if hasattr(policy, "prepare"):
        policy.prepare(model)
    return KVCache(model.config.num_hidden_layers, policy, quant)


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


@torch.no_grad()
def decode_nll(model, ids: torch.Tensor, steps: int) -> tuple[float, int]:
    """Mean NLL of the last `steps` tokens of each row, fed one per step through the model's cache; KV bytes held."""
    cache = make_cache(model)
    ids = ids.to(model.device)
    t = ids.shape[1] - steps
    logits = [model(input_ids=ids[:, :t], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:]]
    for i in range(t, ids.shape[1] - 1):
        logits.append(model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
    logp = torch.log_softmax(torch.cat(logits, 1).float(), -1)
    nll = -logp.gather(-1, ids[:, t:, None]).mean().item()
    return nll, cache_bytes(cache)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a reference model folder (e.g. built by scripts/build_reference.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check of the script)")
    ap.add_argument("--plugins", default=",".join(PLUGINS))
    ap.add_argument("--fractions", default=None, help="e.g. 1/8,1/16 (default: all; --smoke: 1/8,1/2)")
    ap.add_argument("--no-quant", action="store_true", help="skip the kvquant rows")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; later specs are skipped (default 55 on "
                    "cuda, none on cpu)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    model.config.name_or_path = os.path.basename(os.path.normpath(args.model))
    if dev.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    ctx = int(model.config.max_position_embeddings)
    smoke = args.smoke
    if smoke:
        ctx = min(ctx, 256)
    sizes = dict(steps=8, ppl_rows=2, agree_prompts=2, new=8, needle_depths=(0.0, 0.5, 1.0), needle_n=1,
                 needle_batch=3, mt_trials=1) if smoke else dict(
        steps=32, ppl_rows=8, agree_prompts=8, new=16, needle_depths=(0.0, 0.25, 0.5, 0.75, 1.0), needle_n=2,
        needle_batch=5, mt_trials=4)
    fractions = (args.fractions.split(",") if args.fractions else (["1/8"] if smoke else list(FRACTIONS)))
    plugins = [p for p in args.plugins.split(",") if p]
    time_limit = args.time_limit if args.time_limit is not None else (55.0 if dev.type == "cuda" else math.inf)
    sinks, window = (DUO_SINKS, DUO_WINDOW) if ctx >= 1024 else (4, max(8, ctx // 16 - 4))
    runs = plan(ctx, fractions, plugins, sinks, window, not args.no_quant)

    ppl_ids = heldout_prompts(tok, sizes["ppl_rows"], ctx, max_tokens=max(8 * ctx, 65536))
    agree_ids = ppl_ids[: sizes["agree_prompts"], : ctx - sizes["new"]]
    calib = calibration_ids(tok, ctx)
    duo_heads: dict[str, str] = {}
    records, rows = [], []
    full: dict = {}
    print(f"[quality_kv] model {args.model} ctx {ctx} on {dev} ({len(runs)} specs), setup "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    for label, plugin, frac, spec in runs:
        elapsed = time.perf_counter() - start
        if label != "full" and elapsed > time_limit:
            rows.append({"label": label, "spec": spec, "skipped": f"time limit ({time_limit:.0f}s) at {elapsed:.0f}s"})
            continue
        t0 = time.perf_counter()
        row = {"label": label, "plugin": plugin, "budget_fraction": frac}
        try:
            hf_accel.remove(model)
            if plugin == "duo":
                ratio = float(spec.split("ratio=")[1].split(",")[0])
                key = f"{ratio:.4f}"
                if key not in duo_heads:
                    from hf_accel.plugins.kv_cache import calibrate_duo
                    duo_heads[key] = calibrate_duo(model, calib, ratio=ratio, sinks=sinks, window=window)
                spec = spec.replace("{heads}", duo_heads[key])
            row["spec"] = spec or "full KV"
            if spec:
                hf_accel.apply(model, spec)
            nll, kv_bytes = decode_nll(model, ppl_ids, sizes["steps"])
            gen = torch.cat([greedy_generate(model, tok, b, sizes["new"]) for b in agree_ids.split(8)])
            needle = needle_recall(model, tok, context_len=ctx, depths=sizes["needle_depths"], n_per_depth=sizes["needle_n"],
                                   batch_size=sizes["needle_batch"], spec=spec or None)
            records.append(needle)
            row.update(decode_ppl=math.exp(nll), needle_recall=needle["value"], needle_by_depth=needle["params"]["by_depth"],
                       kv_bytes=kv_bytes)
            if label == "full" or frac == "1/8":
                mt = multi_turn_recall(model, tok, context_len=ctx, n_trials=sizes["mt_trials"], spec=spec or None)
                records += mt
                row.update(multi_turn_turn1=mt[0]["value"], multi_turn_turn2=mt[1]["value"])
            if label == "full":
                full = {"nll": nll, "gen": gen, "needle": needle["value"], "kv_bytes": kv_bytes}
            differs = gen != full["gen"]
            row["greedy_identical_fraction"] = float((~differs.any(1)).float().mean())
            row["greedy_first_divergence_mean"] = float(torch.where(differs.any(1), differs.float().argmax(1),
                                                                    torch.tensor(sizes["new"])).float().mean())
            row["decode_ppl_rel_change_vs_full"] = math.exp(nll - full["nll"]) - 1.0
            row["needle_recall_ratio_vs_full"] = needle["value"] / full["needle"] if full["needle"] else None
            row["kv_bytes_ratio_vs_full"] = kv_bytes / full["kv_bytes"]
            params = {"context_len": ctx, "steps": sizes["steps"], "rows": sizes["ppl_rows"], "split": "heldout",
                      "reference": "the same model with the full KV cache"}
            records.append(make_record(model, "decode_heldout_perplexity", math.exp(nll), spec=spec or None, params=params))
            records.append(make_record(model, "decode_heldout_perplexity_rel_change", row["decode_ppl_rel_change_vs_full"],
                                       spec=spec or None, params=params))
            records.append(make_record(model, "greedy_identical_fraction_vs_full_kv", row["greedy_identical_fraction"],
                                       spec=spec or None, params={"n_prompts": sizes["agree_prompts"],
                                                                  "prompt_len": ctx - sizes["new"], "new_tokens": sizes["new"]}))
        except Exception as e:  # one failing spec must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if label == "full":
                raise
        finally:
            hf_accel.remove(model)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("needle_by_depth",)}), flush=True)

    wall = time.perf_counter() - start
    summary = summarize(rows, ctx, model.config.name_or_path, wall)
    summary.update(versions=versions(), date=records[0]["date"] if records else None,
                   command=" ".join(["python"] + sys.argv), gpu=torch.cuda.get_device_name() if dev.type == "cuda" else None)
    out = {"summary": summary, "rows": rows, "records": records,
           "duo_heads": duo_heads, "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print_table(rows)
    print(f"[quality_kv] {len([r for r in rows if 'needle_recall' in r])} specs in {wall:.1f}s -> {args.out}")
    return out


def _key(label: str) -> str:
    return label.replace(" + ", "_").replace(" ", "_").replace("/", "of").replace("+", "_").lower()


def summarize(rows, ctx, model_name, wall) -> dict:
    s = {"model": model_name, "context": ctx, "wall_s": round(wall, 1)}
    for r in rows:
        if "needle_recall" not in r:
            continue
        k = _key(r["label"])
        s[f"{k}_needle_recall"] = r["needle_recall"]
        if r["label"] != "full":
            s[f"{k}_needle_recall_ratio_vs_full"] = r["needle_recall_ratio_vs_full"]
            s[f"{k}_decode_ppl_rel_change_vs_full"] = round(r["decode_ppl_rel_change_vs_full"], 5)
            s[f"{k}_greedy_identical_fraction"] = r["greedy_identical_fraction"]
            s[f"{k}_kv_bytes_ratio_vs_full"] = round(r["kv_bytes_ratio_vs_full"], 4)
        else:
            s["full_decode_ppl"] = round(r["decode_ppl"], 4)
        if "multi_turn_turn2" in r:
            s[f"{k}_multi_turn_turn1"] = r["multi_turn_turn1"]
            s[f"{k}_multi_turn_turn2"] = r["multi_turn_turn2"]
    ok = [r for r in rows if r.get("budget_fraction") == "1/8" and r.get("needle_recall_ratio_vs_full") is not None]
    if ok:
        best = max(ok, key=lambda r: (r["needle_recall_ratio_vs_full"], -r["decode_ppl_rel_change_vs_full"]))
        s["best_at_1of8"] = best["label"]
        s["best_at_1of8_needle_recall_ratio_vs_full"] = best["needle_recall_ratio_vs_full"]
    s["skipped"] = [r["label"] for r in rows if "skipped" in r]
    s["errors"] = {r["label"]: r["error"] for r in rows if "error" in r}
    return s


def print_table(rows):
    head = f"{'spec':<26}{'needle':>8}{'/full':>7}{'ppl':>9}{'dppl%':>8}{'agree':>7}{'mt2':>5}{'kv':>7}{'s':>6}"
    print(head)
    for r in rows:
        if "needle_recall" not in r:
            print(f"{r['label']:<26} {r.get('error') or r.get('skipped')}"[:120])
            continue
        ratio = r.get("needle_recall_ratio_vs_full")
        print(f"{r['label']:<26}{r['needle_recall']:>8.2f}{(ratio if ratio is not None else float('nan')):>7.2f}"
              f"{r['decode_ppl']:>9.3f}{100 * r['decode_ppl_rel_change_vs_full']:>8.2f}"
              f"{r['greedy_identical_fraction']:>7.2f}{r.get('multi_turn_turn2', float('nan')):>5.2f}"
              f"{r['kv_bytes_ratio_vs_full']:>7.3f}{r['seconds']:>6.1f}")


if __name__ == "__main__":
    main()
