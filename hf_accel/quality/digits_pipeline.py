"""The digits reference: a class-conditional diffusion pipeline, its classifier, and the data both are trained on.

Data is scikit-learn's bundled handwritten digits (1797 8x8 images, 0..16 levels), upscaled bilinearly to 16x16
and scaled to [0, 1]. The split is a fixed stratified 80/20 (`random_state=0`); the UNet and the classifier see only
the train part, so the classifier's held-out accuracy is an honest yardstick for generated samples.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

IMAGE_SIZE = 16
NUM_CLASSES = 10  # class id NUM_CLASSES is the "no label" token used for classifier-free guidance


def digits_dataset(size: int = IMAGE_SIZE, test_size: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): images (N, 1, size, size) float32 in [0, 1], labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.from_numpy(digits.target).long()
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=seed, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class DigitsClassifier(nn.Module):
    """Small CNN for 16x16 digits in [0, 1]: the judge of generated samples (plain torch, stored as safetensors)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return self.head(self.features(x * 2 - 1))


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional image pipeline: `pipe(class_labels=[3, 7], num_inference_steps=20, generator=g)`.

    Every denoising step is one call of `self.unet`, so hooks and patches on the UNet apply. Any diffusers scheduler
    with the `set_timesteps`/`scale_model_input`/`step` protocol works: DDIM is saved; for DPM-Solver use
    `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, thresholding=True, sample_max_value=1.0)`
    (sampling starts at t=999, where an unclipped x0 estimate is unstable).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """class_labels default to 0..9. A list of generators (one per image) makes each image's noise independent
        of the batch it is in. output_type: "pil", "np" (N, H, W, 1) or "pt" (N, 1, H, W), values in [0, 1]."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if class_labels is None:
            class_labels = range(NUM_CLASSES)
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(self.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"class_labels must be in 0..{NUM_CLASSES - 1}, got {labels.tolist()}")
        cfg = self.unet.config
        shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        sample = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        sample = sample * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)

        step_params = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}
        guided = guidance_scale != 1.0
        if guided:  # conditional and unconditional halves in one batch, one UNet call per step
            labels = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])
        for t in self.progress_bar(self.scheduler.timesteps):
            x = self.scheduler.scale_model_input(sample, t)
            eps = self.unet(torch.cat([x, x]) if guided else x, t, class_labels=labels).sample
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(eps, t, sample, **step_kwargs).prev_sample
        self.maybe_free_model_hooks()

        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
