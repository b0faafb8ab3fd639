#!/usr/bin/env python
"""Speculative decoding plugins on the GPU: tokens/s and mean accepted length, batch 1 and 8.

    python scripts/bench_spec.py                 # one H100: about 6 minutes, everything built inside the run
    python scripts/bench_spec.py --smoke         # CPU, random tiny models: checks the script end to end
    python scripts/bench_spec.py --target DIR --draft DIR --methods fast,fast+draft,fast+medusa --skip-8b

Writes benchmarks/results/bench_spec.json: raw rows plus a `summary`.

1. Models. A target and a draft with the same tokenizer. If the reference models `small` and `draft` are built
   (`scripts/build_reference.py`, under $HF_ACCEL_HOME/reference), they are used. Otherwise (the GPU machine starts
   empty and those builds take longer than this benchmark may) the pair is trained here with build_reference.py's own
   recipe (`make_model`, `train`): the `small` preset as target and a 2-layer version of the `draft` preset, on the
   Python stdlib with the `tiny` reference tokenizer, for --train-minutes each, at context 512.
2. Decoding (bf16, greedy, 128 new tokens per row, EOS disabled so every run produces the same number of tokens;
   left-padded prompts of different lengths from the held-out split): transformers' generate, `fast` (if
   hf_accel.runtime exists), transformers' assisted generation and prompt lookup (batch 1 only: at batch 8 they raise,
   and the message is recorded), and the hf_accel plugins draft, draft(adaptive), selfdraft, lookup, recycle.
   Last (they compile and capture on the GPU, within --budget-s): `fast` alone and the same plugins on the fast
   runtime (`fast+draft`, `fast+selfdraft`, `fast+lookup`, `fast+recycle`: static cache, per-row slots, CUDA
   graphs; the row's `runtime` says the loop really ran there), and `fast+medusa` / `fast+medusa_wide` (Medusa
   heads, the default sparse tree / a 44-node tree '4,2,2,1', verified as one tree forward on the runtime). The
   heads are `--medusa DIR`, or trained here on the frozen target (`train_medusa`, --medusa-heads heads, at most
   --medusa-steps steps of --medusa-batch x --medusa-seq-len tokens and --medusa-seconds; `models.medusa` records
   what ran). Rows and summary give speedups against transformers and against `fast`
   (`<method>_bs<b>_speedup_vs_fast`, `best_speedup_vs_fast_bs<b>`). `--methods a,b,...` times only the named
   rows (any of transformers, hf_assisted, hf_prompt_lookup, the plugin names above, `medusa` (eager, only when
   named), fast, fast+...), the fast ones per batch in the order given; transformers' output is still computed
   once as the reference.
   `identical_rows` says how many rows equal transformers' output (bf16 verify of k+1 tokens may round differently
   from one-token decoding, so a rare late divergence is numerics, not a bug; the fp32 CPU tests are exact).
3. The 8B shape (Llama-3-8B config, random bf16 weights, 1024-token context): milliseconds of one decode step vs
   one verify forward of k+1 tokens, both on the fast runtime's per-row session as CUDA graphs (what `fast+draft`
   runs), batch 1 and 8, and one step of a random 1B-shape draft the same way; with the acceptance measured in 2., the speedup that a draft of that acceptance would give at 8B.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_accel
from hf_accel.quality.records import current_command, versions

ROOT = Path(__file__).resolve().parent.parent
METHODS = {  # name -> spec (the draft path is filled in)
    "draft": "draft(draft='{draft}', k=4)",
    "draft_adaptive": "draft(draft='{draft}', k=8, adaptive=True)",
    "selfdraft": "selfdraft(k=4)",
    "lookup": "lookup(k=8)",
    "recycle": "recycle(k=4)",
}
EXTRA_METHODS = {  # timed only when named in --methods
    "medusa": "medusa(heads='{medusa}')",
}
FAST_METHODS = {  # the same loop on the fast runtime's sessions (plugins/speculative/backends.py)
    "fast+draft": "fast+draft(draft='{draft}', k=4)",
    # the 2026-12-01 H200 run accepted 3.96 of k=4 drafts per round at batch 1: the draft length, not the draft, capped it
    "fast+draft_k8": "fast+draft(draft='{draft}', k=8)",
    "fast+draft_adaptive": "fast+draft(draft='{draft}', k=12, adaptive=True)",
    "fast+selfdraft": "fast+selfdraft(k=4)",
    "fast+lookup": "fast+lookup(k=8)",
    "fast+recycle": "fast+recycle(k=4)",
    "fast+medusa": "fast+medusa(heads='{medusa}')",
    "fast+medusa_wide": "fast+medusa(heads='{medusa}', tree='4,2,2,1')",
}
BASELINES = ("transformers", "hf_assisted", "hf_prompt_lookup", "fast")


def selected_methods(methods: str | None) -> list[str]:
    """The row names --methods asks for (default: every row but EXTRA_METHODS)."""
    known = [*BASELINES, *METHODS, *EXTRA_METHODS, *FAST_METHODS]
    if methods is None:
        return [m for m in known if m not in EXTRA_METHODS]
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {','.join(known)}")
    return names


# ------------------------------------------------------------------------------------------------ models
def load_build_reference():
    spec = importlib.util.spec_from_file_location("build_reference", ROOT / "scripts" / "build_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def tokenizer_for_training():
    from hf_accel.quality import iter_texts, train_tokenizer
    from hf_accel.quality.reference import reference_path

    try:
        return AutoTokenizer.from_pretrained(reference_path("tiny")), "tiny reference tokenizer"
    except OSError:
        return train_tokenizer(iter_texts("train"), 4096), "BPE 4096 trained on the stdlib here"


def train_pair(out: Path, minutes: float, device: str, max_tokens: int, steps: int | None = None) -> dict:
    """Target (`small` preset) and draft (`draft` preset, 2 layers), build_reference.py's recipe, shorter."""
    from hf_accel.quality import token_stream

    br = load_build_reference()
    t0 = time.time()
    tokenizer, tok_note = tokenizer_for_training()
    stream = token_stream(tokenizer, "train", max_tokens)
    info = {"tokenizer": tok_note, "train_tokens": len(stream), "tokenize_s": round(time.time() - t0, 1)}
    for name, preset in (("target", dataclasses.replace(br.PRESETS["small"], context=512, batch=64)),
                         ("draft", dataclasses.replace(br.PRESETS["draft"], layers=2, context=512, batch=64))):
        torch.manual_seed(0)
        model = br.make_model(preset, tokenizer).to(device)
        args = argparse.Namespace(device=device, compile=False, minutes=minutes, steps=steps, seed=0, model=name)
        stats = br.train(model, preset, stream, tokenizer, args)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        info[name] = {"preset": dataclasses.asdict(preset), "params": sum(p.numel() for p in model.parameters()),
                      "steps": stats["steps"], "seconds": stats["seconds"], "final_loss": stats["curve"][-1]
                      if stats.get("curve") else None}
        del model
    return info


