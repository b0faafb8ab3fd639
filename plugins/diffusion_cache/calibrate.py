"""`diffusion_calibrate`: pick the fbcache threshold (and fit its correction) for a pipeline, automatically.

    from hf_accel.plugins.diffusion_cache import diffusion_calibrate
    result = diffusion_calibrate(pipe, target_psnr=30, prompts=["a cat", "a dog"], steps=50)
    result.threshold, result.rows        # the choice and every threshold tried
    pipe.save_pretrained("out")          # the threshold and the coefficients are plugin options: they save

1. Applies `fbcache` if the pipeline has no fbcache yet.
2. Runs the pipeline with reuse off (threshold 0: bit-identical to uncached) from fixed seeds, keeping the images and,
   per step, the quantity that reuse would replace; fits the per-timestep correction `Q_s ~= a_s Q_{s-1} + b_s`.
3. Runs the same seeds at increasing thresholds and measures the mean PSNR against step 2's images, the step speedup
   (denoiser calls / fully computed calls) and the wall-clock speedup.
4. Refines between the best passing and the first failing threshold (`refine` geometric bisections), keeps the
   fastest threshold whose PSNR >= target_psnr, or the smallest whose step speedup >= target_speedup, and writes it (and the coefficients) into the plugin's options, so the choice saves with the pipeline artifact.

Cache + quantization, calibrated together (the CacheQuant finding, Liu et al. arXiv:2503.01323: errors of caching and
of quantization interact, so they must not be tuned separately): pass `accel=` with the quantization (and
optionally the fbcache options) and an *unaccelerated* pipeline,

    diffusion_calibrate(pipe, target_psnr=30, accel="w8a8(format=fp8)", prompts=prompts)

Step 2's reference then comes from the plain pipeline (unquantized, uncached) *before* `accel` is applied; the
threshold search runs on the quantized denoiser against that reference, so the cache only gets the error budget
the quantization left (`result.quant_psnr` is the quantized, uncached PSNR; if it is already below the target, no
threshold can meet it and threshold 0 is kept with a warning). The measurement is also attached with
`hf_accel.record_metric`, so the saved pipeline's card states what the threshold was calibrated for.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from hf_accel.errors import AccelError

from . import _hooks as H

DEFAULT_THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.17, 0.22, 0.3, 0.4, 0.55, 0.75, 1.0)


@dataclasses.dataclass
class CalibrationResult:
    threshold: float
    met: bool  # False: no threshold met the target; the closest was kept (see rows)
    target: dict
    psnr: float
    step_speedup: float
    time_speedup: float
    rows: list[dict]  # one per threshold tried: threshold, psnr, step_speedup, time_speedup, full_calls, calls
    cal_timesteps: tuple[float, ...] = ()
    cal_scale: tuple[float, ...] = ()
    cal_offset: tuple[float, ...] = ()
    quant_psnr: float | None = None  # joint calibration: PSNR of the quantized, uncached pipeline vs the plain one
    reference: str = "uncached"  # what PSNR and speedups are measured against ("uncached" or "plain": no accel)


def _images(out: Any) -> torch.Tensor:
    """Pipeline output -> (N, C, H, W) float64 CPU tensor in [0, 1]."""
    images = out.images if hasattr(out, "images") else out[0]
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
        return x.double()
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images).double()
        return x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(0)
    arrays = [np.asarray(im, dtype=np.float64) / 255.0 for im in images]  # PIL
    return torch.from_numpy(np.stack([a if a.ndim == 3 else a[..., None] for a in arrays])).permute(0, 3, 1, 2)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-20))).mean())


def _sync(pipe):
    dev = getattr(pipe, "device", None)
    if isinstance(dev, torch.device) and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fit(trace: list) -> tuple[tuple, tuple, tuple]:
    """Per timestep, the least-squares scalar map of the previous step's Q onto this step's (averaged over streams)."""
    by_key: dict = {}
    for key, step, t, q in trace:
        by_key.setdefault(key, {})[step] = (t, q)
    fits: dict[float, list] = {}
    for steps in by_key.values():
        for s in sorted(steps):
            if s - 1 not in steps:
                continue
            t, y = steps[s]
            x = steps[s - 1][1].double().flatten()
            y = y.double().flatten()
            xm, ym = x.mean(), y.mean()
            var = (x - xm).pow(2).mean()
            a = float(((x - xm) * (y - ym)).mean() / var) if var > 0 else 1.0
            b = float(ym - a * xm)
            fits.setdefault(t, []).append((a, b))
    ts = tuple(sorted(fits, reverse=True))
    return (ts, tuple(float(np.mean([a for a, _ in fits[t]])) for t in ts),
            tuple(float(np.mean([b for _, b in fits[t]])) for t in ts))


def _meets(row: dict, target_psnr, target_speedup) -> bool:
    return row["psnr"] >= target_psnr if target_psnr is not None else row["step_speedup"] >= target_speedup


def _fbcache_plugin(pipe):
    import hf_accel
    from hf_accel.apply import find_applied

    found = find_applied(pipe, "fbcache")
    if found is None:
        hf_accel.apply(pipe, "fbcache")
        found = find_applied(pipe, "fbcache")
    return found


def diffusion_calibrate(
    pipe: Any, target_psnr: float | None = None, target_speedup: float | None = None, *,
    prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None, call_kwargs: dict | None = None,
    steps: int = 50, seed: int = 0, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, fit_correction: bool = True,
    output_type: str = "pt", refine: int = 3, accel: Any = None,
) -> CalibrationResult:
    """Choose the fbcache threshold for `pipe` that meets `target_psnr` (dB, mean over the images, against the
    uncached output) or `target_speedup` (denoiser calls / fully computed calls), store it in the plugin's options
    and return the measurements. Images come from `pipe(**call_kwargs, prompt=prompts | class_labels=labels,
    num_inference_steps=steps, generator=[one per image, seed + i], output_type=output_type)`. PSNR is over
    the images as the pipeline returns them (values in [0, 1]). Costs 2 + len(thresholds tried) + refine runs.

    `accel` (a spec, e.g. "w8a8" or "w8a8(format=fp8)+fbcache(warmup=2)"): joint calibration, see the module
    docstring; `pipe` must then have no accel applied yet (its plain output is the reference), and `accel` is
    applied here (fbcache added if the spec has none). Costs 2 more runs."""
    if (target_psnr is None) == (target_speedup is None):
        raise AccelError("diffusion_calibrate needs exactly one of target_psnr= (dB) or target_speedup= (e.g. 2.5)")
    if not thresholds or any(t <= 0 for t in thresholds):
        raise AccelError(f"thresholds must be positive numbers, got {thresholds!r}")
    import hf_accel

    if accel is not None and hf_accel.get_config(pipe).plugins:
        raise AccelError(
            f"diffusion_calibrate(accel=...) needs a pipeline without accel (its plain output is the reference); "
            f"this one has {hf_accel.get_config(pipe).to_string()!r}. Load it without accel=, or drop accel= to "
            "calibrate against the uncached output of what is applied"
        )
    kwargs = dict(call_kwargs or {})
    n = None
    if prompts is not None:
        kwargs["prompt"], n = list(prompts), len(prompts)
    if labels is not None:
        kwargs["class_labels"], n = list(labels), len(labels)
    kwargs.update(num_inference_steps=steps, output_type=output_type)
    ctl = None

    def run() -> tuple[torch.Tensor, float, int, int]:
        if ctl is not None:
            H.reset_cache(pipe)
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)] if n else \
            torch.Generator("cpu").manual_seed(seed)
        calls, full = (ctl.stats.calls, ctl.stats.full) if ctl is not None else (0, 0)
        _sync(pipe)
        start = time.perf_counter()
        with torch.no_grad():
            out = pipe(**kwargs, generator=gens)
        _sync(pipe)
        elapsed = time.perf_counter() - start
        if ctl is None:
            return _images(out), elapsed, 0, 0
        return _images(out), elapsed, ctl.stats.calls - calls, ctl.stats.full - full

    plain = None
    if accel is not None:  # the reference: the plain pipeline, before anything is quantized or cached
        run()
        plain = run()[:2]
        hf_accel.apply(pipe, accel)
    plugin, _ = _fbcache_plugin(pipe)
    ctl = H.controller_of(pipe, "fbcache")

    saved = dataclasses.asdict(plugin)
    try:
        plugin.threshold = 0.0
        ctl.trace = [] if fit_correction else None
        run()  # warm-up (allocators, lazy init) so that the timed reference is fair
        ctl.trace = [] if fit_correction else None
        ref, t_ref, _, _ = run()
        quant_psnr = None
        if plain is not None:
            quant_psnr = _psnr(ref, plain[0])
            ref, t_ref = plain
        fitted = _fit(ctl.trace) if fit_correction else ((), (), ())
        ctl.trace = None
        plugin.cal_timesteps, plugin.cal_scale, plugin.cal_offset = fitted
        rows = []
        for th in sorted(thresholds):
            plugin.threshold = float(th)
            img, t_run, calls, full = run()
            rows.append({"threshold": float(th), "psnr": _psnr(img, ref), "step_speedup": calls / max(full, 1),
                         "time_speedup": t_ref / t_run, "full_calls": full, "calls": calls})
            if target_psnr is not None and rows[-1]["psnr"] < target_psnr and len(rows) >= 2 \
                    and rows[-2]["psnr"] < target_psnr:
                break  # two in a row below the target: larger thresholds only reuse more
            if target_speedup is not None and rows[-1]["step_speedup"] >= target_speedup:
                break
        # refine between the last threshold that met the target and the first that did not (geometric bisection)
        for _ in range(refine):
            tried = sorted(rows, key=lambda r: r["threshold"])
            good = [r for r in tried if _meets(r, target_psnr, target_speedup)]
            bad = [r for r in tried if not _meets(r, target_psnr, target_speedup)]
            if target_psnr is not None:  # quality falls with the threshold: search above the best passing one
                lo = max((r["threshold"] for r in good), default=None)
                hi = min((r["threshold"] for r in bad if lo is None or r["threshold"] > lo), default=None)
            else:  # speed rises with the threshold: search below the smallest passing one
                hi = min((r["threshold"] for r in good), default=None)
                lo = max((r["threshold"] for r in bad if hi is None or r["threshold"] < hi), default=None)
            if lo is None or hi is None or hi / lo < 1.05:
                break
            th = math.sqrt(lo * hi)
            plugin.threshold = th
            img, t_run, calls, full = run()
            rows.append({"threshold": th, "psnr": _psnr(img, ref), "step_speedup": calls / max(full, 1),
                         "time_speedup": t_ref / t_run, "full_calls": full, "calls": calls})
    except BaseException:
        for k, v in saved.items():
            setattr(plugin, k, v)
        raise
    if target_psnr is not None:
        ok = [r for r in rows if r["psnr"] >= target_psnr]
        best = max(ok, key=lambda r: (r["step_speedup"], r["threshold"])) if ok else None
        target = {"psnr": target_psnr}
    else:
        ok = [r for r in rows if r["step_speedup"] >= target_speedup]
        best = min(ok, key=lambda r: r["threshold"]) if ok else None
        target = {"speedup": target_speedup}
    met = best is not None
    if best is None:
        best = rows[0] if target_psnr is not None else max(rows, key=lambda r: r["step_speedup"])
        if target_psnr is not None and best["psnr"] < target_psnr:
            best = {"threshold": 0.0, "psnr": math.inf, "step_speedup": 1.0, "time_speedup": 1.0}
        warnings.warn(f"diffusion_calibrate: no threshold met {target}; keeping threshold={best['threshold']}",
                      stacklevel=2)
    plugin.threshold = float(best["threshold"])
    from hf_accel.apply import options_changed

    options_changed(pipe)  # the options changed: let the integrations rewrite the saved spec
    H.reset_cache(pipe)
    reference = "uncached" if plain is None else "plain"
    if plain is not None:
        from hf_accel.card import record_metric

        record_metric(pipe, {"metric": "psnr", "value": best["psnr"], "spec": hf_accel.get_config(pipe).to_string(),
                             "reference": "no accel (unquantized, uncached), same seeds", "target": target,
                             "quant_psnr": quant_psnr, "step_speedup": best["step_speedup"], "steps": steps,
                             "source": "diffusion_calibrate(accel=...)"})
    return CalibrationResult(plugin.threshold, met, target, best["psnr"], best["step_speedup"],
                             best["time_speedup"], rows, *fitted, quant_psnr=quant_psnr, reference=reference)
