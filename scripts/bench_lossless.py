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
PARTS3 = ("sm", "code", "base", "ptr", "esc")
LAYOUTS = ("code4", "code3")


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
    """kind: code4 "gemv" / "dot" / "exact" / "op"; code3 "gemv3" (inline PTX) / "gemv3_plain" / "exact3" / "op3"."""
    if kind == "gemv":
        return KL.ll_gemv(x, *parts, None, cfg)
    if kind == "dot":
        return KL.ll_dot(x, *parts, None, cfg)
    if kind == "exact":
        return F.linear(x, KL.ll_decode(*parts))
    if kind in ("gemv3", "gemv3_plain"):
        return KL.ll3_gemv(x, *parts, None, cfg, asm=kind == "gemv3")
    if kind == "exact3":
        return F.linear(x, KL.ll3_decode(*parts))
    if kind == "op3":
        return KL.lossless3_linear(x, *parts, None, False)
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
def encode_layer(w: torch.Tensor, layout: str, rate: float) -> tuple[str | None, list | None, int]:
    """(layout used, parts, escapes) as the plugin would store the layer with `layout` forced: code3 where it
    applies (K % 8 == 0, K <= 65536, escapes <= MAX_ESCAPE_RATE3), else code4 if its capacity holds, else bf16."""
    n, k = w.shape
    hist = KL.exponent_histogram(w)
    if layout == "code3" and KL.code3_supported(k):
        esc3 = KL.escape_count(hist, KL.best_window(hist, KL.WINDOW3)[0], KL.WINDOW3)
        if esc3 <= KL.MAX_ESCAPE_RATE3 * n * k:
            parts = KL.encode3(w)
            return "code3", [parts[p] for p in PARTS3], int(parts["ptr"][-1])
    try:
        parts = KL.encode(w, KL.capacity(n, k, rate))
        return "code4", [parts[p] for p in PARTS], int(parts["ptr"][-1])
    except ValueError:  # more escapes than the budget: the plugin keeps such a layer in bf16, so do we
        return None, None, KL.escape_count(hist, KL.best_window(hist)[0])


def encode_all(model, dev: str, rate: float, layout: str = "code4") -> tuple[list, dict]:
    layers = []
    for name, shape, lin in linears(model):
        w = lin.weight.detach()
        n, k = w.shape
        used, parts, escapes = encode_layer(w, layout, rate)
        layers.append({"name": name, "shape": shape, "n": n, "k": k, "w": w, "parts": parts, "escapes": escapes,
                       "layout": used})
    stored = sum(layer_bytes(L) for L in layers)
    weights = sum(L["n"] * L["k"] for L in layers)
    info = {"layout": layout, "layers": len(layers), "kept_bf16": [L["name"] for L in layers if L["parts"] is None],
            "code3_layers": sum(1 for L in layers if L["layout"] == "code3"),
            "code4_layers": sum(1 for L in layers if L["layout"] == "code4"),
            "weights": weights, "bf16_gb": 2 * weights / 1e9, "stored_gb": stored / 1e9,
            "bits_per_weight": 8 * stored / weights, "size_ratio": stored / (2 * weights),
            "escapes": sum(L["escapes"] for L in layers),
            "escape_rate": sum(L["escapes"] for L in layers) / weights,
            "max_layer_escape_rate": max(L["escapes"] / (L["n"] * L["k"]) for L in layers),
            "per_shape": per_shape_sizes(layers)}
    return layers, info


def per_shape_sizes(layers) -> dict:
    """bits/weight and escape rate per projection shape (q_o, k_v, gate_up, down, lm_head)."""
    out = {}
    for shape in dict.fromkeys(L["shape"] for L in layers):
        group = [L for L in layers if L["shape"] == shape]
        weights = sum(L["n"] * L["k"] for L in group)
        out[shape] = {"layers": len(group), "bits_per_weight": round(8 * sum(layer_bytes(L) for L in group) / weights, 4),
                      "escape_rate": sum(L["escapes"] for L in group) / weights,
                      "max_escape_rate": max(L["escapes"] / (L["n"] * L["k"]) for L in group)}
    return out


def layer_bytes(L) -> int:
    if L["parts"] is None:
        return 2 * L["n"] * L["k"]
    return sum(t.numel() * t.element_size() for t in L["parts"])


