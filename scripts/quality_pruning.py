"""Quality of the pruning plugins on a reference model, with the project's harness (held-out perplexity, greedy
agreement / KL against the unpruned model).

    python scripts/quality_pruning.py --model $R/base --out $OUT/quality_pruning.json --device cuda   # ~40-60 s H200
    python scripts/quality_pruning.py --model hf_accel/quality/assets/tiny --out /tmp/qp.json --device cpu --smoke

Variants: dense; magnitude / Wanda / SparseGPT at 50% unstructured, 2:4 and 4:8 (the published ordering on
Llama-2 is SparseGPT ≈ Wanda << magnitude); SparseGPT 2:4 in bf16 through the Sparse24Linear kernels (CUDA);
`shrink` (structured, activation scores) at 10 / 25 / 40% before and after LoRA recovery (`recover_lora`).
Output: {"summary": {...}, "records": [...]} with harness records (each with command, versions, date)."""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FULL = dict(samples=64, seq_len=512, ppl_tokens=32768, ppl_len=1024, agree_prompts=16, agree_new=32,
            ratios=(0.1, 0.25, 0.4), recover_steps=60, recover_batch=8, recover_seq=512,
            variants=[f"{m}_{p}" for p in ("50%", "2:4", "4:8") for m in ("magnitude", "wanda", "sparsegpt")]
            + ["sparsegpt_2:4_bf16"])
SMOKE = dict(samples=8, seq_len=128, ppl_tokens=2048, ppl_len=256, agree_prompts=4, agree_new=8, ratios=(0.25,),
             recover_steps=4, recover_batch=4, recover_seq=64,
             variants=["magnitude_2:4", "wanda_2:4", "sparsegpt_2:4"])


def spec_of(variant: str, cfg: dict) -> str:
    method, pattern = variant.split("_")[:2]
    opt = "sparsity=0.5" if pattern == "50%" else f"pattern={pattern}"
    return f"prune(method={method}, {opt}, samples={cfg['samples']}, seq_len={cfg['seq_len']}, progress=false)"