def get_models(args, work: Path):
    if args.smoke:  # random tiny models; the tokenizer is not needed
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(work / "target")
        config.num_hidden_layers = 1
        LlamaForCausalLM(config).save_pretrained(work / "draft")
        return work / "target", work / "draft", {"source": "random tiny models (--smoke)"}
    if args.target and args.draft:
        return Path(args.target), Path(args.draft), {"source": "given"}
    from hf_accel.quality.reference import ReferenceModelMissing, reference_path

    try:
        return reference_path("small"), reference_path("draft"), {"source": "reference models small + draft"}
    except ReferenceModelMissing:
        info = train_pair(work, args.train_minutes, args.device, args.train_tokens, args.train_steps)
        info["source"] = (f"trained here with build_reference.py's recipe, {args.train_minutes} min each "
                          "(reference small/draft not built on this machine)")
        return work / "target", work / "draft", info


def prompts(args, tokenizer_dir: Path, batch: int, vocab: int, device):
    """`batch` left-padded prompts of different lengths (48..128 tokens)."""
    lengths = [48 + (80 * i) // max(batch - 1, 1) for i in range(batch)]
    if args.smoke:
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    else:
        from hf_accel.quality.agreement import heldout_prompts

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        full = heldout_prompts(tok, batch, max(lengths))
        rows = [full[i, -n:] for i, n in enumerate(lengths)]
    t = max(lengths)
    ids = torch.zeros(batch, t, dtype=torch.long)
    mask = torch.zeros(batch, t, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, t - len(row):] = row
        mask[i, t - len(row):] = 1
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------ timing
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int):
    fn()  # warm-up (allocations, kernels, compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def decode_row(name, batch, seconds, out, ref, prompt_len, new_tokens, stats=None, **extra):
    row = {"method": name, "batch": batch, "seconds": round(seconds, 4),
           "tokens_per_s": round(batch * new_tokens / seconds, 1),
           "identical_rows": None if ref is None else int((out == ref).all(1).sum()),
           "first_divergence": None if ref is None else _first_divergence(out, ref, prompt_len)}
    if stats:
        row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()
                    if k in ("mean_accepted", "tokens_per_verify", "acceptance_rate", "rounds", "fallback",
                             "runtime")})
        if "draft_lengths" in stats:
            row["mean_draft_length"] = round(sum(stats["draft_lengths"]) / max(len(stats["draft_lengths"]), 1), 2)
    row.update(extra)
    return row


