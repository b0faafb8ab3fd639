"""Greedy equivalence of every speculative method with the target alone, on >= 1,000 prompts (issue 7), fp32 CPU.

    python scripts/spec_equivalence.py --out benchmarks/results/spec_equivalence.json            # 1,000 prompts
    python scripts/spec_equivalence.py --prompts 40 --out /tmp/spec_eq.json                       # quick

Target: the trained `tiny` reference (hf_accel/quality/assets/tiny), fp32. Prompts: held-out corpus text (the
reference split, never trained on), in generate() calls of a random batch size (1-4, left-padded, rows of
different lengths 4-160 tokens) and a random number of new tokens (1-48); the same calls for every method. Each
method's output must equal `target.generate(...)` token for token (greedy, every row, pads included).

Drafts: `draft` uses a 2-layer model trained for a few hundred steps on the same corpus (this script trains it,
deterministic, ~1-2 min on 2 CPU cores; it agrees with the target often but not always, so rejections and
per-row rollback happen); `selfdraft` the target's int8 copy; Medusa heads trained with the base frozen
(`train_medusa`, a few hundred steps). Methods run eagerly and on the fast runtime (`fast+...`: per-row runtime
sessions; CPU, no compile and no CUDA graphs).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_accel
from hf_accel.quality.corpus import token_stream
from hf_accel.quality.reference import reference_path

METHODS = {
    "draft": "draft(draft='{draft}', k=4)",
    "draft_adaptive": "draft(draft='{draft}', k=6, adaptive=True)",
    "selfdraft": "selfdraft(k=3)",
    "lookup": "lookup(k=4)",
    "recycle": "recycle(k=3)",
    "medusa": "medusa(heads='{heads}')",
    "fast+draft": "fast+draft(draft='{draft}', k=4)",
    "fast+lookup": "fast+lookup(k=4)",
    "fast+recycle": "fast+recycle(k=3)",
    "fast+medusa": "fast+medusa(heads='{heads}')",
}


def train_draft(target, tokenizer, out: Path, steps: int, seed: int = 0) -> Path:
    """A 2-layer copy of the target's config (embeddings and head initialised from the target), trained on the
    reference corpus's train split: a draft that predicts the target's next token often, not always."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = 2
    torch.manual_seed(seed)
    draft = type(target)(config)
    draft.model.embed_tokens.weight.data.copy_(target.model.embed_tokens.weight.data)
    if not config.tie_word_embeddings:
        draft.lm_head.weight.data.copy_(target.lm_head.weight.data)
    ids = token_stream(tokenizer, "train", 400_000)
    opt = torch.optim.AdamW(draft.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    draft.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 129, (16,), generator=g)
        batch = torch.stack([ids[s: s + 129] for s in starts])
        with torch.no_grad():  # distil: the draft learns the target's greedy choices
            labels = target(batch[:, :-1]).logits.argmax(-1)
        loss = torch.nn.functional.cross_entropy(draft(batch[:, :-1]).logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    draft.eval()
    draft.save_pretrained(out)
    return out


def train_heads(target, tokenizer, out: Path, steps: int) -> Path:
    from hf_accel.plugins.speculative.medusa import save_heads, train_medusa

    heads, _ = train_medusa(target, tokenizer, heads=3, steps=steps, seq_len=128, batch=8, lr=1e-3)
    save_heads(heads, out)
    return out


def calls(tokenizer, n_prompts: int, seed: int = 0) -> list[dict]:
    """generate() kwargs covering n_prompts rows: random batch 1-4, lengths 4-160, new tokens 1-48."""
    ids = token_stream(tokenizer, "heldout", 400_000)
    rng = random.Random(seed)
    out, used = [], 0
    while used < n_prompts:
        batch = min(rng.randint(1, 4), n_prompts - used)
        lengths = [rng.randint(4, 160) for _ in range(batch)]
        t = max(lengths)
        input_ids = torch.zeros(batch, t, dtype=torch.long)
        mask = torch.zeros(batch, t, dtype=torch.long)
        for b, n in enumerate(lengths):
            s = rng.randrange(0, len(ids) - n)
            input_ids[b, t - n:] = ids[s: s + n]
            mask[b, t - n:] = 1
        out.append(dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=rng.randint(1, 48),
                        do_sample=False, pad_token_id=0))
        used += batch
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--draft-steps", type=int, default=300)
    ap.add_argument("--medusa-steps", type=int, default=200)
    ap.add_argument("--work", default="/tmp/spec_equivalence")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    path = reference_path("tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    paths = {}
    if any("draft" in m and "self" not in m for m in methods):
        paths["draft"] = train_draft(target, tokenizer, work / "draft", args.draft_steps)
    if any("medusa" in m for m in methods):
        paths["heads"] = train_heads(target, tokenizer, work / "heads", args.medusa_steps)
    setup_s = time.time() - t0
    todo = calls(tokenizer, args.prompts)
    refs = [target.generate(**kw) for kw in todo]
    rows = []
    for name in methods:
        model = copy.deepcopy(target)
        hf_accel.apply(model, METHODS[name].format(**paths))
        identical = prompts = rounds = generated = accepted = 0
        fallbacks, first_mismatch, started = set(), None, time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, (kw, ref) in enumerate(zip(todo, refs)):
                out = model.generate(**kw)
                same = out.shape == ref.shape and (out == ref).all(1)
                identical += int(same.sum()) if out.shape == ref.shape else 0
                prompts += ref.shape[0]
                if first_mismatch is None and not bool(torch.as_tensor(same).all()):
                    first_mismatch = i
                stats = model.hf_accel_spec_stats
                if "fallback" in stats:
                    fallbacks.add(stats["fallback"])
                rounds += stats.get("row_rounds", 0)
                generated += stats.get("generated", 0)
                accepted += stats.get("accepted", 0)
        rows.append(dict(method=name, spec=METHODS[name].format(**paths), prompts=prompts, calls=len(todo),
                         identical_rows=identical, all_identical=identical == prompts,
                         first_mismatching_call=first_mismatch, tokens_per_verify=round(generated / max(rounds, 1), 3),
                         mean_accepted=round(accepted / max(rounds, 1), 3), fallbacks=sorted(fallbacks),
                         warnings=sorted({str(w.message)[:200] for w in caught}), wall_s=round(time.time() - started, 1)))
        print(f"{name:16s} {identical}/{prompts} identical  tokens/verify {rows[-1]['tokens_per_verify']:.2f}  "
              f"{rows[-1]['wall_s']:.0f}s", flush=True)
        hf_accel.remove(model)
    summary = {"prompts": args.prompts, "calls": len(todo),
               "all_methods_identical": all(r["all_identical"] for r in rows)}
    for r in rows:
        key = r["method"].replace("+", "_")
        summary[f"{key}_identical_fraction"] = round(r["identical_rows"] / max(r["prompts"], 1), 4)
        summary[f"{key}_tokens_per_verify"] = r["tokens_per_verify"]
    import transformers

    summary.update(target="tiny reference (trained, fp32)", device="cpu", setup_s=round(setup_s, 1),
                   wall_s=round(time.time() - t0, 1),
                   versions={"python": platform.python_version(), "torch": torch.__version__,
                             "transformers": transformers.__version__, "hf_accel": hf_accel.__version__},
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary["all_methods_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
