"""Quality harness for diffusion: image metrics and a side-by-side comparison of two pipelines on the digits reference.

    ref, clf = load_digits_reference()
    test, _ = load_digits_reference(accel="...")
    records = compare_pipelines(ref, test, n=100, seed=0, steps=20)

Images are (N, C, H, W) float tensors in [0, 1]. Metrics are per image (shape (N,)); records hold their mean.
"""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .digits_pipeline import NUM_CLASSES, DigitsClassifier, DigitsPipeline

DIGITS_DIR = Path(__file__).parent / "assets" / "digits"
DIGITS_MODEL = "hf-accel/digits-unet-16"  # the name records carry for the shipped reference


# -- metrics ------------------------------------------------------------------------------------------------------
def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    # float64 so that near-identical images (mse ~1e-12) still give a meaningful PSNR
    return a.detach().to(torch.float64), b.detach().to(device=a.device, dtype=torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; inf where the images are identical."""
    a, b = _pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


@functools.lru_cache(maxsize=8)
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
    k1: float = 0.01, k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image: 11x11 gaussian window (sigma 1.5), valid positions only,
    mean over positions and channels. Equals skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)` for images of at least 11x11; for smaller ones the window shrinks
    to the largest odd size that fits."""
    a, b = _pair(a, b)
    channels, height, width = a.shape[1:]
    size = min(window_size, height, width)
    size -= 1 - size % 2
    window = _gaussian_window(size, sigma).to(a.device).expand(channels, 1, size, size)

    def filt(x):
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


# -- the shipped reference ----------------------------------------------------------------------------------------
def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    from safetensors.torch import load_file

    clf = DigitsClassifier()
    clf.load_state_dict(load_file(str(Path(path or DIGITS_DIR) / "classifier.safetensors")))
    return clf.to(device).eval()


@functools.lru_cache(maxsize=4)
def _shipped_classifier(device: str) -> DigitsClassifier:
    return load_classifier(device=device)


def load_digits_reference(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", **from_pretrained_kwargs: Any
) -> tuple[DigitsPipeline, DigitsClassifier]:
    """(pipeline, classifier) of the shipped digits reference; kwargs (e.g. `accel=`) go to `from_pretrained`."""
    path = Path(path or DIGITS_DIR)
    pipe = DigitsPipeline.from_pretrained(str(path), **from_pretrained_kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_classifier(path, device)


@torch.no_grad()
def classifier_accuracy(
    images: torch.Tensor, labels: torch.Tensor | list[int], classifier: torch.nn.Module | None = None
) -> float:
    """Fraction of `images` ((N, 1, H, W) in [0, 1]) that the digits classifier assigns to `labels`."""
    clf = classifier if classifier is not None else _shipped_classifier(str(images.device))
    device = next(clf.parameters()).device
    pred = clf(images.to(device=device, dtype=torch.float32)).argmax(1).cpu()
    return (pred == torch.as_tensor(labels).reshape(-1).cpu()).float().mean().item()


@torch.no_grad()
def generate(
    pipe: DigitsPipeline, n: int, seed: int = 0, steps: int = 20, guidance_scale: float = 1.0, batch_size: int = 250
) -> tuple[torch.Tensor, torch.Tensor]:
    """n images ((n, 1, H, W) on CPU) with labels i % 10; image i always starts from the noise of seed + i, so two
    pipelines (or batch sizes) given the same arguments start from identical noise."""
    labels = torch.arange(n) % NUM_CLASSES
    out = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in idx]
        out.append(pipe(class_labels=labels[start:idx.stop], num_inference_steps=steps, generator=gens,
                        guidance_scale=guidance_scale, output_type="pt").images.cpu())
    return torch.cat(out), labels


# -- records ------------------------------------------------------------------------------------------------------
def _record(model: str, spec: str, metric: str, value: float, params: dict) -> dict:
    """One JSON-able measurement, in the schema of `records.make_record` (local stand-in, to be unified; this one
    adds diffusers to `versions`). A non-finite value (PSNR of identical images) is stored as the string "inf" so
    the record stays strict JSON."""
    from .records import current_command, versions

    value = float(value)
    return {
        "model": model,
        "spec": spec,
        "metric": metric,
        "value": value if math.isfinite(value) else str(value),
        "params": params,
        "command": current_command(),
        "versions": {**versions(), "diffusers": importlib.metadata.version("diffusers")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def compare_pipelines(
    ref_pipe: DigitsPipeline, test_pipe: DigitsPipeline, n: int = 100, seed: int = 0, steps: int = 20, *,
    guidance_scale: float = 1.0, model: str = DIGITS_MODEL, spec: str | None = None,
    classifier: torch.nn.Module | None = None,
) -> list[dict]:
    """Generate n images from the same seeds and labels with both pipelines; return records of the test pipeline's
    mean PSNR and SSIM against the reference and its classifier accuracy (the reference's is
    `params.reference_value`).
    `spec` defaults to the hf_accel spec applied to `test_pipe` (None when none)."""
    if spec is None:
        from ..apply import get_config

        spec = get_config(test_pipe).to_string() or None
    ref, labels = generate(ref_pipe, n, seed, steps, guidance_scale)
    test, _ = generate(test_pipe, n, seed, steps, guidance_scale)
    params = {"n": n, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
              "scheduler": type(test_pipe.scheduler).__name__}
    acc_ref = classifier_accuracy(ref, labels, classifier)
    return [
        _record(model, spec, "psnr", psnr(test, ref).mean(), params),
        _record(model, spec, "ssim", ssim(test, ref).mean(), params),
        _record(model, spec, "classifier_accuracy", classifier_accuracy(test, labels, classifier),
                {**params, "reference_value": acc_ref}),
    ]
