"""KV-cache plugins on an 8B-shaped model (Llama-3-8B config, random bf16 weights): decode speed, peak memory and
KV bytes of full KV vs each policy at budgets 1/2 .. 1/16 of the context, vs transformers' QuantizedCache.

    python3 scripts/bench_kv.py --preset h200 --out $OUT/bench_kv_h200.json     # one call, <= 6 min on an H200

The h200 preset: 32k context, batch 1 and 8: full KV, sink / h2o / snapkv / quest / duo at 1/8 (and 1/16 at
batch 1), quest with its torch path next to its Triton kernel, duo at half retrieval heads, kvquant int4,
transformers' QuantizedCache (quanto backend: needs optimum-quanto, recorded as an error without it) and kvpress
(recorded as not runnable: kvpress 0.5.5 requires transformers<5.3 and, on 5.17, its forward hooks fail with
KeyError 'cache_position' -- checked on CPU with transformers 5.17.0); then the paged decode-attention kernel
alone (`--kernels`, CUDA events via triton.testing.do_bench) against SDPA over the full cache, as % of the copy
bandwidth measured in the same run. Duo's head split is fixed (the first heads of every layer retrieval): random
weights make calibration meaningless, and speed depends only on the share.

    python scripts/bench_kv.py --contexts 8192 --batches 1 8 --out benchmarks/results/bench_kv_8k.json
    python scripts/bench_kv.py --merge a.json b.json --out benchmarks/results/bench_kv.json   # + summary
    python scripts/bench_kv.py --tiny                                                        # CPU smoke run

Eviction and kvquant inside the fast runtime (a second one-call preset; each spec family compiles its decode step
once per batch kind, 1 and > 1, 58-77 s each on an H200):

    python3 scripts/bench_kv.py --preset h200-fast --out $OUT/bench_kv_fast_h200.json    # <= 9 min on an H200
    python scripts/bench_kv.py --preset h200-fast --tiny                                  # CPU smoke run

It times decode (hf_accel.runtime.bench.measure: t(N new) - t(1 new), so the prefill cancels; 128 new tokens) of
`fast` (full bf16 KV), `snapkv(budget=ctx/8, window=32)+fast`, `snapkv(budget=ctx/16)+fast` and
`sink(window=ctx/8 - 4, sinks=4)+fast` (plugins/kv_cache/_fast_evict.py: layers of kept + new slots) and
`h2o(budget=ctx/8)+fast` (budget + slack + 1 slots, evicting inside the CUDA graph) and
`adakv(budget=ctx/8, window=32)+fast` (every head's kept slots in one flat pool per row) at 8k and 32k context,
batch 1 and 8, in priority order: 32k batch 8 (the issue's goal) for fast and both snapkv budgets, then 32k batch 1,
then 8k; sink, then h2o, then adakv last, at 32k only. Within 9 minutes the h2o and adakv rows are reached only with
a filter on the families, which keeps the order among those kept:

    python3 scripts/bench_kv.py --preset h200-fast --contexts 32768 --evict-families fast h2o \
        --out $OUT/bench_kv_h2o_fast_h200.json    # fast b8, fast b1, h2o b8, h2o b1: ~8 min (4 compiles) on an H200
    python3 scripts/bench_kv.py --preset h200-fast --contexts 32768 --batches 8 --evict-families fast h2o adakv \
        --out $OUT/bench_kv_h2o_adakv_fast_h200.json    # batch 8 only: fast, h2o, adakv: ~7 min (3 compiles)

Each row records tok/s, `kv_gb_held` (what the cache allocated), `kv_gb_read_per_step` and the copy-bandwidth limit;
the summary has `<row>_speedup_vs_fast` and `<row>_kv_held_vs_fast`, e.g. `snapkv_1of8_fast_ctx32k_b8_speedup_vs_fast`
or `h2o_1of8_fast_ctx32k_b8_speedup_vs_fast`. A row whose estimated cost (a first
compile ~90 s, four prefills at ~20k tokens/s; estimates, not measured) exceeds the time left is recorded as
skipped. Dropped from this preset to stay within 9 minutes (two compiles per spec family): sink at 8k, and the
kvquant rows it used to hold (the kvquant kernel alone against bf16 matmul attention, and `kvquant(bits=4|8)+fast`
and `kvquant(bits=4, kernel=torch)+fast` at batch 1), which `--fast-kvquant` adds back after the eviction rows.

Every run is one `model.generate` (greedy, `new` tokens, EOS off); a stopping criterion timestamps each step after
a device sync, so prefill and decode are timed from the same call. `kv_mb` is the CUDA memory still held by the
returned cache; `peak_gb` is the peak allocated memory of the call (weights included).
"""

