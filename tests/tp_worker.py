"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU): every check compares the
tensor-parallel model with the single-process one, on every rank, and writes {check: result} to OUT/rank<r>.json."""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import hf_accel
from hf_accel.distributed import shard_model
from transformers import AutoModelForCausalLM

ROOT, OUT = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
RANK = dist.get_rank()
torch.manual_seed(0)
IDS = torch.randint(3, 120, (2, 12))
MASK = torch.ones_like(IDS)
MASK[1, :3] = 0  # left padding in row 1
results: dict[str, object] = {}


def check(name):
    def run(fn):
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - the parent test reports it
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        return fn
    return run


def logits_diff(a, b):
    with torch.no_grad():
        la = a(IDS, attention_mask=MASK).logits
        lb = b(IDS, attention_mask=MASK).logits
    return float((la - lb).abs().max())


def gen(model, **kw):
    with torch.no_grad():
        return model.generate(IDS, attention_mask=MASK, max_new_tokens=10, do_sample=False, **kw).tolist()


for spec in ("int8", "fp8", "int4"):  # 1. transformers' TP loads each rank's slice of an hf_accel artifact
    @check(f"hf_tp_artifact_{spec}")
    def _(spec=spec):
        path = f"{ROOT}/art-{spec}"
        ref = AutoModelForCausalLM.from_pretrained(path)
        tp = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
        o = tp.model.layers[0].self_attn.o_proj
        local = {k: tuple((v.to_local() if hasattr(v, "to_local") else v).shape) for k, v in o.named_parameters()}
        return {"max_diff": logits_diff(tp, ref), "o_proj_local": local, "same_generate": gen(tp) == gen(ref)}


@check("local_tp_float_then_int4")  # 2. hf_accel's local TP, then accel= on the sharded model
def _():
    ref = AutoModelForCausalLM.from_pretrained(f"{ROOT}/float")
    hf_accel.apply(ref, "int4(group_size=32, method=rtn)")
    tp = AutoModelForCausalLM.from_pretrained(f"{ROOT}/float")
    shard_model(tp)
    hf_accel.apply(tp, "int4(group_size=32, method=rtn)")
    return {"max_diff": logits_diff(tp, ref), "same_generate": gen(tp) == gen(ref),
            "down_proj": tuple(tp.model.layers[0].mlp.down_proj.weight.shape)}


for spec in ("int8", "int4(group_size=32, method=hqq)"):  # transformers' TP on a float checkpoint, then accel=
    @check(f"hf_tp_float_then_{spec[:4]}")  # (quantizes each rank's local shards)
    def _(spec=spec):
        ref = AutoModelForCausalLM.from_pretrained(f"{ROOT}/float", accel=spec)
        tp = AutoModelForCausalLM.from_pretrained(f"{ROOT}/float", tp_plan="auto", accel=spec)
        res = {"max_diff": logits_diff(tp, ref), "same_generate": gen(tp) == gen(ref)}
        for m in (ref, tp):
            hf_accel.apply(m, "h2o(budget=8, recent=4)")  # a KV policy on top of the quantized TP model
        res["same_generate_h2o"] = gen(tp) == gen(ref)
        return res


REF = AutoModelForCausalLM.from_pretrained(f"{ROOT}/float")
HF_TP = AutoModelForCausalLM.from_pretrained(f"{ROOT}/float", tp_plan="auto")
LOCAL_TP = shard_model(AutoModelForCausalLM.from_pretrained(f"{ROOT}/float"))
for spec in ("h2o(budget=8, recent=4)", "sink(window=6, sinks=2)", "snapkv(budget=8, window=4, kernel=3)",
             "kvquant(bits=4, group=8, residual=4)", "fast", "lookup(k=3)",
             f"draft(draft='{ROOT}/draft', k=3)"):  # 3. runtime, KV and speculative plugins under TP
    @check(f"generate_{spec.split('(')[0]}")
    def _(spec=spec):
        out = {}
        for name, model in (("ref", REF), ("hf_tp", HF_TP), ("local_tp", LOCAL_TP)):
            hf_accel.apply(model, spec)
            try:
                out[name] = gen(model)
            finally:
                hf_accel.remove(model)
        return {"hf_tp_same": out["hf_tp"] == out["ref"], "local_tp_same": out["local_tp"] == out["ref"]}


@check("refuses_bad_int4_split")
def _():
    tp = AutoModelForCausalLM.from_pretrained(f"{ROOT}/float")
    hf_accel.apply(tp, "int4(group_size=64, method=rtn)")  # o_proj: K=64 = one group, cannot split 2 ways
    before = tp.model.layers[0].self_attn.o_proj.weight.shape
    try:
        shard_model(tp)
    except hf_accel.AccelError as e:
        return {"refused": str(e), "unchanged": tp.model.layers[0].self_attn.o_proj.weight.shape == before}
    return {"refused": None}


@check("hf_tp_refuses_bad_int4_artifact")
def _():
    try:
        AutoModelForCausalLM.from_pretrained(f"{ROOT}/art-int4g64", tp_plan="auto")
    except hf_accel.AccelError as e:
        return {"refused": str(e)}
    return {"refused": None}


with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
    json.dump(results, f, default=str)
dist.barrier()
dist.destroy_process_group()