def ll_layer(x, L):
    if L["parts"] is None:
        return F.linear(x, L["w"])
    if L["layout"] == "code3":
        return KL.lossless3_linear(x, *L["parts"], None, False)
    return KL.lossless_linear(x, *L["parts"], None, False)


def decode_layer(L) -> torch.Tensor:
    return (KL.lossless3_decode if L["layout"] == "code3" else KL.lossless_decode)(*L["parts"])


def check_decode(layers) -> dict:
    bad = []
    for L in (L for L in layers if L["parts"] is not None):
        if not bits_equal(decode_layer(L), L["w"]):
            bad.append(L["name"])
    checked = sum(1 for L in layers if L["parts"] is not None)
    return {"layers_checked": checked, "layers_bit_exact": checked - len(bad), "mismatched": bad[:10]}


def gemv3_candidates(quick: bool):
    c = [(32, 128, 4), (16, 128, 2), (8, 256, 4), (16, 64, 2), (64, 64, 4), (8, 128, 1)]
    return [LaunchConfig(block_n=n, block_k=k, num_warps=w) for n, k, w in (c[:3] if quick else c)]


def kernel_kinds(layout: str, m: int, on_triton: bool) -> list[str]:
    if not on_triton:  # CPU without TRITON_INTERPRET=1: the torch reference only
        return ["op3" if layout == "code3" else "op"]
    if layout == "code3":  # the GEMV (inline PTX, and plain Triton at M=1 for the lever's size), decode + cuBLAS
        return ["gemv3", "gemv3_plain"] if m == 1 else (["gemv3"] if m <= 4 else ["gemv3", "exact3"])
    return ["gemv"] if m == 1 else (["gemv", "dot"] if m <= 4 else ["dot"])


def candidates(kind: str, tune: bool, quick: bool):
    if not tune or kind in ("op", "op3", "exact", "exact3"):
        return [None]
    if kind.startswith("gemv3"):
        return gemv3_candidates(quick)
    return gemv_candidates(quick) if kind == "gemv" else dot_candidates(quick)


def shape_rows(layers, dev: str, m: int, copy_bw: float, tune: bool, quick: bool, out_rows: list, layout: str,
               with_bf16: bool = True):
    groups: dict[str, list] = {}
    for L in layers:
        if L["parts"] is not None:
            groups.setdefault(L["shape"], []).append(L)
    for shape, group in groups.items():
        n, k = group[0]["n"], group[0]["k"]
        lay = group[0]["layout"]
        xs = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        bf16_bytes = 2 * n * k
        ll_bytes = sum(t.numel() * t.element_size() for t in group[0]["parts"])

        def bf16():
            ms = graph_ms([lambda L=L: F.linear(xs, L["w"]) for L in group])
            us = 1e3 * ms / len(group)
            return {"us": us, "gb_s": bf16_bytes / us / 1e3, "pct_copy": 100 * bf16_bytes / us / 1e3 / (copy_bw / 1e9)}

        if with_bf16:
            attempt(out_rows, {"section": "shape", "shape": shape, "N": n, "K": k, "M": m, "format": "bf16_cublas",
                               "layers": len(group), "mb": bf16_bytes / 1e6}, bf16)
        best = None
        for kind in kernel_kinds(lay, m, KL.use_triton(xs)):
            for cfg in candidates(kind, tune, quick):
                def run(kind=kind, cfg=cfg):
                    ms = graph_ms([lambda L=L: ll_call(kind, xs, L["parts"], cfg) for L in group])
                    us = 1e3 * ms / len(group)
                    return {"us": us, "gb_s": ll_bytes / us / 1e3,
                            "pct_copy": 100 * ll_bytes / us / 1e3 / (copy_bw / 1e9)}

                label = {"section": "shape", "shape": shape, "N": n, "K": k, "M": m, "layout": lay,
                         "format": f"lossless_{kind}", "config": cfg.as_dict() if cfg else None,
                         "layers": len(group), "mb": ll_bytes / 1e6}
                r = attempt(out_rows, label, run)
                if "us" in r and (best is None or r["us"] < best[0]):
                    best = (r["us"], kind, cfg)
        if best is not None and best[2] is not None:
            key = (device_key(xs.device), KL._m_bucket(m), n, k)
            if lay == "code3":
                KL.TUNED[key + ("code3",)] = best[2].as_dict()
            else:
                KL.TUNED[key] = {"kernel": best[1], **best[2].as_dict()}

        def exactness(best=best, lay=lay):
            L = group[0]
            op = KL.lossless3_linear if lay == "code3" else KL.lossless_linear
            ref = F.linear(xs, L["w"])
            y = op(xs, *L["parts"], None, False)
            exact = op(xs, *L["parts"], None, True)
            ref64 = xs.double() @ L["w"].double().T
            ulp = (ref64.abs().clamp(min=1e-30).log2().floor() - 7).exp2()
            out = {"fused_vs_cublas": compare(y, ref), "exact_path_bit_identical": bits_equal(exact, ref),
                   "fused_max_ulp_vs_fp64": float(((y.double() - ref64).abs() / ulp).max()),
                   "cublas_max_ulp_vs_fp64": float(((ref.double() - ref64).abs() / ulp).max()),
                   "best_kind": best[1] if best else None}
            if lay == "code3" and KL.use_triton(xs):  # the inline PTX computes the plain Triton's bits
                out["ptx_equals_plain_triton"] = bits_equal(KL.ll3_gemv(xs, *L["parts"], None, asm=True),
                                                            KL.ll3_gemv(xs, *L["parts"], None, asm=False))
            else:
                out["dispatch"] = KL.choose(m, n, k, xs.device)[0]
            return out

        attempt(out_rows, {"section": "exactness", "shape": shape, "N": n, "K": k, "M": m, "layout": lay}, exactness)


