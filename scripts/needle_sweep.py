#!/usr/bin/env python
"""Small CPU experiments on how the reference models learn needle retrieval (issue 3).

Trains a preset of scripts/build_reference.py (default `tiny`, with any field overridden) with the same `train()`,
the same needle rows and the same tokenizer family, and measures `needle_recall` at the trained context (and
optionally during training). One JSON line per run is appended to --out.

    python scripts/needle_sweep.py --name c128_nf1_aw0.5_1200 --context 128 --steps 1200 --needle-fraction 1.0 \\
        --max-needles 2 --needle-edge-prob 0.2 --answer-weight 0.5 --eval-every 300 --threads 1

Results (tiny architecture, batch 16, 2 shared CPU cores, ~20 min each): see the answer_weight comment
in scripts/build_reference.py. The answer-loss curve (printed, and in the JSON line) shows whether the retrieval
circuit formed: ~3.5 nats while the model guesses the value's characters, falling towards 0 once it copies them.

The tokenizer is the shipped tiny reference's (vocab 4096, trained on the stdlib train split), so no tokenizer is
trained here; the train stream is cached in --cache.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import build_reference as br  # noqa: E402
from hf_accel.quality import corpus as corpus_mod  # noqa: E402
from hf_accel.quality import needle as needle_mod  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "hf_accel" / "quality" / "assets" / "tiny"

# preset field -> CLI flag (type from the dataclass)
OVERRIDES = ("hidden", "layers", "heads", "kv_heads", "ffn", "context", "batch", "lr", "warmup", "needle_fraction",
             "max_needles", "needle_edge_prob", "answer_weight")


@functools.lru_cache(maxsize=4)
def _cached_heldout(tokenizer, split, max_tokens=None, extra_packages=()):
    return corpus_mod.token_stream(tokenizer, split, max_tokens, extra_packages)


def recall(model, tok, ctx: int, n: int, dtype=torch.float32) -> dict:
    was_training = model.training
    model.eval()
    m = model if dtype == torch.float32 else model.to(dtype)
    try:
        r = needle_mod.needle_recall(m, tok, context_len=ctx, n_per_depth=n, batch_size=10)
    finally:
        model.to(torch.float32)
        model.train(was_training)
    return {"recall": r["value"], "by_depth": r["params"]["by_depth"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--preset", default="tiny", choices=sorted(br.PRESETS))
    fields = {f.name: f for f in dataclasses.fields(br.Preset)}
    for name in OVERRIDES:
        if name in fields:
            kind = {"int": int, "float": float}[str(fields[name].type)]
            ap.add_argument("--" + name.replace("_", "-"), type=kind)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=10, help="needles per depth (5 depths) in the final evaluation")
    ap.add_argument("--eval-every", type=int, default=0, help="also measure recall (2 per depth) every N steps")
    ap.add_argument("--bf16-eval", action="store_true", help="also measure the final recall with bf16 weights")
    ap.add_argument("--save", type=Path, help="save the trained model (save_pretrained) here")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/needle_sweep_cache"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/needle_sweep.jsonl"))
    args = ap.parse_args(argv)
    command = shlex.join(["python", "scripts/needle_sweep.py", *(argv if argv is not None else sys.argv[1:])])

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    changes = {k: getattr(args, k) for k in OVERRIDES if k in fields and getattr(args, k) is not None}
    p = dataclasses.replace(br.PRESETS[args.preset], **changes)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    args.cache.mkdir(parents=True, exist_ok=True)
    cached = args.cache / "train_stream_tiny_tokenizer.pt"
    if cached.exists():
        stream = torch.load(cached)
    else:
        stream = corpus_mod.token_stream(tok, "train")
        torch.save(stream, cached)
    needle_mod.token_stream = _cached_heldout  # the evaluation re-tokenizes its held-out stream on every call

    model = br.make_model(p, tok)
    n_params = sum(w.numel() for w in model.parameters())
    progress = []

    def on_step(step, total):
        if args.eval_every and step % args.eval_every == 0 and step < total:
            progress.append((step, recall(model, tok, p.context, 2)["recall"]))
            print(f"[{args.name}] step {step}: recall {progress[-1][1]:.2f}", file=sys.stderr, flush=True)

    targs = argparse.Namespace(device="cpu", compile=False, steps=args.steps, minutes=None, seed=args.seed,
                               model=args.name)
    t0 = time.time()
    stats = br.train(model, p, stream, tok, targs, on_step=on_step)
    train_s = time.time() - t0
    if args.save:
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)
    final = recall(model, tok, p.context, args.eval_n)
    row = {"name": args.name, "command": command, "preset": dataclasses.asdict(p), "params": n_params,
           "steps": args.steps, "seed": args.seed, "train_s": round(train_s, 1), "train": stats,
           "recall": final["recall"], "by_depth": final["by_depth"], "progress": progress}
    if args.bf16_eval:
        row["recall_bf16"] = recall(model, tok, p.context, args.eval_n, torch.bfloat16)["recall"]
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("name", "recall", "by_depth", "train_s")} |
                     {"loss": stats["curve"][-1], "answer_curve": stats["answer_curve"],
                      "recall_bf16": row.get("recall_bf16"), "progress": progress}))


if __name__ == "__main__":
    main()
