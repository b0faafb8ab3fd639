#!/usr/bin/env python
"""Build the digits diffusion reference shipped at hf_accel/quality/assets/digits/.

    python scripts/build_reference_diffusion.py --out hf_accel/quality/assets/digits [--device cpu] [--minutes 20]

Trains (1) a small CNN classifier and (2) a class-conditional diffusers UNet2DModel (DDPM loss, cosine schedule,
10% label dropout for classifier-free guidance, EMA weights) on scikit-learn's digits upscaled to 16x16, then saves
a DigitsPipeline (DDIM scheduler) directory plus classifier.safetensors, samples.png, build.json and README.md.
Deterministic for a given seed, device and torch build. `--minutes` only caps the wall time: if it is hit, fewer
steps than `--steps` are trained and the card says so.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hf_accel.quality.diffusion import DIGITS_MODEL, _record, classifier_accuracy, generate, psnr, ssim  # noqa: E402
from hf_accel.quality.digits_pipeline import (  # noqa: E402
    IMAGE_SIZE, NUM_CLASSES, DigitsClassifier, DigitsPipeline, digits_dataset,
)

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=32, num_class_embeds=NUM_CLASSES + 1,  # +1: the "no label" class
)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
N_DIGITS = 1797  # images in sklearn's bundled digits


def random_affine(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small rotations, scalings and shifts, so the classifier judges shapes rather than exact pixels."""
    n = len(x)
    angle = (torch.rand(n, generator=g) - 0.5) * math.radians(20)
    scale = 1 + (torch.rand(n, generator=g) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.25  # +-1 pixel of 16 in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def train_classifier(x, y, x_test, y_test, device, seed, epochs=20, batch_size=64):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitsClassifier().to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * math.ceil(len(x) / batch_size))
    for _ in range(epochs):
        clf.train()
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            xb = random_affine(x[idx], g).to(device)
            loss = F.cross_entropy(clf(xb), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    clf.eval()
    return clf, classifier_accuracy(x_test, y_test, clf)


def train_unet(x, y, device, seed, steps, batch_size, max_seconds, lr=2e-3, ema_decay=0.999, log_every=250):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)  # all randomness drawn on CPU: same data/noise stream on any device
    unet = UNet2DModel(**UNET_CONFIG).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas = noise_sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(200, steps // 10), num_training_steps=steps)
    x = x * 2 - 1  # the model works in [-1, 1]
    start, done, running = time.time(), 0, 0.0
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        x0, labels = x[idx].to(device), y[idx].clone()
        labels[torch.rand(batch_size, generator=g) < 0.1] = NUM_CLASSES  # label dropout -> unconditional model too
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch_size,), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, class_labels=labels.to(device)).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up so early EMA is not dominated by the init
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        done, running = step + 1, running + loss.item()
        if done % log_every == 0:
            print(f"step {done}/{steps} loss {running / log_every:.4f} {time.time() - start:.0f}s", flush=True)
            running = 0.0
        if time.time() - start > max_seconds:
            print(f"time cap hit after {done} steps", flush=True)
            break
    return ema.eval(), done, time.time() - start


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, zoom: int = 3) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i, img in enumerate(images[:, 0]):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = img
    arr = (grid.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1) * 255).round().byte().numpy()
    Image.fromarray(arr, mode="L").save(path, optimize=True)