def model_pass(layer_sets: dict, dev: str, m: int, copy_bw: float) -> dict:
    """All linears once (distinct weights), one CUDA graph: ms per pass for bf16 and each layout."""
    first = next(iter(layer_sets.values()))
    xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in {L["k"] for L in first}}
    gbps = lambda b, ms: b / ms / 1e6
    bf16_bytes = sum(2 * L["n"] * L["k"] for L in first)
    t_bf16 = graph_ms([lambda L=L: F.linear(xs[L["k"]], L["w"]) for L in first], replays=10)
    out = {"bf16_ms": t_bf16, "bf16_gb": bf16_bytes / 1e9, "bf16_pct_copy": 100 * gbps(bf16_bytes, t_bf16) / (copy_bw / 1e9),
           "bf16_tok_s_ceiling": m * 1e3 / t_bf16}
    for layout, layers in layer_sets.items():
        ll_bytes = sum(layer_bytes(L) for L in layers)
        t_ll = graph_ms([lambda L=L: ll_layer(xs[L["k"]], L) for L in layers], replays=10)
        out[layout] = {"ms": t_ll, "speedup": t_bf16 / t_ll, "gb": ll_bytes / 1e9,
                       "pct_copy": 100 * gbps(ll_bytes, t_ll) / (copy_bw / 1e9), "tok_s_ceiling": m * 1e3 / t_ll}
    return out


def forward_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def e2e(model, args, copy_bw: float, rows: list, checks: dict, rebuild):
    """fast, then lossless(layout=code4)+fast, then lossless(layout=code3)+fast on a rebuilt model (the same weights:
    a lossless apply releases the bf16 originals). Rows carry `label` bf16 / code4 / code3."""
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

    def logits_check(model):
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

    tokens = {}
    specs = [("bf16", fast)] + [(lay, f"lossless(layout={lay})+{fast}") for lay in args.layouts]
    for i, (label, spec) in enumerate(specs):
        if i >= 2:  # the previous lossless apply released the bf16 weights: the same model again
            del model
            if dev == "cuda":
                torch.cuda.empty_cache()
            model = rebuild()
        try:
            hf_accel.apply(model, spec)
        except Exception as e:  # noqa: BLE001
            rows.append({"section": "decode", "mode": spec, "label": label,
                         "error": f"apply: {type(e).__name__}: {e}"[:400]})
            continue
        if label != "bf16":
            attempt(rows, {"section": "logits", "mode": spec, "label": label},
                    lambda: {"result": logits_check(model)})
            checks[f"logits_{label}"] = rows[-1].get("result", rows[-1].get("error"))
        try:
            tokens[label] = greedy(model)
        except Exception as e:  # noqa: BLE001
            checks[f"greedy_error_{label}"] = f"{type(e).__name__}: {e}"[:300]
        for b in args.batches:
            attempt(rows, {"section": "decode", "mode": spec, "label": label, "batch": b, "prompt": args.prompt},
                    lambda b=b: measure(model, spec, b, args.prompt, args.new_tokens, repeats=args.repeats,
                                        copy_bw=copy_bw if copy_bw == copy_bw else None))
        if label == "bf16":
            hf_accel.remove(model)
    for label in args.layouts:
        if "bf16" in tokens and label in tokens:
            a, b = tokens["bf16"], tokens[label]
            checks[f"greedy_{label}_vs_fast"] = {"rows": a.shape[0], "tokens": args.check_tokens,
                                                 "identical_rows": int((a == b).all(1).sum()),
                                                 "token_agreement": float((a == b).float().mean())}
    return model


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


