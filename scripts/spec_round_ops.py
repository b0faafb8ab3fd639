"""Host-side work per speculative round on the fast runtime, counted on the CPU: the eager tensor ops that run
between the replayed forwards (on a GPU each is a kernel launch plus Python: the overhead CUDA graphs do not
remove), and the forwards per round, with greedy drafting per step and with `Session.chain` (all k drafts of a
round in one call, one CUDA graph on the GPU).

    python scripts/spec_round_ops.py --out benchmarks/results/spec_round_ops.json

Counting: a TorchDispatchMode counts every aten op of a `generate()` call except those inside the session's
forwards (`Session._run`, what a CUDA graph replays; the prefill runs eagerly and is counted). Per round = (ops of a
64-token call - ops of an 8-token call) / (rounds of the first - rounds of the second), so the prompt's prefill
cancels. Target: the trained `tiny` reference (fp32); draft: its first layer with noise. This is a count, not a
time: the GPU time per op is not measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import hf_accel
from hf_accel.plugins.speculative.backends import SessionRows
from hf_accel.quality.reference import reference_path
from hf_accel.runtime import session as runtime_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_speculative import smaller_perturbed_copy  # noqa: E402


class OpCount(TorchDispatchMode):
    """Counts aten ops, except while `inside` is set (a session forward, replayed as one graph on the GPU)."""

    def __init__(self):
        super().__init__()
        self.ops, self.forwards, self.inside = 0, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting():
    counter, run = OpCount(), runtime_session.Session._run

    def counted_run(self, key, fn):
        def inner():
            counter.inside = True
            try:
                fn()
            finally:
                counter.inside = False

        counter.forwards += 1
        return run(self, key, inner)

    runtime_session.Session._run = counted_run
    try:
        with counter:
            yield counter
    finally:
        runtime_session.Session._run = run


@contextlib.contextmanager
def per_step_drafting():
    """The drafter's per-step loop: hide `SessionRows.chain` so that `ModelDrafter.propose` does not use it."""
    chain = SessionRows.chain
    del SessionRows.chain
    try:
        yield
    finally:
        SessionRows.chain = chain


def per_round(target, spec: str, prompt: torch.Tensor) -> dict:
    counts = []
    for new in (8, 64):
        model = copy.deepcopy(target)
        hf_accel.apply(model, spec)
        kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
        model.generate(**kw)  # first call: sessions and buffers
        with counting() as c:
            model.generate(**kw)
        counts.append((c.ops, c.forwards, model.hf_accel_spec_stats["rounds"], model.hf_accel_spec_stats["generated"]))
        hf_accel.remove(model)
    (o0, f0, r0, _), (o1, f1, r1, g1) = counts
    return dict(spec=spec, rounds=r1 - r0, eager_ops_per_round=round((o1 - o0) / (r1 - r0), 1),
                forwards_per_round=round((f1 - f0) / (r1 - r0), 2), tokens_per_round_64=round(g1 / counts[1][2], 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ks", default="2,4,8")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_pretrained(reference_path("tiny"), dtype=torch.float32).eval()
    prompt = torch.randint(3, 4000, (1, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        smaller_perturbed_copy(target, layers=1, noise=0.2).save_pretrained(tmp)
        for k in (int(x) for x in args.ks.split(",")):
            spec = f"fast+draft(draft='{tmp}', k={k})"
            with per_step_drafting():
                rows.append(dict(k=k, drafting="per_step", **per_round(target, spec, prompt)))
            rows.append(dict(k=k, drafting="chain", **per_round(target, spec, prompt)))
            print(rows[-2], rows[-1], sep="\n", flush=True)
    summary = {}
    for r in rows:
        summary[f"k{r['k']}_{r['drafting']}_eager_ops_per_round"] = r["eager_ops_per_round"]
        summary[f"k{r['k']}_{r['drafting']}_forwards_per_round"] = r["forwards_per_round"]
    for k in {r["k"] for r in rows}:
        step, chain = (next(r for r in rows if r["k"] == k and r["drafting"] == d) for d in ("per_step", "chain"))
        summary[f"k{k}_chain_over_per_step_eager_ops"] = round(chain["eager_ops_per_round"] / step["eager_ops_per_round"], 3)
    import transformers

    summary.update(device="cpu", target="tiny reference (trained, fp32), draft: its first layer + noise, batch 1",
                   torch=torch.__version__, transformers=transformers.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