def _first_divergence(out, ref, prompt_len):
    if out.shape != ref.shape:
        return "shape"
    diff = (out[:, prompt_len:] != ref[:, prompt_len:])
    return None if not diff.any() else int(diff.long().argmax(1)[diff.any(1)].min())


def medusa_heads(args, target, target_dir, work: Path) -> tuple[Path, dict]:
    """--medusa, or heads trained here on the frozen target (train_medusa on the held-in corpus, time-capped)."""
    if args.medusa:
        return Path(args.medusa), {"source": "given", "path": args.medusa}
    from hf_accel.plugins.speculative.medusa import save_heads, train_medusa

    t0 = time.time()
    if args.smoke:
        stream = torch.randint(3, target.config.vocab_size, (20_000,), generator=torch.Generator().manual_seed(0))
        note = "random tokens (--smoke)"
    else:
        from hf_accel.quality import token_stream

        stream = token_stream(AutoTokenizer.from_pretrained(target_dir), "train", args.medusa_tokens)
        note = f"train split, {len(stream)} tokens"
    tokenize_s = time.time() - t0
    sync(args.device)
    t1 = time.time()
    torch.manual_seed(0)
    heads, losses = train_medusa(target, stream=stream, heads=args.medusa_heads, steps=args.medusa_steps,
                                 seq_len=args.medusa_seq_len, batch=args.medusa_batch, lr=args.medusa_lr,
                                 max_seconds=args.medusa_seconds)
    sync(args.device)
    train_s = time.time() - t1
    info = {"source": "trained here (frozen target)", "data": note, "heads": args.medusa_heads,
            "steps": len(losses), "max_steps": args.medusa_steps, "batch": args.medusa_batch,
            "seq_len": args.medusa_seq_len, "lr": args.medusa_lr, "train_s": round(train_s, 1),
            "tokenize_s": round(tokenize_s, 1), "first_loss": round(losses[0], 3),
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 3)}
    path = save_heads(heads, work / "medusa", base_model=str(target_dir), training=info)
    del heads
    print(f"medusa heads: {info}", file=sys.stderr)
    return path, info