def auto_sizes(layer_sets: dict) -> dict:
    """What the plugin's default (layout=auto) stores: per layer the smaller of the two encodings."""
    a, b = layer_sets["code4"], layer_sets["code3"]
    chosen = [min(x, y, key=layer_bytes) for x, y in zip(a, b)]
    weights = sum(L["n"] * L["k"] for L in chosen)
    stored = sum(layer_bytes(L) for L in chosen)
    return {"bits_per_weight": 8 * stored / weights, "size_ratio": stored / (2 * weights),
            "code3_layers": sum(1 for L in chosen if L["layout"] == "code3"),
            "code4_layers": sum(1 for L in chosen if L["layout"] == "code4"),
            "kept_bf16": [L["name"] for L in chosen if L["parts"] is None]}


def summarize(report: dict) -> dict:
    rows = report["rows"]
    s = {"gpu": report["gpu"], "date": report["date"], "command": report["command"], **report["versions"],
         "copy_bandwidth_tb_s": report.get("copy_bandwidth_tb_s"),
         "histogram_source": report.get("histogram", {}).get("source")}
    for layout, enc in (report.get("encode") or {}).items():
        if "bits_per_weight" in enc:
            s[f"bits_per_weight_8b_{layout}"] = round(enc["bits_per_weight"], 4)
            s[f"size_reduction_pct_8b_{layout}"] = round(100 * (1 - enc["size_ratio"]), 2)
            if "escape_rate" in enc:
                s[f"escape_rate_8b_{layout}"] = enc["escape_rate"]
    h = report.get("histogram") or {}
    if "huffman_bits_per_weight" in h:
        s["huffman_bits_per_weight"] = round(h["huffman_bits_per_weight"], 3)
    for layout in LAYOUTS:
        dec = report["checks"].get(f"decode_bit_exact_{layout}") or {}
        if dec:
            s[f"decode_bit_exact_layers_{layout}"] = f"{dec.get('layers_bit_exact')}/{dec.get('layers_checked')}"
    for r in rows:
        if r.get("section") == "model_pass" and "bf16_ms" in r:
            m = r["M"]
            s[f"weight_pass_ms_bf16_m{m}"] = round(r["bf16_ms"], 3)
            for layout in LAYOUTS:
                if layout in r:
                    s[f"weight_pass_speedup_{layout}_m{m}"] = round(r[layout]["speedup"], 3)
                    s[f"weight_pass_ms_{layout}_m{m}"] = round(r[layout]["ms"], 3)
                    s[f"weight_pass_pct_copy_{layout}_m{m}"] = round(r[layout]["pct_copy"], 1)
    dec_rows = {(r["label"], r["batch"]): r for r in rows if r.get("section") == "decode" and "decode_tok_s" in r}
    for (label, b), r in sorted(dec_rows.items()):
        s[f"decode_tok_s_{label}_bs{b}"] = round(r["decode_tok_s"], 1)
        if label != "bf16" and ("bf16", b) in dec_rows:
            s[f"decode_speedup_{label}_bs{b}"] = round(r["decode_tok_s"] / dec_rows[("bf16", b)]["decode_tok_s"], 3)
    for layout in LAYOUTS:
        lg = report["checks"].get(f"logits_{layout}")
        if isinstance(lg, dict):
            for key in ("prefill", "m1", "m4", "m1_exact", "m4_exact"):
                if key in lg:
                    s[f"logits_bit_identical_{layout}_{key}"] = lg[key]["bit_identical"]
            if "m1" in lg:
                s[f"logits_max_abs_diff_{layout}_m1"] = lg["m1"]["max_abs_diff"]
        gr = report["checks"].get(f"greedy_{layout}_vs_fast")
        if gr:
            s[f"greedy_token_agreement_{layout}_vs_fast"] = gr["token_agreement"]
    ptx = [r["ptx_equals_plain_triton"] for r in rows if "ptx_equals_plain_triton" in r]
    if ptx:
        s["code3_ptx_equals_plain_triton"] = f"{sum(ptx)}/{len(ptx)}"
    ref = report["checks"].get("reference_model")
    if isinstance(ref, dict):
        s["reference_size_ratio"] = round(ref["sizes"]["size_ratio"], 4)
        s["reference_code3_layers"] = ref["sizes"].get("code3_layers")
        s["reference_prefill_logits_bit_identical"] = ref["prefill_logits_bit_identical"]
        s["reference_weights_bit_exact"] = ref["weights_bit_exact"]
    s["errors"] = sum(1 for r in rows if "error" in r)
    return s


