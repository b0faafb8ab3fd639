#!/usr/bin/env python
"""Diffusion caches: speed on full-size model shapes (GPU) and quality on the trained digits reference.

    python scripts/bench_diffusers.py --part gpu      # H100/H200: SD1.5-shaped UNet pipeline, FLUX-shaped transformer
    python scripts/bench_diffusers.py --part digits   # any device: PSNR/SSIM vs uncached + classifier accuracy
    python scripts/bench_diffusers.py --part digits-quant  # any device: W8A8, joint cache+quant calibration, ToMe
    python scripts/bench_diffusers.py --part gpu --smoke   # the gpu part's code paths with tiny shapes (CPU, seconds)

With $OUT set (the device run), the JSON goes to $OUT/bench_diffusers.json (rows of benchmarks/results kept for the
other parts), else it updates benchmarks/results/bench_diffusers.json. A short table is printed last.

Each part replaces its own rows in benchmarks/results/bench_diffusers.json (raw rows + top-level `summary`).

gpu part. Random weights (no Hub access), bf16, built on the meta device and materialised on the GPU.
* `sd15`: StableDiffusionPipeline with the SD1.5 UNet2DConditionModel and VAE configs, 512x512, 50 DDIM steps,
  guidance 7.5 (cond + uncond in one batch of 2); prompt embeddings are random tensors (no text encoder).
* `flux`: FluxTransformer2DModel with the FLUX.1-dev config (19 double + 38 single blocks, 12B parameters) in a
  flow-matching Euler loop, 1024x1024 (4096 image + 512 text tokens), 28 steps, guidance-distilled (one call per
  step), no VAE. If the full model cannot be built, a reduced depth is used and the rows say so (`flux_layers`).
Rows: baseline, each hf_accel cache, ToMe (sd15), W8A8 int8/fp8 alone and with a cache (after the float rows: the
rewrite is irreversible, so the denoiser is rebuilt with the same seed per format), and diffusers' own FirstBlockCache /
FasterCache / TaylorSeer hooks (flux; tried on sd15 too, a refusal is recorded as the row's error). Before the models:
the copy bandwidth and the 8-bit GEMMs on the models' shapes (`kernels` rows: bf16 vs W8A8 TFLOP/s, quantizer GB/s).
Quality in this part is measured against the uncached output of the same random model (image PSNR for sd15, latent
PSNR over the reference's range for flux): it shows how much each cache changes the computation, not image quality.

digits-quant part: the same reference with w8a8 (int8, fp8) alone, with deepcache, and w8a8+fbcache calibrated jointly
(`diffusion_calibrate(accel="w8a8...", target_psnr=30)`: threshold searched on the quantized denoiser against the
plain pipeline); ToMe has no self-attention transformer block to act on in this UNet2DModel (recorded as such).

digits part: the shipped digits reference (hf_accel/quality/assets/digits, a trained class-conditional UNet2DModel),
n images from fixed seeds, 50 DDIM steps: PSNR/SSIM against the uncached images and classifier accuracy; fbcache
with its threshold chosen by `diffusion_calibrate(target_psnr=...)` on separate seeds. Writes a PNG grid.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def versions() -> dict:
    import diffusers
    import transformers

    import hf_accel

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "hf_accel": hf_accel.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    for mod in ("triton", "huggingface_hub"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- building full-size random models --------------------------------------------------------------------------------
@torch.no_grad()
def materialise(cls, config: dict, device, dtype):
    """Build on meta, allocate on `device` in `dtype`, fill with a plain random init (normal(0, 0.02) matrices,
    zero biases, unit norm weights) seeded for repeatability."""
    with torch.device("meta"):
        model = cls(**config).to(dtype)
    model = model.to_empty(device=device)  # allocates in `dtype` directly: no float32 copy of a 12B model
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.normal_(0.0, min(0.02, 1.0 / math.sqrt(fan_in)), generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    for name, b in model.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            b.zero_()
    return model.eval().requires_grad_(False)


SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
TINY = {  # --tiny: the same code paths on CPU in seconds (for checking the script)
    "unet": dict(SD15_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                 norm_num_groups=8, attention_head_dim=4),
    "vae": dict(SD15_VAE, block_out_channels=(8, 8, 16, 16), norm_num_groups=8, sample_size=64),
    "flux": dict(FLUX_DEV, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
}


def psnr(test: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    test, ref = test.double().cpu(), ref.double().cpu()
    rng = data_range if data_range is not None else float(ref.max() - ref.min())
    mse = float((test - ref).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)


def timed(fn, repeats: int):
    """Median seconds of `repeats` calls (after the caller's warm-up): CUDA events on the GPU, perf_counter else.
    (A true median: session 8 took the upper of two runs, and its SD1.5 baseline's runs were 2.71 and 1.72 s.)"""
    times, out = [], None
    for _ in range(repeats):
        sync()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
    return out, statistics.median(times), times


def quiet_remove(obj):
    import warnings

    import hf_accel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # w8a8 stays (a weight rewrite); the caches and ToMe go
        hf_accel.remove(obj)


CACHES = ("deepcache", "fbcache", "fora")


def cache_name(obj) -> str | None:
    import hf_accel

    return next((n for n in hf_accel.get_config(obj).names if n in CACHES), None)


# -- bandwidth and the 8-bit GEMMs ------------------------------------------------------------------------------------
def bench_kernels(args, device, dtype, rows, extra):
    """Copy bandwidth, and per model shape: bf16 F.linear vs the W8A8 op (int8, fp8), and the activation quantizer
    alone (memory-bound: GB/s as % of the copy bandwidth)."""
    from hf_accel.kernels.w8a8_act import quantize_tokens, w8a8_linear
    from hf_accel.plugins.quantization.w8a8_diffusion import quantize_weight

    cuda = device == "cuda"
    if cuda:
        from triton.testing import do_bench

        bench = lambda f: do_bench(f, warmup=25, rep=100) / 1000  # noqa: E731  (seconds, mean after warm-up)
    else:
        def bench(f):
            f()
            _, t, _ = timed(f, 3)
            return t
    n = (1 << 30) if cuda else (1 << 22)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    copy_gbs = 2 * n / t / 1e9
    extra["copy_bandwidth_gbs"] = copy_gbs
    rows.append({"model": "kernels", "method": "copy", "bytes": n, "gbs": copy_gbs})
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")
    del a, b
    shapes = [("sd15 attn proj 64x64 latent, cfg", 8192, 320, 320), ("sd15 ff 64x64", 8192, 320, 2560),
              ("sd15 ff 32x32", 2048, 640, 5120), ("flux qkv", 4608, 3072, 9216), ("flux mlp up", 4608, 3072, 12288),
              ("flux mlp down", 4608, 12288, 3072)]
    if args.tiny:
        shapes = [(name, m // 64, k // 16, nn // 16) for name, m, k, nn in shapes[:2]]
    g = torch.Generator(device=device).manual_seed(0)
    for name, m, k, nn in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
        w = torch.randn(nn, k, device=device, dtype=dtype, generator=g) * 0.02
        flop = 2 * m * k * nn
        row = {"model": "kernels", "method": "gemm", "shape": name, "m": m, "k": k, "n": nn}
        try:
            t_bf = bench(lambda: torch.nn.functional.linear(x, w))
            row.update(bf16_s=t_bf, bf16_tflops=flop / t_bf / 1e12)
            for fmt in ("int8", "fp8"):
                q, s = quantize_weight(w, fmt)
                t_q = bench(lambda: w8a8_linear(x, q, s, None, fmt))
                t_act = bench(lambda: quantize_tokens(x, fmt))
                moved = m * k * (x.element_size() + 1) + 4 * m
                row.update({f"{fmt}_s": t_q, f"{fmt}_tflops": flop / t_q / 1e12, f"{fmt}_speedup": t_bf / t_q,
                            f"{fmt}_quantizer_s": t_act, f"{fmt}_quantizer_gbs": moved / t_act / 1e9,
                            f"{fmt}_quantizer_pct_of_copy": 100 * moved / t_act / 1e9 / copy_gbs})
            log(f"gemm {name}: bf16 {row['bf16_tflops']:.0f} TFLOP/s, int8 {row['int8_speedup']:.2f}x, "
                f"fp8 {row['fp8_speedup']:.2f}x; quantizer {row['int8_quantizer_pct_of_copy']:.0f}% of copy")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"gemm {name}: FAILED {row['error']}")
        rows.append(row)
        del x, w



# -- gpu part -------------------------------------------------------------------------------------------------------
def bench_sd15(args, device, dtype, rows):
    import hf_accel
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from hf_accel.plugins.diffusion_cache import cache_stats

    cfg_u, cfg_v = (TINY["unet"], TINY["vae"]) if args.tiny else (SD15_UNET, SD15_VAE)
    unet = materialise(UNet2DConditionModel, cfg_u, device, dtype)
    vae = materialise(AutoencoderKL, cfg_v, device, dtype)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(0)
    ctx_dim = cfg_u["cross_attention_dim"]
    pe = torch.randn(1, 77, ctx_dim, generator=g).to(device, dtype)
    ne = torch.randn(1, 77, ctx_dim, generator=g).to(device, dtype) * 0.5
    size = 64 if args.tiny else 512
    steps = 4 if args.tiny else args.sd_steps

    def run(n_steps=steps):
        with torch.no_grad():
            return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size, guidance_scale=7.5,
                        num_inference_steps=n_steps, generator=torch.Generator("cpu").manual_seed(1),
                        output_type="pt").images.float().cpu()

    run()  # a whole run first: every ratio divides by this baseline (clocks, allocator and cuDNN settle)
    ref, t_ref, times = timed(run, args.repeats)
    log(f"sd15 baseline {t_ref:.3f}s (runs {', '.join(f'{t:.3f}' for t in times)})")
    base = {"model": "sd15", "size": size, "steps": steps, "guidance_scale": 7.5, "batch": 2}
    rows.append({**base, "method": "baseline", "spec": "", "seconds": t_ref, "times": times, "speedup": 1.0,
                 "psnr_vs_uncached": math.inf, "full_calls": steps, "calls": steps})
    specs = ["deepcache(interval=2, depth=1)", "deepcache(interval=3, depth=1)", "deepcache(interval=4, depth=1)",
             "deepcache(interval=5, depth=1)", "deepcache(interval=3, depth=0)", "deepcache(interval=4, depth=0)",
             "fbcache(threshold=0.1)", "fbcache(threshold=0.2)"]
    for spec in specs:
        if time.perf_counter() - T0 > args.budget:
            log("time budget reached, skipping", spec)
            continue
        hf_accel.apply(pipe, spec)
        run(3)
        stats = cache_stats(pipe, spec.split("(")[0])
        c0, f0 = stats.calls, stats.full
        out, t, times = timed(run, args.repeats)
        calls, full = (stats.calls - c0) // args.repeats, (stats.full - f0) // args.repeats
        rows.append({**base, "method": spec.split("(")[0], "spec": spec, "seconds": t, "times": times,
                     "speedup": t_ref / t, "psnr_vs_uncached": psnr(out, ref, 1.0), "full_calls": full,
                     "calls": calls})
        log(f"sd15 {spec}: {t:.3f}s {t_ref / t:.2f}x psnr {rows[-1]['psnr_vs_uncached']:.2f} full {full}/{calls}")
        hf_accel.remove(pipe)
        assert torch.equal(run(2), run(2))

    def variant(method, spec, label=None):
        """One row: apply `spec` (a string, or a diffusers cache config), warm up, time, remove what is removable."""
        if time.perf_counter() - T0 > args.budget:
            log("time budget reached, skipping", label or spec)
            return
        label = label or spec
        row = {**base, "method": method, "spec": label}
        builtin = not isinstance(spec, str)
        try:
            if builtin:
                pipe.unet.enable_cache(spec)
            elif spec:
                hf_accel.apply(pipe, spec)
            run(3)
            name = None if builtin else cache_name(pipe)
            stats = cache_stats(pipe, name) if name else None
            c0, f0 = (stats.calls, stats.full) if stats else (0, 0)
            out, t, times = timed(run, args.repeats)
            row.update(seconds=t, times=times, speedup=t_ref / t, psnr_vs_uncached=psnr(out, ref, 1.0))
            if stats:
                row.update(full_calls=(stats.full - f0) // args.repeats, calls=(stats.calls - c0) // args.repeats)
            log(f"sd15 {label}: {t:.3f}s {t_ref / t:.2f}x psnr {row['psnr_vs_uncached']:.2f}")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"sd15 {label}: FAILED {row['error']}")
        finally:
            rows.append(row)
            if builtin:
                try:
                    pipe.unet.disable_cache()
                except Exception:
                    pass
            else:
                quiet_remove(pipe)

    variant("tome", "tome(ratio=0.5)")
    variant("tome+deepcache", "tome(ratio=0.5)+deepcache(interval=3, depth=1)")
    try:
        from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

        variant("diffusers_fbc", FirstBlockCacheConfig(threshold=0.2), "FirstBlockCacheConfig(threshold=0.2)")
        variant("diffusers_taylorseer", TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=3),
                "TaylorSeerCacheConfig(cache_interval=3)")
    except ImportError as e:
        rows.append({**base, "method": "diffusers_builtin", "spec": "", "error": f"ImportError: {e}"})
    for fmt in args.formats:  # W8A8 rewrites the UNet: rebuild it (same seed, same weights) for each format
        if time.perf_counter() - T0 > args.budget:
            break
        pipe.unet = None
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        pipe.unet = unet = materialise(UNet2DConditionModel, cfg_u, device, dtype)
        hf_accel.apply(pipe, f"w8a8(format={fmt})")
        w8 = f"w8a8(format={fmt})"
        variant("w8a8", "", w8)
        for cache in ("deepcache(interval=3, depth=1)", "deepcache(interval=4, depth=0)", "fbcache(threshold=0.2)"):
            variant("w8a8+" + cache.split("(")[0], cache, f"{w8}+{cache}")
        variant("w8a8+tome+deepcache", "tome(ratio=0.5)+deepcache(interval=3, depth=1)",
                f"{w8}+tome(ratio=0.5)+deepcache(interval=3, depth=1)")
    del pipe, unet, vae
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def bench_flux(args, device, dtype, rows):
    import hf_accel
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, TaylorSeerCacheConfig
    from hf_accel.plugins.diffusion_cache import cache_stats

    config = TINY["flux"] if args.tiny else dict(FLUX_DEV)
    try:
        model = materialise(FluxTransformer2DModel, config, device, dtype)
    except torch.OutOfMemoryError:
        config.update(num_layers=6, num_single_layers=12)
        torch.cuda.empty_cache()
        model = materialise(FluxTransformer2DModel, config, device, dtype)
    layers = f"{config['num_layers']}+{config['num_single_layers']}"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"flux built: {layers} blocks, {n_params / 1e9:.2f}B params")
    side = 8 if args.tiny else 64  # packed latent side: 1024 px / 8 (VAE) / 2 (packing)
    n_txt = 8 if args.tiny else 512
    steps = 4 if args.tiny else args.flux_steps
    g = torch.Generator("cpu").manual_seed(0)
    x0 = torch.randn(1, side * side, config["in_channels"], generator=g).to(device, dtype)
    ehs = torch.randn(1, n_txt, config["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype)
    img_ids = torch.zeros(side * side, 3, device=device)
    img_ids[:, 1] = torch.arange(side * side, device=device) // side
    img_ids[:, 2] = torch.arange(side * side, device=device) % side
    txt_ids = torch.zeros(n_txt, 3, device=device)
    guidance = torch.full((1,), 3.5, device=device, dtype=dtype)
    now = {"t": 1000.0}

    def run(n_steps=steps):
        sigmas = torch.linspace(1.0, 1.0 / n_steps, n_steps).tolist() + [0.0]
        x = x0.clone()
        with torch.no_grad():
            for i in range(n_steps):
                now["t"] = sigmas[i] * 1000
                with model.cache_context("cond"):
                    v = model(x, encoder_hidden_states=ehs, pooled_projections=pooled,
                              timestep=torch.full((1,), sigmas[i], device=device, dtype=dtype), img_ids=img_ids,
                              txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
                x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x.float().cpu()

    def reset_builtin():
        if hasattr(model, "_reset_stateful_cache"):
            model._reset_stateful_cache()

    run()  # a whole run first, as for sd15
    ref, t_ref, times = timed(run, args.flux_repeats)
    log(f"flux baseline {t_ref:.3f}s (runs {', '.join(f'{t:.3f}' for t in times)})")
    base = {"model": "flux", "flux_layers": layers, "params_b": n_params / 1e9, "tokens": side * side + n_txt,
            "steps": steps, "batch": 1}
    rows.append({**base, "method": "baseline", "spec": "", "seconds": t_ref, "times": times, "speedup": 1.0,
                 "psnr_vs_uncached": math.inf})
    # First-block thresholds: both first-block caches compare mean|r - r_ref| / mean|r_ref| of the first block's
    # residual against the last computed step, so one set of thresholds serves both. Random weights change that
    # signal much more per step than trained ones, so the thresholds are taken at quantiles of the signal measured
    # in one uncached run (threshold 0), which also records the trajectory that fbcache's correction is fitted on.
    from hf_accel.plugins.diffusion_cache import _hooks as H
    from hf_accel.plugins.diffusion_cache.calibrate import _fit

    hf_accel.apply(model, "fbcache(threshold=0)")
    ctl = H.controller_of(model, "fbcache")
    ctl.trace = []
    run()
    diffs = sorted(d for _, d in ctl.stats.diffs)
    cal = dict(zip(("cal_timesteps", "cal_scale", "cal_offset"), _fit(ctl.trace)))
    hf_accel.remove(model)
    qs = sorted({round(diffs[int(q * (len(diffs) - 1))] * 1.0001, 4) for q in (0.5, 0.7)})
    log(f"first-block signal per step: min {diffs[0]:.3f} median {diffs[len(diffs) // 2]:.3f} max {diffs[-1]:.3f}; "
        f"thresholds {qs}")
    variants = [("fora", "fora(interval=2)"), ("fora", "fora(interval=3)"), ("fora", "fora(interval=4)")]
    variants += [("fbcache", {"fbcache": dict(threshold=q, correction=False)}) for q in qs]
    variants += [("fbcache", {"fbcache": dict(threshold=q, **cal)}) for q in qs]
    variants += [("diffusers_fbc", FirstBlockCacheConfig(threshold=q)) for q in qs]
    variants += [
                ("diffusers_fastercache", FasterCacheConfig(
                    spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                    current_timestep_callback=lambda: now["t"], attention_weight_callback=lambda _: 0.3,
                    is_guidance_distilled=True, tensor_format="BCHW")),
                ("diffusers_taylorseer", TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=3)),
                ("diffusers_taylorseer", TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3))]
    for method, spec in variants:
        if time.perf_counter() - T0 > args.budget:
            log("time budget reached, skipping", method)
            continue
        ours = isinstance(spec, (str, dict))
        if isinstance(spec, dict):
            o = spec["fbcache"]
            label = f"fbcache(threshold={o['threshold']}, " + (
                "correction=False)" if o.get("correction") is False else "calibrated correction)")
        label = (spec if isinstance(spec, str) else label) if ours else repr(spec).split("(")[0] + "(" + ", ".join(
            f"{k}={v}" for k, v in vars(spec).items() if k in ("threshold", "cache_interval", "spatial_attention_block_skip_range")) + ")"
        try:
            if ours:
                hf_accel.apply(model, spec)
                stats = cache_stats(model, method)
            else:
                model.enable_cache(spec)
            run(2)
            reset_builtin()
            if ours:
                c0, f0 = stats.calls, stats.full
            out, t, times = timed(lambda: (reset_builtin(), run())[1], args.flux_repeats)
            row = {**base, "method": method + ("_corrected" if isinstance(spec, dict) and
                                               spec["fbcache"].get("cal_timesteps") else ""), "spec": label, "seconds": t, "times": times, "speedup": t_ref / t,
                   "psnr_vs_uncached": psnr(out, ref), "rel_l2": float((out - ref).norm() / ref.norm())}
            if ours:
                row.update(full_calls=(stats.full - f0) // args.flux_repeats,
                           calls=(stats.calls - c0) // args.flux_repeats)
            rows.append(row)
            log(f"flux {label}: {t:.3f}s {t_ref / t:.2f}x psnr {row['psnr_vs_uncached']:.2f}")
        except Exception as e:  # a built-in that cannot run here is a result too
            rows.append({**base, "method": method, "spec": label, "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"flux {label}: FAILED {type(e).__name__}: {e}")
        finally:
            if ours:
                hf_accel.remove(model)
            elif getattr(model, "_cache_config", None) is not None:
                model.disable_cache()

    # W8A8: rewrites the transformer, so it comes after the float rows; rebuilt (same seed) for each format
    for fmt in args.formats:
        if time.perf_counter() - T0 > args.budget:
            log("time budget reached, skipping w8a8", fmt)
            break
        w8 = f"w8a8(format={fmt})"
        try:
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            model = materialise(FluxTransformer2DModel, config, device, dtype)
            hf_accel.apply(model, w8)
        except Exception as e:
            rows.append({**base, "method": "w8a8", "spec": w8, "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"flux {w8}: FAILED {e}")
            continue
        for cache in ("", "fora(interval=3)", "fora(interval=2)"):
            if time.perf_counter() - T0 > args.budget:
                log("time budget reached, skipping", w8, cache)
                continue
            label = w8 + ("+" + cache if cache else "")
            row = {**base, "method": "w8a8" + ("+fora" if cache else ""), "spec": label}
            try:
                if cache:
                    hf_accel.apply(model, cache)
                run(2)
                out, t, times = timed(run, args.flux_repeats)
                row.update(seconds=t, times=times, speedup=t_ref / t, psnr_vs_uncached=psnr(out, ref),
                           rel_l2=float((out - ref).norm() / ref.norm()))
                log(f"flux {label}: {t:.3f}s {t_ref / t:.2f}x psnr {row['psnr_vs_uncached']:.2f}")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                log(f"flux {label}: FAILED {row['error']}")
            finally:
                rows.append(row)
                quiet_remove(model)


# -- digits part -------------------------------------------------------------------------------------------------
def bench_digits(args, rows, extra):
    import hf_accel
    from hf_accel.plugins.diffusion_cache import cache_stats, diffusion_calibrate
    from hf_accel.quality.diffusion import classifier_accuracy, generate, load_digits_reference, psnr as psnr_img, ssim

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref_pipe, clf = load_digits_reference(device=device)
    steps, n = args.digits_steps, args.digits_n
    ref, labels = generate(ref_pipe, n, seed=1000, steps=steps)
    acc_ref = classifier_accuracy(ref, labels, clf)
    base = {"model": "digits", "n": n, "steps": steps, "seed": 1000, "device": device}
    rows.append({**base, "method": "baseline", "spec": "", "psnr": math.inf, "ssim": 1.0, "accuracy": acc_ref})
    pipe, _ = load_digits_reference(device=device)
    cal_rows = {}
    for target in args.targets:
        hf_accel.apply(pipe, "fbcache")
        res = diffusion_calibrate(pipe, target_psnr=target, labels=[i % 10 for i in range(args.cal_n)], steps=steps,
                                  seed=0)
        cal_rows[target] = {"threshold": res.threshold, "met": res.met, "search": res.rows}
        log(f"calibrated fbcache for {target} dB: threshold {res.threshold} (cal psnr {res.psnr:.2f}, "
            f"step speedup {res.step_speedup:.2f})")
        spec = hf_accel.get_config(pipe).to_string()
        hf_accel.remove(pipe)
        cal_rows[target]["spec"] = spec
    extra["calibration"] = cal_rows
    specs = [f"deepcache(interval={i}, depth={d})" for d in args.depths for i in args.intervals]
    specs += [v["spec"] for v in cal_rows.values()]
    specs += [s.replace("correction=true", "correction=false") for s in (v["spec"] for v in cal_rows.values())]
    images = {"baseline": ref}
    for spec in dict.fromkeys(specs):
        hf_accel.apply(pipe, spec)
        name = hf_accel.get_config(pipe).names[0]
        stats = cache_stats(pipe, name)
        c0, f0 = stats.calls, stats.full
        test, _ = generate(pipe, n, seed=1000, steps=steps)
        calls, full = stats.calls - c0, stats.full - f0
        hf_accel.remove(pipe)
        rows.append({**base, "method": name, "spec": spec, "psnr": float(psnr_img(test, ref).mean()),
                     "ssim": float(ssim(test, ref).mean()), "accuracy": classifier_accuracy(test, labels, clf),
                     "full_calls": full, "calls": calls, "step_speedup": calls / max(full, 1)})
        images[spec] = test
        r = rows[-1]
        log(f"digits {spec}: psnr {r['psnr']:.2f} ssim {r['ssim']:.4f} acc {r['accuracy']:.3f} "
            f"steps {calls}/{full} = {r['step_speedup']:.2f}x")
    grid(images, RESULTS / "bench_diffusers_digits.png", [k for k in images][:1] + [
        s for s in images if "interval=3, depth=1" in s or "interval=5, depth=1" in s or "fbcache" in s][:5])


def bench_digits_quant(args, rows, extra):
    """W8A8 (int8, fp8) alone and with deepcache, and w8a8+fbcache calibrated jointly, on the digits reference."""
    import hf_accel
    from hf_accel.plugins.diffusion_cache import cache_stats, diffusion_calibrate
    from hf_accel.quality.diffusion import classifier_accuracy, generate, load_digits_reference, psnr as psnr_img, ssim

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    ref_pipe, clf = load_digits_reference(device=device)
    steps, n = args.digits_steps, args.digits_n
    ref, labels = generate(ref_pipe, n, seed=1000, steps=steps)
    base = {"model": "digits", "n": n, "steps": steps, "seed": 1000, "device": device}
    images = {"baseline": ref}
    acc_ref = classifier_accuracy(ref, labels, clf)
    extra["digits_quant_baseline_accuracy"] = acc_ref

    def measure(pipe, spec, note=None):
        name = cache_name(pipe)
        stats = cache_stats(pipe, name) if name else None
        c0, f0 = (stats.calls, stats.full) if stats else (0, 0)
        test, _ = generate(pipe, n, seed=1000, steps=steps)
        calls, full = (stats.calls - c0, stats.full - f0) if stats else (n and steps, steps)
        row = {**base, "method": "+".join(hf_accel.get_config(pipe).names), "spec": spec,
               "psnr": float(psnr_img(test, ref).mean()), "ssim": float(ssim(test, ref).mean()),
               "accuracy": classifier_accuracy(test, labels, clf), "accuracy_uncached": acc_ref}
        if stats:
            row.update(full_calls=full, calls=calls, step_speedup=calls / max(full, 1))
        if note:
            row.update(note)
        rows.append(row)
        images[spec] = test
        log(f"digits {spec}: psnr {row['psnr']:.2f} ssim {row['ssim']:.4f} acc {row['accuracy']:.3f}"
            + (f" steps {calls}/{full}" if stats else ""))

    for fmt in args.formats:
        w8 = f"w8a8(format={fmt})"
        pipe, _ = load_digits_reference(device=device)
        hf_accel.apply(pipe, w8)
        measure(pipe, w8)
        for cache in ("deepcache(interval=3, depth=1)", "deepcache(interval=4, depth=0)"):
            hf_accel.apply(pipe, cache)
            measure(pipe, f"{w8}+{cache}")
            quiet_remove(pipe)
        # joint: the fbcache threshold searched on the quantized UNet against the plain (unquantized, uncached) output
        for target in args.targets:
            pipe, _ = load_digits_reference(device=device)
            res = diffusion_calibrate(pipe, target_psnr=target, accel=w8, labels=[i % 10 for i in range(args.cal_n)],
                                      steps=steps, seed=0)
            spec = hf_accel.get_config(pipe).to_string()
            short = f"{w8}+fbcache(threshold={res.threshold:.4g}) joint@{target:g}dB"
            extra.setdefault("joint_calibration", {})[short] = {
                "spec": spec, "threshold": res.threshold, "met": res.met, "calibration_psnr": res.psnr,
                "quant_psnr": res.quant_psnr, "step_speedup": res.step_speedup, "search": res.rows}
            log(f"joint {w8}+fbcache for {target} dB: threshold {res.threshold:.4g}, cal psnr {res.psnr:.2f} "
                f"(quantized alone {res.quant_psnr:.2f}), step speedup {res.step_speedup:.2f}")
            measure(pipe, short, {"target_psnr": target, "calibration_quant_psnr": res.quant_psnr,
                                  "calibration_met": res.met})
    # blind stacking, for contrast: the threshold calibrated for the float model, then quantized
    if args.formats and args.targets:
        pipe, _ = load_digits_reference(device=device)
        res = diffusion_calibrate(pipe, target_psnr=args.targets[0], labels=[i % 10 for i in range(args.cal_n)],
                                  steps=steps, seed=0)
        fb = hf_accel.get_config(pipe).plugins[0]
        quiet_remove(pipe)
        fmt = args.formats[0]
        hf_accel.apply(pipe, f"w8a8(format={fmt})")
        hf_accel.apply(pipe, fb)
        measure(pipe, f"w8a8(format={fmt})+fbcache(threshold={res.threshold:.4g}) blind@{args.targets[0]:g}dB",
                {"target_psnr": args.targets[0], "note": "threshold calibrated on the float model, then stacked"})
    try:
        pipe, _ = load_digits_reference(device=device)
        hf_accel.apply(pipe, "tome(ratio=0.5)")
    except Exception as e:
        rows.append({**base, "method": "tome", "spec": "tome(ratio=0.5)", "error": f"{type(e).__name__}: {e}"[:300]})
    keys = ["baseline"] + [k for k in images if k != "baseline"][:7]
    grid(images, RESULTS / "bench_diffusers_digits_quant.png", keys)


def grid(images: dict, path: Path, keys: list[str], per_row: int = 20):
    import numpy as np
    from PIL import Image

    rows = []
    for k in keys:
        x = images[k][:per_row].clamp(0, 1)  # (n, 1, 16, 16)
        x = torch.nn.functional.interpolate(x, scale_factor=3, mode="nearest")
        rows.append(torch.cat(list(x), dim=2))  # (1, 48, 48 * n)
    img = torch.cat(rows, dim=1)[0].mul(255).round().byte().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(img)).save(path)
    names = [k.split(", cal_timesteps")[0] + (")" if ", cal_timesteps" in k else "") for k in keys]
    (path.with_suffix(".txt")).write_text("rows, top to bottom: " + " | ".join(names) + "\n")


# -- summary ------------------------------------------------------------------------------------------------------
def summarise(data: dict) -> dict:
    rows = data["rows"]
    s = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "commands": data.get("commands", {}), "versions": data.get("versions", {}), "gpu": data.get("gpu")}

    def best(model, method, min_psnr=None, key="speedup"):
        cands = [r for r in rows if r.get("model") == model and r.get("method") == method and key in r
                 and (min_psnr is None or r.get("psnr_vs_uncached", r.get("psnr", 0)) >= min_psnr)]
        return max(cands, key=lambda r: r[key]) if cands else None

    for m in ("deepcache", "fbcache"):
        r = best("sd15", m)
        if r:
            s[f"sd15_{m}_best_speedup"] = round(r["speedup"], 3)
            s[f"sd15_{m}_best_spec"] = r["spec"]
    base = next((r for r in rows if r.get("model") == "sd15" and r.get("method") == "baseline"), None)
    if base:
        s["sd15_baseline_seconds"] = round(base["seconds"], 3)
        runs = base.get("times", [])
        s["sd15_baseline_runs"] = [round(t, 3) for t in runs]
        if len(runs) > 1:  # every sd15 ratio divides by this: a wide spread makes them all doubtful
            s["sd15_baseline_spread"] = round(max(runs) / min(runs), 3)
    fb = next((r for r in rows if r.get("model") == "flux" and r.get("method") == "baseline"), None)
    if fb:
        s["flux_baseline_seconds"] = round(fb["seconds"], 3)
        s["flux_layers"] = fb["flux_layers"]
    for m in ("fora", "fbcache", "fbcache_corrected", "diffusers_fbc", "diffusers_fastercache",
              "diffusers_taylorseer"):
        for floor in (None, 30.0):
            r = best("flux", m, floor)
            if r:
                tag = "best" if floor is None else "best_at_30db"
                s[f"flux_{m}_{tag}_speedup"] = round(r["speedup"], 3)
                s[f"flux_{m}_{tag}_psnr"] = round(r["psnr_vs_uncached"], 2)
                s[f"flux_{m}_{tag}_spec"] = r["spec"]
    # headline: deepcache speed on the SD1.5 shape at the setting whose digits PSNR is >= 30 dB
    dig = {r["spec"]: r for r in rows if r.get("model") == "digits" and "psnr" in r}  # error rows have none
    sd = {r["spec"]: r for r in rows if r.get("model") == "sd15"}
    ok = [(sd[k]["speedup"], k) for k in sd if k in dig and dig[k]["psnr"] >= 30]
    if ok:
        sp, k = max(ok)
        s.update(headline_spec=k, headline_sd15_speedup=round(sp, 3), headline_digits_psnr=round(dig[k]["psnr"], 2),
                 headline_digits_ssim=round(dig[k]["ssim"], 4), headline_digits_accuracy=dig[k]["accuracy"])
    for k, r in dig.items():
        if r["method"] == "fbcache":
            s.setdefault("digits_fbcache_calibrated", []).append(
                {"spec": k.split(", cal_timesteps")[0] + (")" if ", cal_timesteps" in k else ""), "psnr": round(r["psnr"], 2), "step_speedup": round(r["step_speedup"], 3),
                 "accuracy": r["accuracy"]})
    b = next((r for r in rows if r.get("model") == "digits" and r.get("method") == "baseline"), None)
    if b:
        s["digits_baseline_accuracy"] = b["accuracy"]
    # W8A8, ToMe and joint cache+quant (sd15 / flux speed; digits quality of the same spec where it was measured)
    for model in ("sd15", "flux"):
        for r in rows:
            if r.get("model") == model and "speedup" in r and r.get("method", "").startswith(("w8a8", "tome")):
                key = f"{model}_" + r["spec"].replace("(", "_").replace(")", "").replace("=", "").replace(", ", "_") \
                    .replace("+", "_plus_").replace(".", "p").replace("format", "")
                s[key + "_speedup"] = round(r["speedup"], 3)
    qrows = [r for r in rows if r.get("part") == "digits-quant" and "psnr" in r]
    for r in qrows:
        s.setdefault("digits_quant", []).append({"spec": r["spec"], "psnr": round(r["psnr"], 2),
                                                 "ssim": round(r["ssim"], 4), "accuracy": r["accuracy"],
                                                 "step_speedup": round(r.get("step_speedup", 1.0), 3)})
    digq = {r["spec"]: r for r in qrows}
    ok = [(sd[k]["speedup"], k) for k in sd if k in digq and digq[k]["psnr"] >= 30 and "speedup" in sd[k]]
    if ok:
        sp, k = max(ok)
        s.update(headline_quant_spec=k, headline_quant_sd15_speedup=round(sp, 3),
                 headline_quant_digits_psnr=round(digq[k]["psnr"], 2))
    kern = [r for r in rows if r.get("model") == "kernels" and r.get("method") == "gemm" and "int8_speedup" in r]
    for r in kern:
        tag = r["shape"].split(" ")[0] + "_" + "_".join(r["shape"].split(" ")[1:3]).replace(",", "")
        s[f"gemm_{tag}_int8_speedup_vs_bf16"] = round(r["int8_speedup"], 3)
        s[f"gemm_{tag}_fp8_speedup_vs_bf16"] = round(r["fp8_speedup"], 3)
    cp = next((r for r in rows if r.get("model") == "kernels" and r.get("method") == "copy"), None)
    if cp:
        s["copy_bandwidth_gbs"] = round(cp["gbs"], 1)
    return s


def table(rows: list[dict]) -> str:
    lines = [f"{'model':7} {'spec':62} {'sec':>7} {'speedup':>7} {'psnr':>6} {'acc':>5}"]
    for r in rows:
        if r.get("model") == "kernels":
            if r.get("method") == "gemm" and "int8_speedup" in r:
                lines.append(f"{'gemm':7} {r['shape'][:62]:62} {r['bf16_s'] * 1e3:6.3f}m int8 {r['int8_speedup']:.2f}x "
                             f"fp8 {r['fp8_speedup']:.2f}x quantizer {r['int8_quantizer_pct_of_copy']:.0f}% of copy")
            continue
        p = r.get("psnr_vs_uncached", r.get("psnr"))
        lines.append(f"{r.get('model', ''):7} {str(r.get('spec') or 'baseline')[:62]:62} "
                     f"{r.get('seconds', float('nan')):7.3f} {r.get('speedup', r.get('step_speedup', float('nan'))):7.2f} "
                     f"{(p if p is not None else float('nan')):6.2f} {r.get('accuracy', float('nan')):5.3f}"
                     + (f"  ERROR {r['error'][:60]}" if "error" in r else ""))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["gpu", "digits", "digits-quant"], required=True)
    ap.add_argument("--tiny", "--smoke", action="store_true", help="tiny configs (checks the script, numbers are moot)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--formats", nargs="*", default=["int8", "fp8"], choices=["int8", "fp8"])
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--models", nargs="+", default=["sd15", "flux"], choices=["sd15", "flux"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flux-repeats", type=int, default=2)
    ap.add_argument("--sd-steps", type=int, default=50)
    ap.add_argument("--flux-steps", type=int, default=28)
    ap.add_argument("--budget", type=float, default=320.0, help="seconds; later variants are skipped past this")
    ap.add_argument("--digits-n", type=int, default=200)
    ap.add_argument("--digits-steps", type=int, default=50)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--cal-n", type=int, default=40)
    ap.add_argument("--targets", type=float, nargs="+", default=[30.0, 35.0])
    ap.add_argument("--out", default=None, help="default: $OUT/bench_diffusers.json if $OUT is set, else "
                                                   "benchmarks/results/bench_diffusers.json (updated in place)")
    args = ap.parse_args()
    default = RESULTS / "bench_diffusers.json"
    out = Path(args.out) if args.out else Path(os.environ["OUT"]) / "bench_diffusers.json" if os.environ.get("OUT") \
        else default
    src = out if out.exists() else default  # the other parts' rows come along
    data = json.loads(src.read_text()) if src.exists() else {"rows": []}
    command = "python scripts/bench_diffusers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows: list[dict] = []
    extra: dict = {}
    torch.manual_seed(0)
    if args.part == "gpu":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        if device == "cuda":
            data["gpu"] = torch.cuda.get_device_name()
        models = tuple(args.models) + ("kernels",)
        if not args.skip_kernels:
            try:
                bench_kernels(args, device, dtype, rows, extra)
            except Exception as e:
                rows.append({"model": "kernels", "method": "copy", "error": f"{type(e).__name__}: {e}"[:300]})
        for name, fn in (("sd15", bench_sd15), ("flux", bench_flux)):
            if name in models:
                try:
                    fn(args, device, dtype, rows)
                except Exception as e:  # keep what was measured
                    import traceback

                    traceback.print_exc()
                    rows.append({"model": name, "method": "fatal", "spec": "", "error": f"{type(e).__name__}: {e}"[:300]})
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
        keep = lambda r: r.get("model") not in models  # noqa: E731
    elif args.part == "digits-quant":
        bench_digits_quant(args, rows, extra)
        keep = lambda r: r.get("part") != "digits-quant"  # noqa: E731
    else:
        bench_digits(args, rows, extra)
        keep = lambda r: r.get("model") != "digits" or r.get("part") == "digits-quant"  # noqa: E731
    for r in rows:
        r["part"] = args.part
    data["rows"] = [r for r in data["rows"] if keep(r)] + rows
    data.setdefault("commands", {})[args.part] = command
    data.setdefault("versions", {})[args.part] = versions()
    data.update(extra)
    try:
        data["summary"] = summarise(data)
    except Exception as e:  # a summary bug must not lose a GPU run's rows: write them, then fail loudly
        data["summary"] = {"error": f"{type(e).__name__}: {e}"}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=str, allow_nan=True))
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    data["summary"]["command"] = command
    data["summary"]["versions_now"] = versions()
    out.write_text(json.dumps(data, indent=1, default=str, allow_nan=True))
    print(json.dumps(data["summary"], indent=1, default=str))
    print(f"wrote {out}")
    print(table(rows))


if __name__ == "__main__":
    main()