def bench_decoding(args, target_dir, draft_dir, device, dtype):
    """Rows for transformers, its batch-1 speculative modes and every selected hf_accel method (eager ones; the
    fast ones run in main); returns (rows, context)."""
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dtype).to(device).eval()
    for m in (target, draft):
        m.generation_config.eos_token_id = None  # fixed-length runs: every method produces the same token count
        m.generation_config.pad_token_id = 0
    chosen = args.methods
    paths = {"draft": draft_dir, "medusa": None}
    sizes = {"target_params": sum(p.numel() for p in target.parameters()),
             "draft_params": sum(p.numel() for p in draft.parameters())}
    if any("{medusa}" in {**METHODS, **EXTRA_METHODS, **FAST_METHODS}.get(m, "") for m in chosen):
        paths["medusa"], sizes["medusa"] = medusa_heads(args, target, target_dir, args.work)
    new = args.new_tokens
    rows, runs = [], {}
    for batch in args.batches:
        ids, mask = prompts(args, target_dir, batch, target.config.vocab_size, device)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        t = ids.shape[1]
        if "transformers" in chosen:
            ref, sec = timed(lambda: target.generate(**kw), device, args.repeats)
            rows.append(decode_row("transformers", batch, sec, ref, None, t, new))
        else:  # the reference output only
            ref, sec = target.generate(**kw), None
        runs[batch] = (kw, ref, t, sec)
        for name, extra in (("hf_assisted", {"assistant_model": draft}),
                            ("hf_prompt_lookup", {"prompt_lookup_num_tokens": 8})):
            if name not in chosen:
                continue
            try:
                out, sec = timed(lambda: target.generate(**kw, **extra), device, args.repeats)
                rows.append(decode_row(name, batch, sec, out, ref, t, new))
            except ValueError as e:  # batch > 1: "assisted generate is only supported for batch_size = 1"
                rows.append({"method": name, "batch": batch, "refused": str(e)})
        for name, spec in {**METHODS, **EXTRA_METHODS}.items():
            if name in chosen:
                rows.append(with_spec(target, spec.format(**paths), name, batch, runs[batch], new, device,
                                      args.repeats))
        for row in rows:
            print(f"  {row}", file=sys.stderr) if row.get("batch") == batch else None
    return rows, (target, runs, sizes, paths)


def with_spec(model, spec, name, batch, run, new, device, repeats):
    kw, ref, t, base = run
    try:
        hf_accel.apply(model, spec)
        out, sec = timed(lambda: model.generate(**kw), device, repeats)
        stats = dict(getattr(model, "hf_accel_spec_stats", {}) or {})
        return decode_row(name, batch, sec, out, ref, t, new, stats, spec=spec)
    except Exception as e:  # one failing method must not cost the whole GPU run
        return {"method": name, "batch": batch, "spec": spec, "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        hf_accel.remove(model)


def add_speedups(rows) -> None:
    for baseline in ("transformers", "fast"):
        base = {r["batch"]: r["seconds"] for r in rows if r.get("method") == baseline and "seconds" in r}
        for row in rows:
            if "seconds" in row and row.get("batch") in base and row["method"] != baseline:
                row[f"speedup_vs_{baseline}"] = round(base[row["batch"]] / row["seconds"], 3)


# ------------------------------------------------------------------------------------------------ 8B shape
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192)
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                  tie_word_embeddings=True)
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def random_model(shape: dict, device, dtype):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**shape)).eval()
    finally:
        torch.set_default_dtype(default)


@torch.no_grad()
def forward_ms(model, batch: int, context: int, qs, device, repeats: int) -> dict:
    """ms of one forward of q tokens per row on the fast runtime's per-row session (what the `fast+` speculative
    methods run: q=1 is a decode step, q=k+1 a verify), each a CUDA graph on CUDA (compile off, so every q is
    the same eager modules captured once; the ratio, not torch.compile's tuning, is what this measures)."""
    hf_accel.apply(model, "fast(compile=False)")
    try:
        from hf_accel.runtime import get_runtime

        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, context + max(qs)), generator=g).to(device)
        session, _ = get_runtime(model).start(ids[:, :context], torch.ones_like(ids[:, :context]),
                                              max_new_tokens=2 * max(qs), per_row=True)
        out = {}
        for q in qs:
            def step(q=q):
                session.forward(ids[:, context: context + q])
                session.rewind(q)  # keep the context length fixed across repeats
            _, sec = timed(step, device, repeats)
            out["decode_step_ms" if q == 1 else f"verify_{q}_ms"] = round(1000 * sec, 3)
        return out
    finally:
        hf_accel.remove(model)


