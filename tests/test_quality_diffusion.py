"""Diffusion quality harness: metrics, the shipped digits reference, and pipeline comparison records."""
import copy
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from hf_accel.quality.diffusion import (  # noqa: E402
    DIGITS_DIR, classifier_accuracy, compare_pipelines, generate, load_digits_reference, psnr, ssim,
)
from hf_accel.quality.digits_pipeline import DigitsPipeline, digits_dataset  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def reference():
    return load_digits_reference()


def _images(n=4, c=1, size=16, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_psnr_identical_and_noise_direction():
    a = _images(c=3)
    assert torch.isinf(psnr(a, a)).all()
    g = torch.Generator().manual_seed(1)
    values = [psnr(a, (a + s * torch.randn(a.shape, generator=g)).clamp(0, 1)) for s in (0.01, 0.05, 0.2)]
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()
    # exact value: a uniform offset of 0.1 is MSE 0.01 -> 20 dB
    got = psnr(torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.1))
    assert torch.allclose(got, torch.tensor(20.0, dtype=torch.float64))


def test_ssim_identical_noise_and_closed_form():
    a = _images(c=3, size=32)
    assert torch.allclose(ssim(a, a), torch.ones(4, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    values = [ssim(a, (a + s * torch.randn(a.shape, generator=g)).clamp(0, 1)) for s in (0.01, 0.05, 0.2)]
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all() and (values[0] < 1).all()
    # constant images: contrast/structure term is 1, luminance term is (2xy + C1) / (x^2 + y^2 + C1)
    x, y, c1 = 0.3, 0.6, 0.01**2
    got = ssim(torch.full((1, 1, 16, 16), x), torch.full((1, 1, 16, 16), y))
    assert got.item() == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-9)
    with pytest.raises(ValueError):
        ssim(a, a[:, :1])


def test_ssim_psnr_match_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a = _images(n=2, c=3, size=16)
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    for i in range(2):
        x, y = a[i].permute(1, 2, 0).double().numpy(), b[i].permute(1, 2, 0).double().numpy()
        want = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=1.0, channel_axis=2)
        assert ssim(a, b)[i].item() == pytest.approx(want, abs=1e-9)
        assert psnr(a, b)[i].item() == pytest.approx(metrics.peak_signal_noise_ratio(x, y, data_range=1.0))


def test_classifier_on_real_heldout_digits(reference):
    _, clf = reference
    _, _, x_test, y_test = digits_dataset()
    assert classifier_accuracy(x_test, y_test, clf) >= 0.95


def test_shipped_pipeline_generates_recognisable_digits(reference):
    pipe, _ = reference
    shipped = {p.name for p in DIGITS_DIR.iterdir()}
    assert {"README.md", "samples.png", "build.json", "classifier.safetensors", "model_index.json"} <= shipped
    images, labels = generate(pipe, n=50, seed=0, steps=20)
    assert images.shape == (50, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert classifier_accuracy(images, labels) >= 0.7  # chance is 0.1
    # per-image seeds: an image does not depend on the batch it was generated in
    again, _ = generate(pipe, n=3, seed=0, steps=20)
    assert torch.allclose(again, images[:3], atol=1e-4)


def test_perturbed_unet_scores_lower(reference):
    pipe, _ = reference
    same = compare_pipelines(pipe, pipe, n=20, seed=0, steps=10, spec="")
    by_metric = {r["metric"]: r for r in same}
    assert by_metric["psnr"]["value"] == "inf" and by_metric["ssim"]["value"] == pytest.approx(1.0)
    json.dumps(same, allow_nan=False)  # strict JSON

    scores = []
    for scale in (0.02, 0.1):
        noisy = copy.deepcopy(pipe.unet)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std(correction=0))
        test = DigitsPipeline(unet=noisy, scheduler=pipe.scheduler)
        test.set_progress_bar_config(disable=True)
        rec = {r["metric"]: r for r in compare_pipelines(pipe, test, n=20, seed=0, steps=10, spec=f"noise{scale}")}
        assert set(rec["psnr"]) >= {"model", "spec", "metric", "value", "date", "versions"}
        assert rec["psnr"]["spec"] == f"noise{scale}" and "torch" in rec["psnr"]["versions"]
        assert math.isfinite(rec["psnr"]["value"]) and rec["ssim"]["value"] < 1.0
        scores.append((rec["psnr"]["value"], rec["ssim"]["value"]))
    assert scores[0][0] > scores[1][0] and scores[0][1] > scores[1][1]  # more noise, further from the reference