from __future__ import annotations

import argparse
import datetime
import functools
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
    # the first decode steps may compile a kernel for a new shape (Triton JIT): timed from the third step on
    t_from = clock.times[min(2, len(clock.times) - 2)]
    steps = len(clock.times) - 1 - min(2, len(clock.times) - 2)
    row["decode_tok_s"] = round(batch * steps / (clock.times[-1] - t_from), 2)
    row["decode_ms_per_step"] = round(1000 * (clock.times[-1] - t_from) / steps, 3)
    row["decode_steps_timed"] = steps
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
    for frac in fracs:
        b = ctx // FRACTIONS[frac]
        runs += [(f"quest {frac}", f"quest(budget={b}, page=16)", frac, None),
                 (f"duo {frac}", _duo_spec(ctx, b), frac, None)]
    runs += [("kvquant int4", "kvquant(bits=4)", None, None)]
    if sweep:
        runs += [("kvquant int8", "kvquant(bits=8)", None, None)]
    runs += [("h2o 1/8 + kvquant int4", f"h2o(budget={ctx // 8})+kvquant(bits=4)", "1/8", None)]
    return runs


KV_HEADS, LAYERS = 8, 32  # the 8B shape


def _duo_spec(ctx: int, budget: int | None = None, ratio: float | None = None, sinks: int = 64, window: int = 192,
             layers: int = LAYERS, kv_heads: int = KV_HEADS) -> str:
    """duo with the memory of `budget` tokens per head (or a retrieval share `ratio`): the first heads of each layer
    retrieval."""
    if ratio is None:
        ratio = max(0.0, (budget - sinks - window) / (ctx - sinks - window))
    n = max(0, min(kv_heads, round(ratio * kv_heads)))
    heads = ".".join(["1" * n + "0" * (kv_heads - n)] * layers)
    return f"duo(heads='{heads}', sinks={sinks}, window={window})"


def preset_h200(ctx=32768, layers=LAYERS, kv_heads=KV_HEADS):
    """(context, batch, label, spec, fraction, QuantizedCache config) of the one-call H200 run, in priority order."""
    b8, b16 = ctx // 8, ctx // 16
    small = ctx < 1024  # --tiny: sinks + window must fit the budget
    duo_spec = functools.partial(_duo_spec, layers=layers, kv_heads=kv_heads,
                                 **({"sinks": 4, "window": 12} if small else {}))
    jobs = [(ctx, 1, "full", "", None, None)]
    for frac, b in (("1/8", b8), ("1/16", b16)):
        jobs += [(ctx, 1, f"snapkv {frac}", f"snapkv(budget={b}, window={min(32, b // 2)})", frac, None),
                 (ctx, 1, f"quest {frac}", f"quest(budget={b}, page=16)", frac, None),
                 (ctx, 1, f"duo {frac}", duo_spec(ctx, b), frac, None),
                 (ctx, 1, f"h2o {frac}", f"h2o(budget={b})", frac, None),
                 (ctx, 1, f"sink {frac}", f"sink(window={b - 4}, sinks=4)", frac, None)]
    jobs += [(ctx, 1, "quest 1/8 torch path", f"quest(budget={b8}, page=16, kernel='torch')", "1/8", None),
             (ctx, 1, "duo half retrieval", duo_spec(ctx, ratio=0.5), None, None),
             (ctx, 1, "kvquant int4", "kvquant(bits=4)", None, None),
             (ctx, 1, "QuantizedCache quanto int4", "", None, {"backend": "quanto", "nbits": 4})]
    jobs += [(ctx, 8, "full", "", None, None)]
    jobs += [(ctx, 8, f"{name} 1/8", spec, "1/8", None) for name, spec in (
        ("quest", f"quest(budget={b8}, page=16)"), ("snapkv", f"snapkv(budget={b8}, window={min(32, b8 // 2)})"),
        ("duo", duo_spec(ctx, b8)),
        ("h2o", f"h2o(budget={b8})"))]
    return jobs


