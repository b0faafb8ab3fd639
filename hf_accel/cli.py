"""`hf-accel`: list plugins, optimize a model into an artifact, push it, (re)render its card, benchmark it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm


def _cmd_list(args) -> int:
    from . import options as opts
    from .registry import registry

    infos = registry.infos()
    if args.json:
        print(json.dumps([{"name": i.name, "family": i.cls.family.value, "distribution": i.distribution,
                           "version": i.version, "options": opts.describe_options(i.cls), "summary": i.cls.summary()}
                          for i in infos], indent=2))
        return 0
    for i in infos:
        print(f"{i.name:<16} {i.cls.family.value:<16} {i.distribution} {i.version}")
        print(f"    {i.cls.summary()}")
        print(f"    options: {opts.describe_options(i.cls)}")
    for name, error in sorted(registry.broken.items()):
        print(f"{name:<16} BROKEN           {error}")
    return 0


def _is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _load(model_id: str, accel, dtype: str | None, device: str | None):
    import torch

    kwargs = {}
    if dtype:
        kwargs["dtype" if not _is_diffusers_folder(model_id) else "torch_dtype"] = getattr(torch, dtype)
    if _is_diffusers_folder(model_id):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model_id, accel=accel, **kwargs)
        return (pipe.to(device) if device else pipe), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_id, accel=accel, device_map=device, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except Exception:
        tokenizer = None
    return model, tokenizer


def _cmd_optimize(args) -> int:
    from .config import AccelConfig

    spec = AccelConfig.from_spec(args.accel)  # fail on a bad spec before loading anything
    steps = tqdm(total=3, desc="hf-accel optimize", unit="step")
    steps.set_postfix_str(f"loading {args.model} with {spec}")
    model, tokenizer = _load(args.model, spec, args.dtype, args.device)
    steps.update()
    out = Path(args.out)
    steps.set_postfix_str(f"saving to {out}")
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    steps.update()
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    print(f"saved {spec} artifact to {out} (card: {out / 'README.md'})")
    return 0


def _cmd_push(args) -> int:
    from .artifacts import push_folder, read_spec

    if read_spec(args.dir) is None and not _is_diffusers_folder(args.dir):
        print(f"error: {args.dir} is not an hf_accel artifact (no hf_accel quantization_config in config.json)", file=sys.stderr)
        return 2
    info = push_folder(args.dir, args.repo, private=args.private, revision=args.revision)
    print(f"pushed {args.dir} to {args.repo}: {getattr(info, 'commit_url', info)}")
    return 0


def _cmd_card(args) -> int:
    from .card import render_card

    card = render_card(None, args.dir, repo_id=args.repo_id)
    card.save(Path(args.dir) / "README.md")
    print(f"wrote {Path(args.dir) / 'README.md'}")
    return 0


def _cmd_bench(args) -> int:
    from .runtime.bench import bench_model, format_table

    rows = bench_model(args.model, args.accel, batch_sizes=args.batch, prompt_lengths=args.prompt, new_tokens=args.new_tokens,
                       dtype=args.dtype, device=args.device)
    print(format_table(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run

    run(spec=args.accel, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-accel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="installed plugins, families, options with defaults")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_list)

    p = sub.add_parser("optimize", help="load MODEL, apply --accel, save an artifact with its card to --out")
    p.add_argument("model")
    p.add_argument("--accel", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device")
    p.set_defaults(fn=_cmd_optimize)

    p = sub.add_parser("push", help="upload an artifact folder to a Hub repo")
    p.add_argument("dir")
    p.add_argument("repo")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision")
    p.set_defaults(fn=_cmd_push)

    p = sub.add_parser("card", help="render (or refresh) the model card of an artifact folder")
    p.add_argument("dir")
    p.add_argument("--repo-id")
    p.set_defaults(fn=_cmd_card)

    p = sub.add_parser("demo", help="accelerate the built-in tiny model and show memory, speed and output before/after")
    p.add_argument("--accel", default="int8")
    p.add_argument("--device")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("bench", help="decode speed, time to first token and memory of MODEL with and without --accel")
    p.add_argument("model")
    p.add_argument("--accel", default="fast")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt", type=int, nargs="+", default=[128])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json-out")
    p.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    import hf_accel  # noqa: F401  (installs the integrations)
    from .errors import AccelError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AccelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
