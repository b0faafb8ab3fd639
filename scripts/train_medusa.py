"""Train Medusa-1 heads on the reference corpus with the base frozen, and save them as their own artifact.

    python scripts/train_medusa.py --model hf_accel/quality/assets/tiny --out out/medusa-tiny --heads 3 --steps 200
    python scripts/train_medusa.py --model DIR --out DIR --push me/base-medusa   # also upload (hub helper)

Then: AutoModelForCausalLM.from_pretrained(DIR, accel="medusa(heads='out/medusa-tiny')").
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_accel.plugins.speculative.medusa import push_heads, save_heads, train_medusa


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model folder or Hub id (kept frozen)")
    ap.add_argument("--out", required=True, help="output folder for the heads artifact")
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--push", default=None, help="Hub repo id to upload the heads to")
    args = ap.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.time()
    heads, losses = train_medusa(model, tok, heads=args.heads, steps=args.steps, seq_len=args.seq_len,
                                 batch=args.batch, lr=args.lr, progress=True)
    training = {"steps": args.steps, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr,
                "corpus": "hf_accel.quality token_stream(split='train')", "first_loss": losses[0],
                "final_loss": sum(losses[-10:]) / len(losses[-10:]), "seconds": round(time.time() - t0, 1),
                "command": "python scripts/train_medusa.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    save_heads(heads, args.out, base_model=args.model, training=training)
    print(json.dumps(training, indent=2))
    if args.push:
        push_heads(args.out, args.push)


if __name__ == "__main__":
    main()