def expected_tokens(alpha: float, k: int) -> float:
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def bench_8b(args, device, dtype, acceptance: dict) -> tuple[list, dict]:
    shape, draft_shape = (SMOKE_SHAPE, SMOKE_SHAPE) if args.smoke else (LLAMA3_8B, LLAMA32_1B)
    context, ks = (64, (2, 4)) if args.smoke else (1024, (2, 4, 8))
    qs = [1] + [k + 1 for k in ks]
    rows, summary = [], {}
    target = random_model(shape, device, dtype)
    for batch in args.batches:
        t = forward_ms(target, batch, context, qs, device, args.repeats_8b)
        rows.append({"part": "8b_shape_target", "batch": batch, "context": context, **t})
    del target
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    draft = random_model(draft_shape, device, dtype)
    for batch in args.batches:
        d = forward_ms(draft, batch, context, [1], device, args.repeats_8b)
        rows.append({"part": "1b_shape_draft", "batch": batch, "context": context, "decode_step_ms": d["decode_step_ms"]})
    del draft
    for batch in args.batches:
        t = next(r for r in rows if r["part"] == "8b_shape_target" and r["batch"] == batch)
        d = next(r for r in rows if r["part"] == "1b_shape_draft" and r["batch"] == batch)
        for k in ks:
            summary[f"verify_{k + 1}_over_decode_bs{batch}"] = round(t[f"verify_{k + 1}_ms"] / t["decode_step_ms"], 3)
        summary[f"draft_1b_over_target_8b_step_bs{batch}"] = round(d["decode_step_ms"] / t["decode_step_ms"], 3)
        alpha = acceptance.get(batch)
        if alpha is not None:  # what a 1B draft with the measured acceptance rate would give at 8B
            best = max(ks, key=lambda k: expected_tokens(alpha, k) * t["decode_step_ms"]
                       / (k * d["decode_step_ms"] + t[f"verify_{k + 1}_ms"]))
            cost = best * d["decode_step_ms"] + t[f"verify_{best + 1}_ms"]
            summary[f"projected_8b_draft_speedup_bs{batch}"] = round(
                expected_tokens(alpha, best) * t["decode_step_ms"] / cost, 3)
            summary[f"projected_8b_draft_k_bs{batch}"] = best
    return rows, summary