def print_table(report: dict):
    rows = report["rows"]
    lines = ["", "== shape timings (us per call; best config per kernel)"]
    best: dict = {}
    for r in rows:
        if r.get("section") == "shape" and "us" in r:
            key = (r["shape"], r["M"], r["format"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    lines.append(f"{'shape':>8} {'M':>3} {'kernel':>22} {'us':>9} {'%copy':>6} {'x bf16':>7}")
    for (shape, m, fmt), r in sorted(best.items()):
        ref = best.get((shape, m, "bf16_cublas"))
        x = ref["us"] / r["us"] if ref else float("nan")
        lines.append(f"{shape:>8} {m:>3} {fmt:>22} {r['us']:9.2f} {r['pct_copy']:6.1f} {x:7.2f}")
    lines.append("== model weight pass / decode")
    for r in rows:
        if r.get("section") == "model_pass" and "bf16_ms" in r:
            parts = [f"bf16 {r['bf16_ms']:.3f} ms"] + [
                f"{lay} {r[lay]['ms']:.3f} ms ({r[lay]['pct_copy']:.0f}% copy, {r[lay]['speedup']:.2f}x)"
                for lay in LAYOUTS if lay in r]
            lines.append(f"pass M={r['M']:>2}: " + ", ".join(parts))
    for r in rows:
        if r.get("section") == "decode":
            if "decode_tok_s" in r:
                lines.append(f"decode {r.get('label', ''):>6} bs={r['batch']:>2}: {r['decode_tok_s']:8.1f} tok/s "
                             f"({r.get('pct_of_limit', float('nan')):.0f}% of limit)")
            else:
                lines.append(f"decode {r.get('label')} bs={r.get('batch')}: ERROR {r.get('error', '')[:100]}")
    lines.append("== summary")
    for k, v in report["summary"].items():
        lines.append(f"  {k}: {v}")
    print("\n".join(lines), flush=True)


# -- sizes only (CPU): the numbers in plugins/lossless/NOTES.md -------------------------------------------------------
def layer_sizes(name: str, n: int, k: int, hist: torch.Tensor, rate: float) -> dict:
    """Both layouts' bits/weight and escape rates of one layer from its exponent counts."""
    base4, cov4 = KL.best_window(hist)
    esc4 = KL.escape_count(hist, base4)
    base3, _ = KL.best_window(hist, KL.WINDOW3)
    esc3 = KL.escape_count(hist, base3, KL.WINDOW3)
    bytes4 = KL.format4_bytes(n, k, rate) if esc4 <= KL.capacity(n, k, rate) else None
    bytes3 = (KL.format3_bytes(n, k, esc3)
              if KL.code3_supported(k) and esc3 <= KL.MAX_ESCAPE_RATE3 * n * k else None)
    fits = {lay: b for lay, b in (("code4", bytes4), ("code3", bytes3)) if b is not None}
    auto = min(fits, key=lambda lay: (fits[lay], lay != "code4")) if fits else None
    bits = lambda b: None if b is None else round(8 * b / (n * k), 4)
    return {"layer": name, "shape": [n, k], "escape_rate4": esc4 / (n * k), "escape_rate3": esc3 / (n * k),
            "window3_base": base3, "code4_bits": bits(bytes4), "code3_bits": bits(bytes3), "auto": auto,
            "bytes": {"code4": bytes4, "code3": bytes3, "bf16": 2 * n * k}}


def totals(rows: list) -> dict:
    """bits/weight of the whole set for code4 only, code3 where it applies (else code4), and auto (the smaller)."""
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    out = {}
    for policy in ("code4", "code3", "auto"):
        total = 0
        for r in rows:
            b = r["bytes"]
            pick = r["auto"] if policy == "auto" else (policy if b[policy] is not None else "code4")
            total += b[pick] if pick and b[pick] is not None else b["bf16"]
        out[policy] = {"bits_per_weight": round(8 * total / weights, 4),
                       "size_reduction_pct": round(100 * (1 - total / (2 * weights)), 2)}
    out["weights"] = weights
    out["escape_rate3"] = sum(r["escape_rate3"] * r["shape"][0] * r["shape"][1] for r in rows) / weights
    return out


def synthetic_sizes(shape: dict, hist: torch.Tensor, rate: float, seed: int = 0) -> list:
    """Per linear of the shape: exponent counts drawn as the model's i.i.d. weights would give (a multinomial
    over the histogram; the same distribution as building the model), then both layouts' sizes."""
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    p = (hist.double() / hist.sum()).numpy()
    rng = np.random.default_rng(seed)
    rows = []
    for name, _, lin in linears(model):
        n, k = lin.weight.shape
        counts = torch.from_numpy(rng.multinomial(n * k, p)).to(torch.int64)
        rows.append(layer_sizes(name, n, k, counts, rate))
    return rows


def reference_sizes(directory: Path, rate: float) -> list:
    """Per linear of a trained model, its own exponent statistics (bf16 cast); tied lm_heads are skipped."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    embed = model.get_input_embeddings().weight
    rows = []
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and m.weight is not embed:
            n, k = m.weight.shape
            rows.append(layer_sizes(name, n, k, KL.exponent_histogram(m.weight.detach()), rate))
    return rows


def sizes_only(args, hist: torch.Tensor, hinfo: dict) -> dict:
    out = {"command": "python " + " ".join(sys.argv), "histogram": hinfo, "max_escape_rate": args.max_escape_rate,
           "max_escape_rate3": KL.MAX_ESCAPE_RATE3}
    shape = SMOKE if args.smoke else LLAMA3_8B
    syn = synthetic_sizes(shape, hist, args.max_escape_rate)
    out["synthetic_8b"] = {"totals": totals(syn), "per_shape": shape_summary(syn), "layers": syn}
    out["references"] = {}
    for d in dict.fromkeys([str(TINY)] + ([args.reference] if args.reference else [])):
        rows = reference_sizes(Path(d), args.max_escape_rate)
        out["references"][d] = {"totals": totals(rows), "layers": rows}
    out["summary"] = sizes_summary(out)
    return out


def sizes_summary(out: dict) -> dict:
    """The headline size figures (bits per weight and % smaller than bf16, per layout) with the run's facts."""
    s = {"command": out["command"], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "versions": {"torch": torch.__version__, "python": platform.python_version()}, "gpu": None}
    named = {"8b": out["synthetic_8b"]["totals"]}
    named.update({Path(d).name: r["totals"] for d, r in out["references"].items()})
    for name, tot in named.items():
        for layout in ("code4", "code3", "auto"):
            s[f"bits_per_weight_{name}_{layout}"] = tot[layout]["bits_per_weight"]
            s[f"size_reduction_pct_{name}_{layout}"] = tot[layout]["size_reduction_pct"]
    return s


def shape_summary(rows: list) -> dict:
    out = {}
    for r in rows:
        key = SHAPE_NAMES[r["layer"].rsplit(".", 1)[-1]]
        out.setdefault(key, []).append(r)
    return {key: {"layers": len(g), "shape": g[0]["shape"], **{f: round(statistics.mean(r[f] for r in g), 6) for f in
                  ("escape_rate4", "escape_rate3")}, "max_escape_rate3": max(r["escape_rate3"] for r in g),
                  "code4_bits": g[0]["code4_bits"], "code3_bits_mean": round(statistics.mean(
                      r["code3_bits"] for r in g if r["code3_bits"] is not None), 4) if any(
                      r["code3_bits"] is not None for r in g) else None,
                  "auto": sorted({str(r["auto"]) for r in g})} for key, g in out.items()}


def print_sizes(out: dict):
    t = out["synthetic_8b"]["totals"]
    lines = [f"== 8B shape, exponents from {out['histogram']['source']} ({t['weights'] / 1e9:.2f} G weights)"]
    for key, g in out["synthetic_8b"]["per_shape"].items():
        lines.append(f"  {key:>8} x{g['layers']:<3} {str(g['shape']):>15}: escapes code4 {g['escape_rate4']:.2e}, code3 "
                     f"{g['escape_rate3']:.4f} (max {g['max_escape_rate3']:.4f}); bits code4 {g['code4_bits']}, "
                     f"code3 {g['code3_bits_mean']}; auto {','.join(g['auto'])}")
    for policy in ("code4", "code3", "auto"):
        lines.append(f"  total {policy:>5}: {t[policy]['bits_per_weight']:.4f} bits/weight, "
                     f"{t[policy]['size_reduction_pct']:.2f}% smaller than bf16")
    for d, ref in out["references"].items():
        lines.append(f"== {d} (its own layers)")
        for r in ref["layers"]:
            lines.append(f"  {r['layer']:<36} {str(r['shape']):>12} escapes code4 {r['escape_rate4']:.2e} code3 "
                         f"{r['escape_rate3']:.4f}; bits code4 {r['code4_bits']} code3 {r['code3_bits']} -> {r['auto']}")
        for policy in ("code4", "code3", "auto"):
            lines.append(f"  total {policy:>5}: {ref['totals'][policy]['bits_per_weight']:.4f} bits/weight, "
                         f"{ref['totals'][policy]['size_reduction_pct']:.2f}% smaller")
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
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--sizes-only", action="store_true",
                    help="CPU, seconds: bits/weight and escape rates per layer of the 8B shape for both layouts, "
                         "from per-layer exponent counts drawn from the histogram (no weights, no kernels), and of "
                         "the reference models' own layers; then exit")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer launch configurations")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--compile", action="store_true", help="fast runtime with torch.compile (slower to warm up)")
    args = ap.parse_args()
    if args.sizes_only:
        args.device = "cpu"
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
    if args.sizes_only:
        out = sizes_only(args, hist, report["histogram"])
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
        print_sizes(out)
        log(f"wrote {args.out}")
        return
    save()

    shape = SMOKE if args.smoke else LLAMA3_8B
    t0 = time.perf_counter()
    model = build_model(shape, hist, dev)
    sync(dev)
    report["build_s"] = round(time.perf_counter() - t0, 1)
    log(f"model built in {report['build_s']} s")

    layer_sets: dict[str, list] = {}
    report["encode"] = {}
    for layout in args.layouts:
        try:
            t0 = time.perf_counter()
            layers, info = encode_all(model, dev, args.max_escape_rate, layout)
            sync(dev)
            info["encode_s"] = round(time.perf_counter() - t0, 1)
            report["encode"][layout] = info
            log("encoded", {k: v for k, v in info.items() if k != "per_shape"})
            report["checks"][f"decode_bit_exact_{layout}"] = check_decode(layers)
            layer_sets[layout] = layers
        except Exception as e:  # noqa: BLE001
            report["encode"][layout] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        save()
    if len(layer_sets) == 2:
        report["encode"]["auto"] = auto_sizes(layer_sets)
    save()

    if layer_sets:
        for m in args.batches:
            for i, (layout, layers) in enumerate(layer_sets.items()):
                shape_rows(layers, dev, m, copy_bw, tune=not args.no_tune, quick=args.quick or dev != "cuda",
                           out_rows=report["rows"], layout=layout, with_bf16=i == 0)
            save()
        report["tuned"] = [{"key": list(k), **v} for k, v in KL.TUNED.items()]
        for m in args.batches:
            attempt(report["rows"], {"section": "model_pass", "M": m},
                    lambda m=m: model_pass(layer_sets, dev, m, copy_bw))
            save()
    for layers in layer_sets.values():  # the plugin encodes again below; free these copies
        for L in layers:
            L["parts"] = None
    layer_sets = None
    if dev == "cuda":
        torch.cuda.empty_cache()

    if not args.no_e2e:
        try:
            model = e2e(model, args, copy_bw, report["rows"], report["checks"],
                        rebuild=lambda: build_model(shape, hist, dev))
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