def run(model_dir: str, device: str = "cpu", smoke: bool = False, variants=None, structured: bool = True,
        out: str | None = None) -> dict:
    import hf_accel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_accel.plugins.pruning.structured import recover_lora
    from hf_accel.quality import make_record, versions
    from hf_accel.quality.agreement import greedy_agreement
    from hf_accel.quality.corpus import token_stream
    from hf_accel.quality.perplexity import sliding_window_nll

    cfg = dict(SMOKE if smoke else FULL)
    if variants is not None:
        cfg["variants"] = variants
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    name = os.path.basename(os.path.normpath(model_dir))
    ref.config.name_or_path = model_dir  # the plugins' calibration tokenizer: the model's own
    ppl_len = min(cfg["ppl_len"], ref.config.max_position_embeddings)
    heldout = token_stream(tok, "heldout", cfg["ppl_tokens"])
    records, rows = [], []

    def ppl(model):
        nll, n = sliding_window_nll(model, heldout, ppl_len, ppl_len)
        return math.exp(nll / n)

    dense_ppl = ppl(ref)
    params = {"max_length": ppl_len, "stride": ppl_len, "tokens": len(heldout) - 1, "split": "heldout"}
    records.append(make_record(name, "heldout_perplexity", dense_ppl, spec=None, params=params))
    rows.append({"variant": "dense", "ppl": dense_ppl, "s": round(time.time() - t0, 2)})
    print(f"dense ppl {dense_ppl:.3f}", flush=True)

    def measure(variant, model, spec, extra=None, reference=ref):
        p = ppl(model)
        rec = {"variant": variant, "spec": spec, "ppl": p, "rel_change": p / dense_ppl - 1, **(extra or {})}
        records.append(make_record(name, "heldout_perplexity", p, spec=spec, params=params))
        records.append(make_record(name, "heldout_perplexity_rel_change", p / dense_ppl - 1, spec=spec,
                                   params={**params, "reference_perplexity": dense_ppl}))
        try:
            ag = greedy_agreement(model, reference, tok, n_prompts=cfg["agree_prompts"], prompt_len=64,
                                  new_tokens=cfg["agree_new"], batch_size=cfg["agree_prompts"], spec=spec)
            records.extend(ag)
            rec.update({r["metric"]: r["value"] for r in ag})
        except Exception as e:
            rec["agreement_error"] = f"{type(e).__name__}: {e}"[:200]
        return rec

    for variant in cfg["variants"]:
        t = time.time()
        spec = spec_of(variant, cfg)
        try:
            if variant.endswith("_bf16"):
                if not str(device).startswith("cuda"):
                    raise RuntimeError("the bf16 sparse-kernel variant needs CUDA")
                base16 = copy.deepcopy(ref).to(torch.bfloat16)
                dense16 = ppl(base16)
                model = copy.deepcopy(base16)
                hf_accel.apply(model, spec)
                row = measure(variant, model, spec, {"dense_bf16_ppl": dense16}, reference=base16)
                from hf_accel.plugins.pruning.sparse24 import Sparse24Linear

                mods = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
                row["sparse_kernels"] = sum(m._sparse is not None for m in mods)
                row["sparse24_layers"] = len(mods)
                row["sparse_error"] = next((m._sparse_error for m in mods if m._sparse_error), None)
                row["rel_change_vs_bf16"] = row["ppl"] / dense16 - 1
                del base16
            else:
                model = copy.deepcopy(ref)
                hf_accel.apply(model, spec)
                row = measure(variant, model, spec)
            del model
        except Exception as e:
            row = {"variant": variant, "spec": spec, "error": f"{type(e).__name__}: {e}"[:300],
                   "trace": traceback.format_exc()[-600:]}
        row["s"] = round(time.time() - t, 2)
        rows.append(row)
        print(f"{variant:22s} " + (f"ppl {row['ppl']:.3f} ({row['rel_change']:+.1%})" if "ppl" in row else row["error"])
              + f"  {row['s']} s", flush=True)

    if structured:
        for ratio in cfg["ratios"]:
            t = time.time()
            spec = f"shrink(ratio={ratio}, samples={min(cfg['samples'], 32)}, seq_len={cfg['seq_len']}, progress=false)"
            try:
                model = copy.deepcopy(ref)
                hf_accel.apply(model, spec)
                shape = {"intermediate_size": model.config.intermediate_size,
                         "num_key_value_heads": model.config.num_key_value_heads,
                         "params": sum(p.numel() for p in model.parameters())}
                row = measure(f"shrink_{ratio}", model, spec, shape)
                rec = recover_lora(model, tok, steps=cfg["recover_steps"], batch_size=cfg["recover_batch"],
                                   seq_len=cfg["recover_seq"], lr=1e-3 if smoke else 3e-4, progress=False)
                after = measure(f"shrink_{ratio}_lora", model, spec + "+recover_lora", {**shape, "recovery": rec})
                rows.append(row)
                row = after
                del model
            except Exception as e:
                row = {"variant": f"shrink_{ratio}", "spec": spec, "error": f"{type(e).__name__}: {e}"[:300],
                       "trace": traceback.format_exc()[-600:]}
            row["s"] = round(time.time() - t, 2)
            rows.append(row)
            print(f"shrink {ratio}: " + (f"ppl {rows[-2].get('ppl', float('nan')):.3f} -> after LoRA {row['ppl']:.3f}"
                                         if "ppl" in row else row["error"]) + f"  {row['s']} s", flush=True)

    summary = summarize(rows, dense_ppl)
    summary.update(model=model_dir, device=str(device), gpu=torch.cuda.get_device_name() if torch.cuda.is_available()
                   and str(device).startswith("cuda") else "cpu", versions=versions(),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command="python " + " ".join(sys.argv), smoke=smoke, time_s=round(time.time() - t0, 1),
                   settings={k: v for k, v in cfg.items() if k != "variants"})
    result = {"summary": summary, "rows": rows, "records": records}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return result


def summarize(rows, dense_ppl) -> dict:
    s = {"dense_ppl": round(dense_ppl, 4)}
    by = {r["variant"]: r for r in rows if "ppl" in r}
    for v, r in by.items():
        if v == "dense":
            continue
        key = v.replace(":", "_").replace("%", "pct").replace(".", "")
        s[f"ppl_{key}"] = round(r["ppl"], 4)
        s[f"rel_change_{key}"] = round(r["rel_change"], 4)
        if "greedy_identical_fraction" in r:
            s[f"greedy_identical_{key}"] = r["greedy_identical_fraction"]
    for p in ("50%", "2:4", "4:8"):
        m, w, g = (by.get(f"{x}_{p}") for x in ("magnitude", "wanda", "sparsegpt"))
        key = p.replace(":", "_").replace("%", "pct")
        if m and g:
            s[f"sparsegpt_beats_magnitude_{key}"] = g["ppl"] < m["ppl"]
        if m and w:
            s[f"wanda_beats_magnitude_{key}"] = w["ppl"] < m["ppl"]
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="reference model folder (e.g. $R/base)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="small sizes (CPU, tiny): < 1 minute")
    ap.add_argument("--no-structured", action="store_true")
    args = ap.parse_args()
    res = run(args.model, args.device, args.smoke, structured=not args.no_structured, out=args.out)
    print(f"\nwrote {args.out} in {res['summary']['time_s']} s")
    print(f"{'variant':24s} {'ppl':>9s} {'change':>8s} {'greedy=':>8s}")
    for r in res["rows"]:
        if "ppl" in r:
            print(f"{r['variant']:24s} {r['ppl']:9.3f} {r.get('rel_change', 0):+8.1%} "
                  f"{r.get('greedy_identical_fraction', float('nan')):8.2f}")
        else:
            print(f"{r['variant']:24s} ERROR {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