# ------------------------------------------------------------------------------------------------ main
def summarize(rows) -> tuple[dict, dict]:
    summary, acceptance = {}, {}
    for row in rows:
        if "tokens_per_s" not in row:
            if "refused" in row:
                summary[f"{row['method']}_bs{row['batch']}_refused"] = True
            continue
        key = f"{row['method']}_bs{row['batch']}"
        summary[f"{key}_tokens_per_s"] = row["tokens_per_s"]
        if "speedup_vs_transformers" in row:
            summary[f"{key}_speedup_vs_transformers"] = row["speedup_vs_transformers"]
        if "speedup_vs_fast" in row:
            summary[f"{key}_speedup_vs_fast"] = row["speedup_vs_fast"]
        if "mean_accepted" in row:
            summary[f"{key}_mean_accepted"] = row["mean_accepted"]
        if row["method"] == "draft" and row.get("acceptance_rate") is not None:
            acceptance[row["batch"]] = row["acceptance_rate"]
    spec_rows = [r for r in rows if r.get("method") in {**METHODS, **EXTRA_METHODS, **FAST_METHODS}
                 and ("speedup_vs_transformers" in r or "speedup_vs_fast" in r)]
    for batch in sorted({r["batch"] for r in spec_rows}):
        vs_hf = [r for r in spec_rows if r["batch"] == batch and "speedup_vs_transformers" in r]
        if vs_hf:
            best = max(vs_hf, key=lambda r: r["speedup_vs_transformers"])
            summary[f"best_method_bs{batch}"] = best["method"]
            summary[f"best_speedup_vs_transformers_bs{batch}"] = best["speedup_vs_transformers"]
        vs_fast = [r for r in spec_rows if r["batch"] == batch and "speedup_vs_fast" in r]
        if vs_fast:  # what speculative decoding adds on top of the plain fast runtime
            best = max(vs_fast, key=lambda r: r["speedup_vs_fast"])
            summary[f"best_method_vs_fast_bs{batch}"] = best["method"]
            summary[f"best_speedup_vs_fast_bs{batch}"] = best["speedup_vs_fast"]
    for batch in sorted({r["batch"] for r in spec_rows}):
        hf = [r for r in rows if r.get("method") in ("hf_assisted", "hf_prompt_lookup") and r["batch"] == batch
              and "tokens_per_s" in r]
        ours = [r for r in spec_rows if r["batch"] == batch]
        if hf and ours:
            summary[f"best_speedup_vs_best_hf_speculative_bs{batch}"] = round(
                max(r["tokens_per_s"] for r in ours) / max(r["tokens_per_s"] for r in hf), 3)
    return summary, acceptance


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_spec.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, random tiny models, few tokens")
    ap.add_argument("--target", help="target model dir (with --draft); default: reference small, else trained here")
    ap.add_argument("--draft")
    ap.add_argument("--train-minutes", type=float, default=1.0, help="per model, when the pair is trained here")
    ap.add_argument("--train-tokens", type=int, default=6_000_000, help="stdlib tokens to train on (caps tokenizing)")
    ap.add_argument("--train-steps", type=int, help="exact step count instead of --train-minutes (CPU dry runs)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/hf_accel_bench_spec"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--repeats-8b", type=int, default=10)
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--budget-s", type=float, default=360, help="skip `fast` if the run would exceed this")
    ap.add_argument("--methods", help="comma-separated rows to time (default: all but the eager medusa), e.g. "
                                      "fast,fast+draft,fast+lookup,fast+recycle,fast+medusa")
    ap.add_argument("--medusa", help="Medusa heads folder; default: trained here on the frozen target")
    ap.add_argument("--medusa-heads", type=int, default=4)
    ap.add_argument("--medusa-steps", type=int, default=3000, help="at most this many training steps")
    ap.add_argument("--medusa-seconds", type=float, default=60, help="and at most this much training time")
    ap.add_argument("--medusa-batch", type=int, default=16)
    ap.add_argument("--medusa-seq-len", type=int, default=256)
    ap.add_argument("--medusa-lr", type=float, default=1e-3)
    ap.add_argument("--medusa-tokens", type=int, default=2_000_000, help="train-split tokens the heads sample from")
    args = ap.parse_args(argv)
    args.methods = selected_methods(args.methods)
    args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.smoke:
        args.new_tokens, args.repeats, args.repeats_8b, args.batches = min(args.new_tokens, 24), 1, 2, [1, 4]
        args.medusa_steps, args.medusa_batch, args.medusa_seq_len = min(args.medusa_steps, 20), 4, 32
        torch.set_num_threads(1)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)

    target_dir, draft_dir, model_info = get_models(args, args.work)
    model_info["seconds"] = round(time.time() - started, 1)
    print(f"models: {model_info}", file=sys.stderr)
    rows, (target, runs, sizes, paths) = bench_decoding(args, target_dir, draft_dir, args.device, dtype)
    model_info.update(sizes)
    add_speedups(rows)
    summary = {}

    def write(stage: str) -> None:  # after every part, so a run cut short still leaves its numbers
        nonlocal summary
        summary, acceptance = summarize(rows)
        summary.update(summary_8b)
        v = versions()
        summary.update(gpu=v["device"], versions=v, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       command=current_command(), new_tokens=args.new_tokens, dtype=str(dtype).replace("torch.", ""),
                       seconds=round(time.time() - started, 1), completed=stage, skipped=skipped,
                       all_runs_done=stage == "all" and not skipped)  # `completed`: the last stage reached
        result = {"benchmark": "bench_spec", "models": model_info, "rows": rows, "summary": summary}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    summary_8b, skipped = {}, []
    write("decoding")
    if not args.skip_8b:
        _, acceptance = summarize(rows)
        rows_8b, summary_8b = bench_8b(args, args.device, dtype, acceptance)
        rows += rows_8b
        write("8b_shape")
    if importlib.util.find_spec("hf_accel.runtime") is not None:  # CPU (--smoke): eager, no compile, no graphs
        specs = {"fast": "fast", **FAST_METHODS}  # run in --methods' order (a run cut short keeps the first ones)
        fast_methods = {name: specs[name].format(**paths) for name in args.methods if name in specs}
        for batch, run in runs.items():
            for name, spec in fast_methods.items():
                spent = time.time() - started
                if args.device == "cuda" and spent > args.budget_s:  # each compiles and captures per batch bucket
                    skipped.append(f"{name} bs{batch}: {spent:.0f} s spent, over --budget-s {args.budget_s}")
                    continue
                rows.append(with_spec(target, spec, name, batch, run, args.new_tokens, args.device, args.repeats))
                print(f"  {rows[-1]}", file=sys.stderr)
                add_speedups(rows)
                write(f"{name}_bs{batch}")
        write("all")
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