CARD = """---
library_name: diffusers
tags: [hf_accel, reference-model, class-conditional-image-generation]
---
# digits-unet-16: hf_accel's diffusion reference model

A tiny class-conditional `UNet2DModel` ({params:,} parameters, {unet_mb:.1f} MB) trained with the DDPM objective on
scikit-learn's bundled handwritten digits (8x8, upscaled bilinearly to 16x16), saved as a `DigitsPipeline`
(`hf_accel.quality.digits_pipeline`) with a DDIM scheduler, plus a CNN classifier ({clf_params:,} parameters) that
judges generated samples. It exists so diffusion accelerations (feature caching, quantization, pruning, fewer steps)
can be measured against a real, fully offline model in seconds. Not for any other use.

```python
from hf_accel.quality.diffusion import load_digits_reference, compare_pipelines
pipe, clf = load_digits_reference()          # or DigitsPipeline.from_pretrained(<this folder>)
images = pipe(class_labels=[0, 1, 2], num_inference_steps=20, output_type="pt").images
```

![samples](samples.png)

`samples.png`: {grid_n} samples, DDIM {grid_steps} steps, row r holds class r, column c starts from seed 10c + r.

## Numbers (from `build.json`)
| what | value |
| --- | --- |
| data | {n_train} train / {n_test} held-out digits (stratified, `random_state=0`); both models see train only |
| UNet training | {steps_done} steps of batch {batch_size} (AdamW 2e-3, cosine, EMA 0.999), {train_min:.1f} min |
| trained on | {device_desc} |
| classifier training | 20 epochs with small random affine augmentation, {clf_s:.0f} s |
| classifier accuracy, real held-out digits | {acc_real:.3f} |
{acc_rows}
| PSNR / SSIM, DDIM 20 vs DDIM 50 steps (same seeds, n={eval_n}) | {psnr_20_50:.2f} dB / {ssim_20_50:.3f} |
| total build time | {total_min:.1f} min |

Generated-sample accuracies use n={eval_n} images (labels i % 10, seed 0 + i), guidance scale 1 (no guidance).

## Reproduce
```
{command}
```
torch {torch_version}, diffusers {diffusers_version}. The seed fixes data order, noise and init; CUDA kernels are not
bit-deterministic, so a rebuild matches these numbers closely rather than exactly. `--device cpu` runs the same recipe
on CPU (`--threads 1` is fastest on a busy 2-core machine); `--card-only` re-renders this card from `build.json`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time cap for UNet training")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--card-only", action="store_true", help="only re-render README.md from OUT/build.json")
    args = ap.parse_args()
    if args.card_only:
        return write_card(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_total = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_test = digits_dataset()

    t0 = time.time()
    clf, acc_real = train_classifier(x, y, x_test, y_test, args.device, args.seed)
    clf_s = time.time() - t0
    print(f"classifier: held-out accuracy {acc_real:.4f} ({clf_s:.0f}s)", flush=True)

    unet, steps_done, train_s = train_unet(x, y, args.device, args.seed, args.steps, args.batch_size, args.minutes * 60)
    scheduler = DDIMScheduler(**SCHEDULE, timestep_spacing="trailing")  # trailing: few-step sampling starts at t=999
    pipe = DigitsPipeline(unet=unet, scheduler=scheduler).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(args.out)
    save_file({k: v.contiguous().cpu() for k, v in clf.state_dict().items()}, str(args.out / "classifier.safetensors"),
              metadata={"heldout_accuracy": f"{acc_real:.4f}", "image_size": str(IMAGE_SIZE)})

    # Evaluate the saved folder, as users will load it.
    pipe = DigitsPipeline.from_pretrained(str(args.out)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    evals, images = {}, {}
    for name, steps in (("ddim50", 50), ("ddim20", 20), ("ddim10", 10)):
        images[name], labels = generate(pipe, args.eval_n, seed=0, steps=steps)
        evals[name] = classifier_accuracy(images[name], labels, clf)
    # thresholding = clip x0 to [-1, 1] (DDIM's clip_sample); without it DPM-Solver is unstable from t=999
    dpm_sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, thresholding=True, sample_max_value=1.0)
    dpm = DigitsPipeline(unet=pipe.unet, scheduler=dpm_sched)
    dpm.set_progress_bar_config(disable=True)
    images["dpm10"], labels = generate(dpm, args.eval_n, seed=0, steps=10)
    evals["dpm10"] = classifier_accuracy(images["dpm10"], labels, clf)
    psnr_20_50 = psnr(images["ddim20"], images["ddim50"]).mean().item()
    ssim_20_50 = ssim(images["ddim20"], images["ddim50"]).mean().item()
    for k, v in evals.items():
        print(f"classifier accuracy on generated ({k}): {v:.4f}")
    print(f"DDIM 20 vs 50: PSNR {psnr_20_50:.2f} dB, SSIM {ssim_20_50:.4f}")

    grid_idx = torch.arange(100).view(10, 10).t().reshape(-1)  # row = class (labels are i % 10)
    save_grid(images["ddim50"][grid_idx] if args.eval_n >= 100 else images["ddim50"], args.out / "samples.png")

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    device_desc = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    spec = None  # the reference itself: no hf_accel spec
    settings = dict(n=args.eval_n, seed=0, guidance_scale=1.0)
    real = {"data": "real held-out", "n": len(y_test)}
    records = [_record(DIGITS_MODEL, spec, "classifier_accuracy", acc_real, real)]
    records += [_record(DIGITS_MODEL, spec, "classifier_accuracy", acc, {"data": "generated", "sampler": k, **settings})
                for k, acc in evals.items()]
    records += [_record(DIGITS_MODEL, spec, m, v, {"data": "ddim20 vs ddim50", **settings})
                for m, v in (("psnr", psnr_20_50), ("ssim", ssim_20_50))]
    build = {
        "command": command, "device": device_desc, "seed": args.seed, "steps": args.steps, "steps_done": steps_done,
        "batch_size": args.batch_size, "classifier_train_s": round(clf_s, 1), "unet_train_s": round(train_s, 1),
        "total_s": round(time.time() - t_total, 1),
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "records": records,
    }
    (args.out / "build.json").write_text(json.dumps(build, indent=1, allow_nan=False) + "\n")
    write_card(args.out)
    print(f"saved to {args.out} in {build['total_s'] / 60:.1f} min")


def write_card(out: Path) -> None:
    """README.md from build.json; parameter counts are read from the saved weights (and written back to build.json)."""
    from safetensors import safe_open

    build = json.loads((out / "build.json").read_text())
    for key, file in (("unet_params", "unet/diffusion_pytorch_model.safetensors"),
                      ("classifier_params", "classifier.safetensors")):
        with safe_open(str(out / file), "pt") as f:
            build[key] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    (out / "build.json").write_text(json.dumps(build, indent=1, allow_nan=False) + "\n")

    records = build["records"]
    real = next(r for r in records if r["params"].get("data") == "real held-out")
    generated = [r for r in records if r["params"].get("data") == "generated"]
    pair = {r["metric"]: r["value"] for r in records if r["params"].get("data") == "ddim20 vs ddim50"}
    names = {"ddim50": "DDIM 50 steps", "ddim20": "DDIM 20 steps", "ddim10": "DDIM 10 steps",
             "dpm10": "DPM-Solver++ 10 steps, thresholding"}
    acc_rows = "\n".join(f"| classifier accuracy, generated ({names[r['params']['sampler']]}) | {r['value']:.3f} |"
                         for r in generated)
    eval_n = generated[0]["params"]["n"]
    n_test = real["params"]["n"]
    (out / "README.md").write_text(CARD.format(
        params=build["unet_params"], clf_params=build["classifier_params"],
        unet_mb=(out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20,
        grid_n=min(100, eval_n), grid_steps=50, n_train=N_DIGITS - n_test, n_test=n_test,
        steps_done=build["steps_done"], batch_size=build["batch_size"], train_min=build["unet_train_s"] / 60,
        device_desc=build["device"],
        clf_s=build["classifier_train_s"], acc_real=real["value"], acc_rows=acc_rows, eval_n=eval_n,
        psnr_20_50=pair["psnr"], ssim_20_50=pair["ssim"], total_min=build["total_s"] / 60, command=build["command"],
        torch_version=real["versions"]["torch"], diffusers_version=real["versions"]["diffusers"],
    ))

if __name__ == "__main__":
    main()
