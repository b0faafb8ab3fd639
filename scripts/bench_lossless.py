"""`lossless` on the GPU: bytes per weight, bit-exactness, GEMV time per shape, the whole-model weight pass and
decode tokens/s of a Llama-3-8B-shaped model against bf16, in one run (about 2-3 minutes on an H200).

    python scripts/bench_lossless.py --out $OUT/bench_lossless.json [--reference DIR]    # the GPU run
    python scripts/bench_lossless.py --device cpu --smoke --out /tmp/bll.json            # CPU smoke (tiny shapes)

The 8B model has random weights whose bf16 exponents follow the histogram measured on a trained reference model:
`--reference DIR` (e.g. the `base` reference built by scripts/build_reference.py) if given, else the shipped `tiny`
reference (hf_accel/quality/assets/tiny); sign and mantissa bits are uniform. The summary says which. With
`--reference`, that model is also encoded as it is (per-layer statistics, bit-exact weights, logits, greedy tokens).

Sections (each in try/except: a failure is recorded in its row and the rest still runs):
1. copy bandwidth (bytes read + written of a 2 GiB device copy): the yardstick for "% of copy";
2. encode every linear of the 8B model (225, incl. lm_head): bits/weight, escapes, entropy and Huffman sizes;
   decode kernel bit-exact against the original bits for every layer;
3. per shape (q_o, k_v, gate_up, down, lm_head) and batch M in {1, 4, 16}: a short launch-config sweep of the
   fused kernels, then time per call (all layers of that shape, distinct weights, one CUDA graph, median of
   replays) for bf16 cuBLAS and lossless; GEMV output vs cuBLAS (max |diff|, share of bit-equal outputs) and the
   exact path (decode + cuBLAS) bit-identical to cuBLAS;
4. the whole-model weight pass (all 225 linears, one CUDA graph) per M: ms, GB/s, % of copy, speedup;
5. decode tokens/s at bs 1/4/16 through generate(): accel="fast" vs accel="lossless+fast" (CUDA graphs; fast's
   torch.compile is off unless --compile), greedy tokens of lossless+fast vs fast, and logits of the bf16 model vs
   lossless (prefill: decode + cuBLAS, expected bit-identical; M=1 and M=4 forwards: the fused kernels, diff
   reported; the same with exact=True, expected bit-identical).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_accel
from hf_accel.kernels import lossless as KL
from hf_accel.kernels._base import LaunchConfig, device_key
from hf_accel.runtime.bench import graph_ms

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
                 bos_token_id=128000, eos_token_id=128001)
SMOKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SHAPE_NAMES = {"q_proj": "q_o", "o_proj": "q_o", "k_proj": "k_v", "v_proj": "k_v", "gate_proj": "gate_up",
               "up_proj": "gate_up", "down_proj": "down", "lm_head": "lm_head"}
TINY = Path(hf_accel.__file__).parent / "quality" / "assets" / "tiny"
PARTS = ("sm", "code", "base", "ptr", "col", "val")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        pass
    return out


def attempt(rows: list, label: dict, fn):
    """Run fn() -> dict; append label + result, or label + the error (the run goes on)."""
    t0 = time.perf_counter()
    try:
        row = {**label, **fn()}
    except Exception as e:  # noqa: BLE001 - every failure is recorded, none stops the run
        row = {**label, "error": f"{type(e).__name__}: {str(e)[:300]}", "trace": traceback.format_exc()[-1500:]}
        log("FAILED", label, row["error"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    rows.append(row)
    return row


# -- weights following a measured exponent histogram ---------------------------------------------------------------
def reference_histogram(directory: Path) -> tuple[torch.Tensor, dict]:
    """Exponent histogram pooled over every 2-D weight of a saved model (cast to bf16, as the model would run)."""
    from safetensors import safe_open

    hist = torch.zeros(256, dtype=torch.int64)
    n_tensors = 0
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                t = sf.get_tensor(key)
                if t.ndim == 2 and t.is_floating_point():
                    hist += KL.exponent_histogram(t.to(torch.bfloat16))
                    n_tensors += 1
    if not n_tensors:
        raise FileNotFoundError(f"no 2-D float tensors in {directory}/*.safetensors")
    base, covered = KL.best_window(hist)
    return hist, {"source": str(directory), "tensors": n_tensors, "weights": int(hist.sum()), "window_base": base,
                  "window_coverage": (covered + int(hist[0])) / int(hist.sum()),
                  "entropy_bits": KL.entropy_bits(hist), "huffman_bits_per_weight": KL.huffman_bits_per_weight(hist)}


def sample_bf16(shape, cdf: torch.Tensor, gen: torch.Generator, device) -> torch.Tensor:
    """bf16 values with exponents drawn from `cdf` (over 0..255), uniform sign and mantissa."""
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, dtype=torch.int16, device=device)
    chunk = 1 << 26
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        e = torch.searchsorted(cdf, torch.rand(m, generator=gen, device=device)).clamp_(max=254).to(torch.int32)
        sm = torch.randint(0, 256, (m,), generator=gen, device=device, dtype=torch.int32)
        out[i:i + m] = (((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)).to(torch.int16)
    return out.view(torch.bfloat16).view(*shape)


def build_model(shape: dict, hist: torch.Tensor, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device=device)
    p = hist.double() / hist.sum()
    cdf = p.cumsum(0).to(device=device, dtype=torch.float64).float()
    cdf[-1] = 1.0
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.copy_(sample_bf16(param.shape, cdf, g, device))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model.eval()


def linears(model):
    out = []
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear:
            out.append((name, SHAPE_NAMES[name.rsplit(".", 1)[-1]], m))
    return out


# -- timing --------------------------------------------------------------------------------------------------------
def copy_bandwidth(dev: str) -> float:
    if dev != "cuda":
        return float("nan")
    from hf_accel.runtime.bench import copy_bandwidth as cb

    return cb("cuda", nbytes=1 << 31)


def gemv_candidates(quick: bool):
    c = [(8, 256, 4), (16, 256, 4), (16, 512, 8), (8, 512, 4), (4, 512, 4), (16, 128, 4)]
    return [LaunchConfig(block_n=n, block_k=k, num_warps=w) for n, k, w in (c[:3] if quick else c)]


def dot_candidates(quick: bool):
    c = [(16, 128, 1), (32, 128, 1), (64, 64, 1), (32, 64, 3), (16, 64, 3)]
    return [LaunchConfig(block_n=n, block_k=k, block_m=16, num_warps=4, num_stages=s) for n, k, s in (c[:2] if quick else c)]


def ll_call(kind, x, parts, cfg):
    if kind == "gemv":
        return KL.ll_gemv(x, *parts, None, cfg)
    if kind == "dot":
        return KL.ll_dot(x, *parts, None, cfg)
    if kind == "exact":
        return F.linear(x, KL.ll_decode(*parts))
    return KL.lossless_linear(x, *parts, None, False)  # "op": the dispatcher (uses TUNED)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (y.float() - ref.float()).abs()
    finite = torch.isfinite(ref.float())
    return {"max_abs_diff": float(d[finite].max()) if finite.any() else float("nan"),
            "bit_equal_share": float((y.view(torch.int16) == ref.view(torch.int16)).float().mean()),
            "max_abs_ref": float(ref.float()[finite].abs().max()) if finite.any() else float("nan")}


# -- the sections ------------------------------------------------------------------------------------------------------
def encode_all(model, dev: str, rate: float) -> tuple[list, dict]:
    layers = []
    for name, shape, lin in linears(model):
        w = lin.weight.detach()
        n, k = w.shape
        try:
            parts = KL.encode(w, KL.capacity(n, k, rate))
            parts, escapes = [parts[p] for p in PARTS], int(parts["ptr"][-1])
        except ValueError:  # more escapes than the budget: the plugin keeps such a layer in bf16, so do we
            hist = KL.exponent_histogram(w)
            parts, escapes = None, KL.escape_count(hist, KL.best_window(hist)[0])
        layers.append({"name": name, "shape": shape, "n": n, "k": k, "w": w, "parts": parts, "escapes": escapes})
    stored = sum(layer_bytes(L) for L in layers)
    weights = sum(L["n"] * L["k"] for L in layers)
    info = {"layers": len(layers), "kept_bf16": [L["name"] for L in layers if L["parts"] is None],
            "weights": weights, "bf16_gb": 2 * weights / 1e9, "stored_gb": stored / 1e9,
            "bits_per_weight": 8 * stored / weights, "size_ratio": stored / (2 * weights),
            "escapes": sum(L["escapes"] for L in layers),
            "escape_rate": sum(L["escapes"] for L in layers) / weights,
            "max_layer_escape_rate": max(L["escapes"] / (L["n"] * L["k"]) for L in layers)}
    return layers, info


def layer_bytes(L) -> int:
    if L["parts"] is None:
        return 2 * L["n"] * L["k"]
    return sum(t.numel() * t.element_size() for t in L["parts"])


def ll_layer(x, L):
    if L["parts"] is None:
        return F.linear(x, L["w"])
    return KL.lossless_linear(x, *L["parts"], None, False)


def check_decode(layers) -> dict:
    bad = []
    for L in (L for L in layers if L["parts"] is not None):
        if not bits_equal(KL.lossless_decode(*L["parts"]), L["w"]):
            bad.append(L["name"])
    checked = sum(1 for L in layers if L["parts"] is not None)
    return {"layers_checked": checked, "layers_bit_exact": checked - len(bad), "mismatched": bad[:10]}


def shape_rows(layers, dev: str, m: int, copy_bw: float, tune: bool, quick: bool, out_rows: list):
    groups: dict[str, list] = {}
    for L in layers:
        if L["parts"] is not None:
            groups.setdefault(L["shape"], []).append(L)
    for shape, group in groups.items():
        n, k = group[0]["n"], group[0]["k"]
        xs = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        bf16_bytes = 2 * n * k
        ll_bytes = sum(t.numel() * t.element_size() for t in group[0]["parts"])

        def bf16():
            ms = graph_ms([lambda L=L: F.linear(xs, L["w"]) for L in group])
            us = 1e3 * ms / len(group)
            return {"us": us, "gb_s": bf16_bytes / us / 1e3, "pct_copy": 100 * bf16_bytes / us / 1e3 / (copy_bw / 1e9)}

        attempt(out_rows, {"section": "shape", "shape": shape, "N": n, "K": k, "M": m, "format": "bf16_cublas",
                           "layers": len(group), "mb": bf16_bytes / 1e6}, bf16)
        kinds = ["gemv"] if m == 1 else (["gemv", "dot"] if m <= 4 else ["dot"])
        if not KL.use_triton(xs):  # CPU without TRITON_INTERPRET=1: the torch reference only
            kinds = ["op"]
        best = None
        for kind in kinds:
            cands = ([None] if (not tune or kind == "op") else
                     (gemv_candidates(quick) if kind == "gemv" else dot_candidates(quick)))
            for cfg in cands:
                def run(kind=kind, cfg=cfg):
                    ms = graph_ms([lambda L=L: ll_call(kind, xs, L["parts"], cfg) for L in group])
                    us = 1e3 * ms / len(group)
                    return {"us": us, "gb_s": ll_bytes / us / 1e3,
                            "pct_copy": 100 * ll_bytes / us / 1e3 / (copy_bw / 1e9)}

                label = {"section": "shape", "shape": shape, "N": n, "K": k, "M": m, "format": f"lossless_{kind}",
                         "config": cfg.as_dict() if cfg else None, "layers": len(group), "mb": ll_bytes / 1e6}
                r = attempt(out_rows, label, run)
                if "us" in r and (best is None or r["us"] < best[0]):
                    best = (r["us"], kind, cfg)
        if best is not None and best[2] is not None:
            KL.TUNED[(device_key(xs.device), KL._m_bucket(m), n, k)] = {"kernel": best[1], **best[2].as_dict()}

        def exactness(best=best):
            L = group[0]
            ref = F.linear(xs, L["w"])
            y = KL.lossless_linear(xs, *L["parts"], None, False)
            exact = KL.lossless_linear(xs, *L["parts"], None, True)
            ref64 = xs.double() @ L["w"].double().T
            ulp = (ref64.abs().clamp(min=1e-30).log2().floor() - 7).exp2()
            return {"fused_vs_cublas": compare(y, ref), "exact_path_bit_identical": bits_equal(exact, ref),
                    "fused_max_ulp_vs_fp64": float(((y.double() - ref64).abs() / ulp).max()),
                    "cublas_max_ulp_vs_fp64": float(((ref.double() - ref64).abs() / ulp).max()),
                    "dispatch": KL.choose(m, n, k, xs.device)[0]}

        attempt(out_rows, {"section": "exactness", "shape": shape, "N": n, "K": k, "M": m}, exactness)


def model_pass(layers, dev: str, m: int, copy_bw: float) -> dict:
    """All linears once (distinct weights), one CUDA graph: ms per pass for bf16 and lossless."""
    xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in {L["k"] for L in layers}}
    bf16_bytes = sum(2 * L["n"] * L["k"] for L in layers)
    ll_bytes = sum(layer_bytes(L) for L in layers)
    t_bf16 = graph_ms([lambda L=L: F.linear(xs[L["k"]], L["w"]) for L in layers], replays=10)
    t_ll = graph_ms([lambda L=L: ll_layer(xs[L["k"]], L) for L in layers], replays=10)
    gbps = lambda b, ms: b / ms / 1e6
    return {"bf16_ms": t_bf16, "lossless_ms": t_ll, "speedup": t_bf16 / t_ll,
            "bf16_gb": bf16_bytes / 1e9, "lossless_gb": ll_bytes / 1e9,
            "bf16_pct_copy": 100 * gbps(bf16_bytes, t_bf16) / (copy_bw / 1e9),
            "lossless_pct_copy": 100 * gbps(ll_bytes, t_ll) / (copy_bw / 1e9),
            "bf16_tok_s_ceiling": m * 1e3 / t_bf16, "lossless_tok_s_ceiling": m * 1e3 / t_ll}


def forward_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def e2e(model, args, copy_bw: float, rows: list, checks: dict):
    from hf_accel.runtime.bench import measure

    dev = args.device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    prompt_ids = torch.randint(10, vocab, (2, args.check_len), generator=g).to(dev)
    one = torch.randint(10, vocab, (1, 1), generator=g).to(dev)
    four = torch.randint(10, vocab, (4, 1), generator=g).to(dev)
    ref = {"prefill": forward_logits(model, prompt_ids), "m1": forward_logits(model, one),
           "m4": forward_logits(model, four)}
    fast = f"fast(compile={'true' if args.compile else 'false'})"
    gen_ids = torch.randint(10, vocab, (4, 16), generator=g).to(dev)

    def greedy(m):
        with torch.no_grad():
            return m.generate(gen_ids, attention_mask=torch.ones_like(gen_ids), max_new_tokens=args.check_tokens,
                              min_new_tokens=args.check_tokens, do_sample=False)

    tokens = {}
    for spec in (fast, f"lossless+{fast}"):
        try:
            hf_accel.apply(model, spec)
        except Exception as e:  # noqa: BLE001
            rows.append({"section": "decode", "mode": spec, "error": f"apply: {type(e).__name__}: {e}"[:400]})
            continue
        if spec.startswith("lossless"):
            def logits_check():
                out = {}
                for key, ids in (("prefill", prompt_ids), ("m1", one), ("m4", four)):
                    y = forward_logits(model, ids)
                    out[key] = {"bit_identical": bits_equal(y, ref[key]), **compare(y, ref[key]),
                                "argmax_equal": bool(torch.equal(y.argmax(-1), ref[key].argmax(-1)))}
                mods = [m for m in model.modules() if type(m).__name__ == "LosslessLinear"]
                for mod in mods:
                    mod.exact = True
                for key, ids in (("m1_exact", one), ("m4_exact", four)):
                    y = forward_logits(model, ids)
                    out[key] = {"bit_identical": bits_equal(y, ref[key[:2]]), **compare(y, ref[key[:2]])}
                for mod in mods:
                    mod.exact = False
                plugin = hf_accel.get_config(model).plugins[0]
                out["sizes"] = plugin.sizes(model)
                out["kept_bf16"] = list(plugin.keep)
                return out

            attempt(rows, {"section": "logits", "mode": spec}, lambda: {"result": logits_check()})
            checks["logits"] = rows[-1].get("result", rows[-1].get("error"))
        try:
            tokens[spec] = greedy(model)
        except Exception as e:  # noqa: BLE001
            checks[f"greedy_error_{spec}"] = f"{type(e).__name__}: {e}"[:300]
        for b in args.batches:
            attempt(rows, {"section": "decode", "mode": spec, "batch": b, "prompt": args.prompt},
                    lambda b=b: measure(model, spec, b, args.prompt, args.new_tokens, repeats=args.repeats,
                                        copy_bw=copy_bw if copy_bw == copy_bw else None))
        hf_accel.remove(model) if not spec.startswith("lossless") else None
    if len(tokens) == 2:
        a, b = tokens.values()
        checks["greedy_lossless_vs_fast"] = {"rows": a.shape[0], "tokens": args.check_tokens,
                                             "identical_rows": int((a == b).all(1).sum()),
                                             "token_agreement": float((a == b).float().mean())}


def reference_section(directory: str, args, checks: dict, rows: list):
    """The trained reference model itself: analysis, bit-exact weights and logits, greedy agreement."""
    from transformers import AutoModelForCausalLM

    dev = args.device
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(dev).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(10, vocab, (4, 64), generator=g).to(dev)
    one = ids[:, :1]
    ref = forward_logits(model, ids)
    ref1 = forward_logits(model, one[:1])
    gen = model.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=32,
                         min_new_tokens=32, do_sample=False)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    hf_accel.apply(model, "lossless")
    plugin = hf_accel.get_config(model).plugins[0]
    report = [{k: v for k, v in r.items() if k != "histogram"} for r in plugin.report]
    exact_w = all(bits_equal(m.dequantize(), originals[n]) for n, m in model.named_modules()
                  if type(m).__name__ == "LosslessLinear")
    y = forward_logits(model, ids)
    y1 = forward_logits(model, one[:1])
    gen2 = model.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=32,
                          min_new_tokens=32, do_sample=False)
    lossless_rows = [r for r in report if r["decision"] == "lossless"]
    out = {"model": directory, "sizes": plugin.sizes(model), "kept_bf16": list(plugin.keep),
           "weights_bit_exact": exact_w, "prefill_logits_bit_identical": bits_equal(y, ref),
           "m1_logits": compare(y1, ref1), "m1_bit_identical": bits_equal(y1, ref1),
           "greedy_identical_rows": int((gen == gen2).all(1).sum()), "greedy_rows": gen.shape[0],
           "mean_escape_rate": statistics.mean(r["escape_rate"] for r in lossless_rows) if lossless_rows else None,
           "max_escape_rate": max((r["escape_rate"] for r in report if "escape_rate" in r), default=None),
           "mean_huffman_bits": statistics.mean(r["huffman_bits_per_weight"] for r in lossless_rows) if lossless_rows else None,
           "layers": report}
    rows.append({"section": "reference", **{k: v for k, v in out.items() if k != "layers"}})
    checks["reference_model"] = out
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()


def summarize(report: dict) -> dict:
    rows = report["rows"]
    s = {"gpu": report["gpu"], "date": report["date"], "command": report["command"], **report["versions"],
         "copy_bandwidth_tb_s": report.get("copy_bandwidth_tb_s"),
         "histogram_source": report.get("histogram", {}).get("source")}
    enc = report.get("encode") or {}
    if "bits_per_weight" in enc:
        s["bits_per_weight_8b"] = round(enc["bits_per_weight"], 4)
        s["size_ratio_8b"] = round(enc["size_ratio"], 4)
        s["size_reduction_pct_8b"] = round(100 * (1 - enc["size_ratio"]), 2)
        s["escape_rate_8b"] = enc["escape_rate"]
    h = report.get("histogram") or {}
    if "huffman_bits_per_weight" in h:
        s["huffman_bits_per_weight"] = round(h["huffman_bits_per_weight"], 3)
    dec = report["checks"].get("decode_bit_exact") or {}
    if dec:
        s["decode_bit_exact_layers"] = f"{dec.get('layers_bit_exact')}/{dec.get('layers_checked')}"
    for r in rows:
        if r.get("section") == "model_pass" and "speedup" in r:
            s[f"weight_pass_speedup_m{r['M']}"] = round(r["speedup"], 3)
            s[f"weight_pass_ms_bf16_m{r['M']}"] = round(r["bf16_ms"], 3)
            s[f"weight_pass_ms_lossless_m{r['M']}"] = round(r["lossless_ms"], 3)
            s[f"weight_pass_lossless_pct_copy_m{r['M']}"] = round(r["lossless_pct_copy"], 1)
    dec_rows = {(r["mode"].split("+")[0] if "+" in r["mode"] else "bf16", r["batch"]): r
                for r in rows if r.get("section") == "decode" and "decode_tok_s" in r}
    for (mode, b), r in dec_rows.items():
        s[f"decode_tok_s_{mode}_bs{b}"] = round(r["decode_tok_s"], 1)
        if mode == "lossless" and ("bf16", b) in dec_rows:
            s[f"decode_speedup_bs{b}"] = round(r["decode_tok_s"] / dec_rows[("bf16", b)]["decode_tok_s"], 3)
    lg = report["checks"].get("logits")
    if isinstance(lg, dict):
        for key in ("prefill", "m1", "m4", "m1_exact", "m4_exact"):
            if key in lg:
                s[f"logits_bit_identical_{key}"] = lg[key]["bit_identical"]
        if "m1" in lg:
            s["logits_max_abs_diff_m1"] = lg["m1"]["max_abs_diff"]
    gr = report["checks"].get("greedy_lossless_vs_fast")
    if gr:
        s["greedy_token_agreement_lossless_vs_fast"] = gr["token_agreement"]
    ref = report["checks"].get("reference_model")
    if isinstance(ref, dict):
        s["reference_size_ratio"] = round(ref["sizes"]["size_ratio"], 4)
        s["reference_prefill_logits_bit_identical"] = ref["prefill_logits_bit_identical"]
        s["reference_weights_bit_exact"] = ref["weights_bit_exact"]
    s["errors"] = sum(1 for r in rows if "error" in r)
    return s


def print_table(report: dict):
    rows = report["rows"]
    lines = ["", "== shape timings (us per call; best lossless config)"]
    best: dict = {}
    for r in rows:
        if r.get("section") == "shape" and "us" in r:
            key = (r["shape"], r["M"], "bf16" if r["format"] == "bf16_cublas" else "lossless")
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    lines.append(f"{'shape':>8} {'M':>3} {'bf16 us':>9} {'%copy':>6} {'ll us':>9} {'%copy':>6} {'kernel':>14} {'x':>6}")
    for (shape, m, fmt), r in sorted(best.items()):
        if fmt != "bf16":
            continue
        ll = best.get((shape, m, "lossless"))
        if ll:
            lines.append(f"{shape:>8} {m:>3} {r['us']:9.2f} {r['pct_copy']:6.1f} {ll['us']:9.2f} {ll['pct_copy']:6.1f} "
                         f"{ll['format'][9:]:>14} {r['us'] / ll['us']:6.2f}")
    lines.append("== model weight pass / decode")
    for r in rows:
        if r.get("section") == "model_pass" and "speedup" in r:
            lines.append(f"pass M={r['M']:>2}: bf16 {r['bf16_ms']:.3f} ms, lossless {r['lossless_ms']:.3f} ms "
                         f"({r['lossless_pct_copy']:.0f}% copy) -> {r['speedup']:.2f}x")
    for r in rows:
        if r.get("section") == "decode":
            if "decode_tok_s" in r:
                lines.append(f"decode {r['mode']:>28} bs={r['batch']:>2}: {r['decode_tok_s']:8.1f} tok/s "
                             f"({r.get('pct_of_limit', float('nan')):.0f}% of limit)")
            else:
                lines.append(f"decode {r.get('mode')} bs={r.get('batch')}: ERROR {r.get('error', '')[:100]}")
    lines.append("== summary")
    for k, v in report["summary"].items():
        lines.append(f"  {k}: {v}")
    print("\n".join(lines), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "bench_lossless.json"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (for a CPU check of the script)")
    ap.add_argument("--reference", help="a trained reference model folder (e.g. $R/base): histogram + its own checks")
    ap.add_argument("--histogram-from", help="folder whose weights give the exponent histogram (default: "
                                             "--reference, else the shipped tiny reference)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--check-len", type=int, default=64)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--max-escape-rate", type=float, default=KL.DEFAULT_MAX_ESCAPE_RATE)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer launch configurations")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--compile", action="store_true", help="fast runtime with torch.compile (slower to warm up)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --smoke")
    t_start = time.perf_counter()
    dev = args.device
    report = {"rows": [], "checks": {}, "versions": versions(),
              "gpu": torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or "cpu"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv),
              "method": "per-shape and whole-pass times: every call reads its own weights (distinct layers), one "
                        "CUDA graph, median of replays; % copy = bytes / time / copy bandwidth (read + write of a "
                        "2 GiB copy, same run); decode tok/s = batch*(N-1)/(t(N)-t(1)) through generate()"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["summary"] = summarize(report)
        report["total_s"] = round(time.perf_counter() - t_start, 1)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    copy_bw = copy_bandwidth(dev)
    report["copy_bandwidth_tb_s"] = copy_bw / 1e12 if copy_bw == copy_bw else None
    log(f"copy bandwidth {report['copy_bandwidth_tb_s']} TB/s")

    hist_dir = Path(args.histogram_from or args.reference or TINY)
    hist, hinfo = reference_histogram(hist_dir)
    hinfo["stated_as"] = ("random weights whose bf16 exponents follow the histogram pooled over the 2-D weights of "
                          f"{hist_dir} (uniform sign and mantissa bits)")
    report["histogram"] = {**hinfo, "counts": {int(e): int(c) for e, c in enumerate(hist.tolist()) if c}}
    save()

    shape = SMOKE if args.smoke else LLAMA3_8B
    t0 = time.perf_counter()
    model = build_model(shape, hist, dev)
    sync(dev)
    report["build_s"] = round(time.perf_counter() - t0, 1)
    log(f"model built in {report['build_s']} s")

    layers = []
    try:
        t0 = time.perf_counter()
        layers, info = encode_all(model, dev, args.max_escape_rate)
        sync(dev)
        info["encode_s"] = round(time.perf_counter() - t0, 1)
        report["encode"] = info
        log("encoded", info)
        report["checks"]["decode_bit_exact"] = check_decode(layers)
    except Exception as e:  # noqa: BLE001
        report["encode"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
    save()

    if layers:
        for m in args.batches:
            shape_rows(layers, dev, m, copy_bw, tune=not args.no_tune, quick=args.quick or dev != "cuda",
                       out_rows=report["rows"])
            save()
        report["tuned"] = [{"key": list(k), **v} for k, v in KL.TUNED.items()]
        for m in args.batches:
            attempt(report["rows"], {"section": "model_pass", "M": m}, lambda m=m: model_pass(layers, dev, m, copy_bw))
            save()
    for L in layers:  # the plugin encodes again below; free these copies
        L["parts"] = None
    layers = None
    if dev == "cuda":
        torch.cuda.empty_cache()

    if not args.no_e2e:
        try:
            e2e(model, args, copy_bw, report["rows"], report["checks"])
        except Exception as e:  # noqa: BLE001
            report["rows"].append({"section": "decode", "error": f"{type(e).__name__}: {e}"[:400],
                                   "trace": traceback.format_exc()[-1500:]})
        save()
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()

    if args.reference:
        attempt(report["rows"], {"section": "reference_run"},
                lambda: reference_section(args.reference, args, report["checks"], report["rows"]) or {})
        save()
    save()
    print_table(report)
    log(f"wrote {args.out} in {report['total_s']} s")


if __name__ == "__main__":
    main()