FAST_KV = [("fast", "fast"), ("kvquant int4 + fast", "kvquant(bits=4)+fast"), ("kvquant int8 + fast", "kvquant(bits=8)+fast"),
           ("kvquant int4 + fast dequantised", "kvquant(bits=4, kernel=torch)+fast")]


def kv_bytes_per_token(config, spec: str) -> int:
    """KV bytes one cached token costs a decode step (all layers, K and V): bf16 for `fast`; for kvquant the codes
    plus a bf16 scale and minimum per group (the ring of recent full-precision tokens is a constant, left out)."""
    import re

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_head = 2 * d * 2
    if "kvquant" in spec:
        bits = int(re.search(r"bits=(\d)", spec).group(1))
        group = int(m.group(1)) if (m := re.search(r"group=(\d+)", spec)) else 32
        per_head = 2 * (d * bits // 8 + 2 * (d // group) * 2)
    return config.num_hidden_layers * kv_heads * per_head


def fast_row(model, device, label, spec, ctx, batch, new, repeats, copy_gbps=None, fraction=None):
    """One decode row of `spec` (already applied) at (ctx, batch): tok/s, KV bytes per token and held by the cache."""
    from hf_accel.runtime import get_runtime
    from hf_accel.runtime.bench import measure, weight_bytes_per_step

    row = {"label": label, "spec": spec, "context": ctx, "batch": batch}
    try:
        row.update(measure(model, label, batch, ctx, new, repeats=repeats))
        rt = get_runtime(model)
        layers = [x for sess in rt.sessions.values() for x in sess.cache.layers]
        row["fast_path_used"] = rt.stats["calls"] > 0 and rt.stats["fallbacks"] == 0
        row["attention_reads_codes"] = bool(layers) and all(getattr(x, "reads_codes", False) for x in layers)
        row["compile_and_capture_s"] = round(row.pop("warmup_s"), 1)
        row["compiled"] = rt.compile_error is None
        if rt.compile_error:  # the step fell back to eager kernels in the graph: keep the cause with the row
            row["compile_error"] = rt.compile_error[-2000:]
        factory = rt.kv_factory()  # what the cache really holds (the largest bucket of the row)
        held = factory.nbytes() if hasattr(factory, "nbytes") else sum(t.nbytes for t in rt.pool.k + rt.pool.v)
        row["kv_gb_held"] = round(held / 1e9, 6)
        row["kv_slots_per_row"] = max((getattr(x, "capacity", 0) for x in layers), default=0)
    except Exception as e:  # OOM, a failed compile: recorded, the next row goes on
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if device == "cuda":
            torch.cuda.empty_cache()
    kv = kv_bytes_per_token(model.config, spec)
    row["kv_bytes_per_token"] = kv
    kept = ctx if fraction is None else ctx // fraction  # prompt tokens each row keeps (eviction: the budget)
    row["kv_gb_read_per_step"] = round(batch * (kept + new / 2) * kv / 1e9, 6)
    if copy_gbps and "decode_tok_s" in row:
        step = weight_bytes_per_step(model) + batch * (kept + new / 2) * kv
        row["limit_tok_s"] = round(batch * copy_gbps * 1e9 / step, 1)
        row["pct_of_limit"] = round(100 * row["decode_tok_s"] / row["limit_tok_s"], 1)
    for key in ("decode_tok_s", "ms_per_step", "ttft_s", "t_n_s", "peak_mem_gb", "bytes_per_step_gb"):
        if key in row:
            row[key] = round(row[key], 4)
    row.pop("bytes_per_step_gb", None)  # measure() counts a bf16 cache of the whole context; the keys above are this spec's
    print(json.dumps(row), flush=True)
    return row


def fast_kv_rows(model, device, contexts, batches, new, repeats, time_left, save, copy_gbps=None):
    """Decode tok/s of each FAST_KV spec at each (context, batch), compiled once per spec (the capacity is symbolic)."""
    rows = []
    for label, spec in FAST_KV:
        hf_accel.remove(model)
        applied = False
        for ctx in contexts:
            for batch in batches:
                if time_left() <= 0:
                    rows.append({"label": label, "spec": spec, "context": ctx, "batch": batch, "skipped": "time limit"})
                    continue
                if not applied:
                    hf_accel.apply(model, spec)
                    applied = True
                rows.append(fast_row(model, device, label, spec, ctx, batch, new, repeats, copy_gbps))
                save()
    hf_accel.remove(model)
    return rows


# Eviction inside the fast runtime (plugins/kv_cache/_fast_evict.py): (label, spec, fraction of the context kept)
EVICT_FAST = [("fast", "fast", None),
              ("snapkv 1/8 + fast", "snapkv(budget={b}, window={win})+fast", 8),
              ("snapkv 1/16 + fast", "snapkv(budget={b}, window={win})+fast", 16),
              ("sink 1/8 + fast", "sink(window={w}, sinks=4)+fast", 8),
              ("h2o 1/8 + fast", "h2o(budget={b})+fast", 8),
              ("adakv 1/8 + fast", "adakv(budget={b}, window={win})+fast", 8)]
LAST_FAMILIES = ("sink", "h2o", "adakv")  # run after the others, at the largest context only, in this order


def evict_family(label: str) -> str:
    return label.split()[0]  # 'snapkv 1/8 + fast' -> 'snapkv'


def evict_plan(contexts, batches, families=None):
    """(label, spec template, fraction, ctx, batch) in priority order: the issue's goal row (largest context, largest
    batch) for every spec first, then the largest context at the other batches, then the smaller contexts; sink,
    then h2o, then adakv, at the largest context only. A spec family (fast, snapkv, sink, h2o, adakv) compiles once per batch kind
    (1, > 1): a new budget or context only captures, so the order costs no extra compiles. `families`: only these
    (e.g. fast h2o: the baseline and h2o's rows in one run)."""
    ctxs, bs = sorted(contexts, reverse=True), sorted(batches, reverse=True)
    specs = [e for e in EVICT_FAST if families is None or evict_family(e[0]) in families]
    cells = [(ctxs[0], b) for b in bs] + [(c, b) for c in ctxs[1:] for b in bs]
    plan = [(label, spec, frac, c, b) for c, b in cells for label, spec, frac in specs
            if evict_family(label) not in LAST_FAMILIES]
    return plan + [(label, spec, frac, c, b) for last in LAST_FAMILIES for label, spec, frac in specs
                   if evict_family(label) == last for c, b in [(ctxs[0], b) for b in bs]]


def evict_rows(model, device, contexts, batches, new, repeats, time_left, save, copy_gbps=None, tiny=False,
               families=None):
    """Decode rows of EVICT_FAST (each row applies its spec: the budget follows the context). A row is skipped when
    the time left is below its estimated cost: ~90 s when its spec family and batch kind have not compiled yet
    (the H200's first compiles took 58-77 s), plus four prefills (measure's warm-ups and timed calls) at ~20k
    tokens/s for the 8B shape (an estimate, not measured here)."""
    rows, compiled = [], set()
    for label, template, frac, ctx, batch in evict_plan(contexts, batches, families):
        b = ctx // frac if frac else ctx
        spec = template.format(b=b, w=b - 4, win=min(32, b // 2))
        family = (evict_family(label), batch > 1)
        reps = repeats if ctx * batch <= 65536 else 1  # the 32k x 8 prefill is ~13 s: one timed pair there
        cost = (0 if family in compiled or tiny else 90) + (0 if tiny else (2 + 2 * reps) * ctx * batch / 20000)
        if time_left() < cost:
            rows.append({"label": label, "spec": spec, "context": ctx, "batch": batch,
                         "skipped": f"time limit ({time_left():.0f} s left, ~{cost:.0f} s needed)"})
            continue
        hf_accel.remove(model)
        try:
            hf_accel.apply(model, spec)
        except Exception as e:
            rows.append({"label": label, "spec": spec, "context": ctx, "batch": batch,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        rows.append(fast_row(model, device, label, spec, ctx, batch, new, reps, copy_gbps, frac))
        compiled.add(family)
        save()
    hf_accel.remove(model)
    return rows


def kvquant_kernel_rows(device, contexts=(8192, 32768), batches=(1, 8), copy_gbps=None):
    """kvquant's decode-attention op alone on the 8B attention shape (8 KV heads x 4 query heads, d=128, group 32,
    bf16 scales, every slot visible) vs bf16 matmul attention over the same context (the `fast` runtime's decode
    attention, grouped heads folded). GB/s counts the bytes each must read: codes + scales (+ mask), or bf16 K/V."""
    from hf_accel.kernels.kvquant_attention import (kvquant_decode_attention, kvquant_decode_attention_ref,
                                                    kvquant_decode_attention_triton)
    from hf_accel.plugins.kv_cache._layers import quantize
    from hf_accel.runtime.attention import matmul_attention

    rows = []
    smoke = device != "cuda"
    dt = torch.bfloat16 if not smoke else torch.float32
    h, g, d, group, ring = 8, 4, 128, 32, 176
    if smoke:
        contexts, batches, h, d = (256,), (1, 2), 2, 32
    for ctx in contexts:
        for batch in batches:
            try:
                q = torch.randn(batch, h * g, 1, d, device=device, dtype=dt)
                mask = torch.zeros(batch, 1, 1, ctx, device=device, dtype=dt)  # additive, as the runtime passes it
                k = torch.randn(batch, h, ctx, d, device=device, dtype=dt)
                v = torch.randn(batch, h, ctx, d, device=device, dtype=dt)
                fns = {"bf16_matmul_attention": (lambda: matmul_attention(q.view(batch, h, g, d), k, v, mask),
                                                 2 * batch * h * ctx * d * k.element_size())}
                for bits in (8, 4):
                    channel = k.abs().amax(2, keepdim=True).clamp(min=1e-4)
                    kc, ks, kz = quantize(k / channel, bits, group)
                    vc, vs, vz = quantize(v, bits, group)
                    args = (q, kc, ks, kz, vc, vs, vz, channel, k[:, :, -ring:].contiguous(), v[:, :, -ring:].contiguous(),
                            torch.tensor([ctx - 100], device=device), mask, d ** -0.5, bits, group)
                    nbytes = 2 * batch * h * ctx * (d * bits // 8 + 2 * (d // group) * ks.element_size()) + mask.nbytes
                    ref = kvquant_decode_attention_ref(*args).float()
                    fns[f"kvquant_int{bits}"] = (functools.partial(kvquant_decode_attention, *args), nbytes, ref)
                    if not smoke:
                        for bn, nw in ((64, 4), (32, 8), (64, 8), (16, 4)):
                            fns[f"kvquant_int{bits}_n{bn}_w{nw}"] = (functools.partial(
                                kvquant_decode_attention_triton, *args, block_n=bn, num_warps=nw), nbytes, ref)
                for name, (fn, nbytes, *ref) in fns.items():
                    row = {"kernel_bench": name, "context": ctx, "batch": batch}
                    try:
                        out = fn()
                        if ref:
                            row["max_abs_err_vs_ref"] = round((out.float().reshape(ref[0].shape) - ref[0]).abs().max().item(), 5)
                        if device == "cuda":
                            from hf_accel.runtime.bench import graph_ms
                            ms = graph_ms([fn])  # one CUDA graph replay: no launch gaps, as in the runtime
                        else:
                            t0 = time.perf_counter()
                            fn()
                            ms = (time.perf_counter() - t0) * 1e3
                        row.update(ms=round(ms, 4), gb_read=round(nbytes / 1e9, 4), gbps=round(nbytes / ms / 1e6, 1))
                        if copy_gbps:
                            row["pct_of_copy_bw"] = round(100 * row["gbps"] / copy_gbps, 1)
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del q, k, v
            except Exception as e:
                rows.append({"kernel_bench": "error", "context": ctx, "batch": batch,
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


KVPRESS_NOTE = ("kvpress 0.5.5 (the newest on the package index) requires transformers<5.3; installed without its "
                "dependency pins on transformers 5.17.0 (CPU check), SnapKVPress / StreamingLLMPress / KnormPress / "
                "ExpectedAttentionPress all fail in their forward hook with KeyError 'cache_position'")


def kvpress_row(ctx, batch):
    try:
        import kvpress  # noqa: F401
        err = "kvpress is importable here but not wired into this benchmark; " + KVPRESS_NOTE
    except Exception as e:
        err = f"not runnable: {type(e).__name__}: {str(e)[:80]}. {KVPRESS_NOTE}"
    return {"label": "kvpress", "context": ctx, "batch": batch, "spec": "kvpress", "error": err}


def copy_bandwidth() -> dict:
    """Copy bandwidth (read + write) of a 2 GiB device copy, in GB/s."""
    from hf_accel.runtime.bench import copy_bandwidth as measure

    return {"copy_gbps": round(measure("cuda", nbytes=1 << 31) / 1e9, 1)}


def kernel_rows(device, contexts=(32768,), batches=(1, 8), fractions=("1/8", "1/16", "1"), copy_gbps=None):
    """The paged decode-attention kernel alone on the 8B attention shape (8 KV heads x 4 query heads, d=128, bf16):
    selected pages vs all pages vs the torch gather path vs SDPA over the full cache (grouped query heads folded,
    no repeat). GB/s counts the K and V bytes of the slots read (selected pages or the full cache)."""
    import torch.nn.functional as F

    from hf_accel.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref

    rows = []
    smoke = device != "cuda"
    dt = torch.bfloat16 if not smoke else torch.float32
    if smoke:
        contexts, batches = (256,), (1, 2)
    for ctx in contexts:
        for batch in batches:
            h, g, d, page = 8, 4, 128, 16
            if smoke:
                h, d = 2, 32
            try:
                q = torch.randn(batch, h, g, d, device=device, dtype=dt)
                k = torch.randn(batch, h, ctx, d, device=device, dtype=dt)
                v = torch.randn(batch, h, ctx, d, device=device, dtype=dt)
                nv = torch.full((batch,), ctx, device=device, dtype=torch.int32)
                real = torch.ones(batch, ctx, dtype=torch.bool, device=device)
                pages = ctx // page
                for frac in fractions:
                    n_sel = pages // int(frac.split("/")[1]) if "/" in frac else pages
                    pt = torch.stack([torch.randperm(pages, device=device)[:n_sel].sort().values
                                      for _ in range(batch * h)]).view(batch, h, n_sel).int()
                    kv_bytes = 2 * batch * h * n_sel * page * d * q.element_size()
                    fns = {"triton_paged": lambda: paged_decode_attention(q, k, v, pt, nv, real, d ** -0.5, page)}
                    if frac != "1":
                        fns["torch_gather"] = lambda: paged_decode_attention_ref(q, k, v, pt, nv, real, d ** -0.5, page)
                    else:
                        fns["sdpa_full"] = lambda: F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
                    ref = paged_decode_attention_ref(q, k, v, pt, nv, real, d ** -0.5, page).float()
                    for name, fn in fns.items():
                        err = (fn().float() - ref).abs().max().item()
                        if device == "cuda":
                            from triton.testing import do_bench
                            ms = do_bench(fn, warmup=25, rep=100)
                        else:
                            t0 = time.perf_counter()
                            fn()
                            ms = (time.perf_counter() - t0) * 1e3
                        row = {"kernel_bench": name, "context": ctx, "batch": batch, "pages_read": frac, "ms": round(ms, 4),
                               "kv_gb_read": round(kv_bytes / 1e9, 4), "gbps": round(kv_bytes / ms / 1e6, 1),
                               "max_abs_err_vs_ref": round(err, 5)}
                        if copy_gbps:
                            row["pct_of_copy_bw"] = round(100 * row["gbps"] / copy_gbps, 1)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                if device == "cuda":  # the kernel inside a CUDA graph: capture, change the query in place, replay
                    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        paged_decode_attention(q, k, v, pt, nv, real, d ** -0.5, page)
                    torch.cuda.current_stream().wait_stream(stream)
                    with torch.cuda.graph(graph):
                        out = paged_decode_attention(q, k, v, pt, nv, real, d ** -0.5, page)
                    q.copy_(torch.randn_like(q))
                    nv.fill_(ctx - 1000)  # rows shorter than the cache: masked on the device, no recapture
                    graph.replay()
                    err = (out.float() - paged_decode_attention_ref(q, k, v, pt, nv, real, d ** -0.5, page).float())
                    rows.append({"kernel_bench": "cuda_graph_replay", "context": ctx, "batch": batch,
                                 "max_abs_err_vs_ref": round(err.abs().max().item(), 5)})
                    print(json.dumps(rows[-1]), flush=True)
                del q, k, v
            except Exception as e:
                rows.append({"kernel_bench": "error", "context": ctx, "batch": batch,
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


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
    ap.add_argument("--preset", choices=["h200", "h200-fast"], help="the one-call runs described at the top")
    ap.add_argument("--kernels", action="store_true", help="also benchmark the paged decode-attention kernel alone")
    ap.add_argument("--fast-kvquant", action="store_true",
                    help="h200-fast: also the kvquant kernel alone and kvquant+fast rows (batch 1), after the rest")
    ap.add_argument("--evict-families", nargs="+", choices=sorted({evict_family(e[0]) for e in EVICT_FAST}),
                    help="h200-fast: only these eviction rows (e.g. fast h2o: the baseline and h2o 1/8 + fast)")
    ap.add_argument("--merge", nargs="+")
    ap.add_argument("--out", default="benchmarks/results/bench_kv.json")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.quality:
        return quality(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.preset == "h200":
        args.new, args.kernels = 24, True
        args.time_limit = min(args.time_limit, 300.0)
    if args.preset == "h200-fast":
        return main_fast(args, device)
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
    if args.preset == "h200":
        ctx = 512 if args.tiny else 32768
        text = model.config
        jobs = preset_h200(ctx, text.num_hidden_layers, text.num_key_value_heads)
        if args.tiny:
            jobs = [(c, min(b, 2), *rest) for c, b, *rest in jobs]
        record["rows"].append(kvpress_row(ctx, 1))
    for ctx in ([] if args.preset else args.contexts):
        for batch in args.batches:
            jobs += [(ctx, batch) + r for r in plan(ctx, batch, batch in args.sweep_batches)]
    if not args.preset:
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
    if args.kernels:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
            record["copy_bandwidth"] = copy_bandwidth()
        record["kernel_rows"] = kernel_rows(device, copy_gbps=record.get("copy_bandwidth", {}).get("copy_gbps"))
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["summary"] = summarize(record)
    save()
    print_table(record)


def main_fast(args, device):
    """--preset h200-fast: EVICT_FAST (fast, snapkv 1/8 and 1/16, sink 1/8, h2o 1/8, adakv 1/8) at 8k and 32k, batch 1 and 8; with
    --fast-kvquant also the kvquant kernel alone and FAST_KV (see the top of the file)."""
    start = time.perf_counter()
    contexts, batches, new, repeats = args.contexts, args.batches, 128, 2
    if args.tiny:
        contexts, batches, new, repeats = [256, 512], [1, 2], 8, 1
    limit = min(args.time_limit, 540.0)
    time_left = lambda: limit - (time.perf_counter() - start)  # noqa: E731
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "versions": versions(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": "Llama-3-8B shape, random bf16 weights" if not args.tiny else "tiny llama", "rows": []}

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        record["wall_s"] = round(time.perf_counter() - start, 1)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)

    if device == "cuda":
        record["copy_bandwidth"] = copy_bandwidth()
    copy_gbps = record.get("copy_bandwidth", {}).get("copy_gbps")
    model = build_model(args.tiny, device)
    record["evict_rows"] = evict_rows(model, device, contexts, batches, new, repeats, time_left, save, copy_gbps,
                                      tiny=args.tiny, families=args.evict_families)
    save()
    if args.fast_kvquant:
        record["kernel_rows"] = kvquant_kernel_rows(device, copy_gbps=copy_gbps)
        save()
        record["fast_kv_rows"] = fast_kv_rows(model, device, contexts, [1] if not args.tiny else [1], new, repeats,
                                              time_left, save, copy_gbps)
    record["summary"] = summarize_fast(record)
    save()
    print(json.dumps(record["summary"], indent=1))


def _fast_key(label: str, ctx: int, batch: int) -> str:
    """snake_case summary key of a row: 'snapkv 1/8 + fast', 32768, 8 -> 'snapkv_1of8_fast_ctx32k_b8'."""
    name = label.replace(" + ", "_").replace(" ", "_").replace("/", "of")
    return f"{name}_ctx{f'{ctx // 1024}k' if ctx >= 1024 else ctx}_b{batch}"


def summarize_fast(record):
    s = {"gpu": record["versions"].get("gpu"), "versions": record["versions"], "date": record["date"],
         "command": record["command"], "model": record["model"]}
    all_rows = record.get("fast_kv_rows", []) + record.get("evict_rows", [])
    rows = {(r["label"], r["context"], r["batch"]): r for r in all_rows if "decode_tok_s" in r}
    for (label, ctx, batch), r in rows.items():
        key = _fast_key(label, ctx, batch)
        s[key + "_decode_tok_s"] = r["decode_tok_s"]
        s[key + "_kv_bytes_per_token"] = r["kv_bytes_per_token"]
        for extra in ("kv_gb_held", "kv_gb_read_per_step", "pct_of_limit"):
            if extra in r:
                s[f"{key}_{extra}"] = r[extra]
        base = rows.get(("fast", ctx, batch))
        if base and label != "fast":
            s[key + "_speedup_vs_fast"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
            if r.get("kv_gb_held") and base.get("kv_gb_held"):
                s[key + "_kv_held_vs_fast"] = round(r["kv_gb_held"] / base["kv_gb_held"], 3)
        if "fast_path_used" in r:
            s[key + "_fast_path_used"] = r["fast_path_used"]
        if "kvquant" in label:
            s[key + "_attention_reads_codes"] = r["attention_reads_codes"]
    for r in record.get("kernel_rows", []):
        if "ms" in r:
            ctx = r["context"]
            k = f"kernel_{r['kernel_bench']}_ctx{f'{ctx // 1024}k' if ctx >= 1024 else ctx}_b{r['batch']}"
            s[k + "_us"] = round(1000 * r["ms"], 2)
            s[k + "_gbps"] = r["gbps"]
    s["errors"] = {f"{r.get('label', r.get('kernel_bench'))} ctx{r['context']} b{r['batch']}": r["error"][:160]
                   for r in all_rows + record.get("kernel_rows", []) if "error" in r}
    s["skipped"] = [f"{r['label']} ctx{r['context']} b{r['batch']}" for r in all_rows if "skipped" in r]
    return s


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
    # the headline: best plugin speed-up over the full cache per (context, batch), the paged kernel's bandwidth
    for (label, ctx, batch), r in by.items():
        key = f"ctx{ctx // 1024}k_b{batch}"
        sp = s.get(f"{label.replace(' + ', '_').replace(' ', '_').replace('/', 'of')}_{key}_decode_speedup_vs_full".lower())
        if sp is not None and sp > s.get(f"best_decode_speedup_vs_full_{key}", 0):
            s[f"best_decode_speedup_vs_full_{key}"] = sp
            s[f"best_decode_speedup_vs_full_{key}_label"] = label
    if "best_decode_speedup_vs_full_ctx32k_b1" in s:
        s["goal_2p5x_at_32k_b1_met"] = s["best_decode_speedup_vs_full_ctx32k_b1"] >= 2.5
    if record.get("copy_bandwidth"):
        s["copy_gbps"] = record["copy_bandwidth"]["copy_gbps"]
    for r in record.get("kernel_rows", []):
        if "ms" in r:
            k = f"kernel_{r['kernel_bench']}_ctx{r['context'] // 1024}k_b{r['batch']}_pages_{r['pages_read'].replace('/', 'of')}"
            s[k + "_us"] = round(1000 * r["ms"], 2)
            s[k + "_gbps"] = r["gbps"]
            if "pct_of_copy_bw" in r:
                s[k + "_pct_of_copy_bw"] = r["pct_of_copy_bw"]
    s["errors"] = {f"{r['label']} b{r.get('batch')}": r["error"][:160] for r in record["rows"] if "error" in r}
    return s


def print_table(record):
    print(f"{'label':<30}{'ctx':>7}{'b':>3}{'tok/s':>9}{'ms/step':>9}{'x full':>8}{'kv MB':>10}{'peak GB':>9}")
    full = {(r["context"], r["batch"]): r["decode_tok_s"] for r in record["rows"]
            if r.get("label") == "full" and "decode_tok_s" in r}
    for r in record["rows"]:
        if "decode_tok_s" not in r:
            print(f"{r.get('label', '?'):<30}{r.get('context', 0):>7}{r.get('batch', 0):>3}  "
                  f"{(r.get('error') or r.get('skipped') or '')[:70]}")
            continue
        f = full.get((r["context"], r["batch"]))
        print(f"{r['label']:<30}{r['context']:>7}{r['batch']:>3}{r['decode_tok_s']:>9.2f}{r['decode_ms_per_step']:>9.2f}"
              f"{(r['decode_tok_s'] / f if f else float('nan')):>8.2f}{(r.get('kv_mb') or 0):>10.1f}"
              f"{(r.get('peak_gb') or float('nan')):>9.2f}")
    for r in record.get("kernel_rows", []):
        print(f"kernel {r.get('kernel_bench')} ctx {r.get('context')} b{r.get('batch')} pages {r.get('pages_read')}: "
              f"{r.get('ms', float('nan')) * 1000:.1f} us, {r.get('gbps')} GB/s, {r.get('pct_of_copy_bw', '-')}% of copy, "
              f"err {r.get('max_abs_err_vs_ref')} {r.get('error', '')}")
    if record.get("copy_bandwidth"):
        print("copy bandwidth", record["copy_bandwidth"])


if __name__ == "__main__":
    main()
