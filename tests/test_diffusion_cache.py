"""Diffusion caches (deepcache, fora, fbcache) on tiny UNet and transformer pipelines, CPU.

What must hold for every cache: with reuse off (interval 1 / threshold 0) the output is bit-identical to the
uncached model; with reuse on, exactly the expected block calls are skipped (counted on submodules inside the
blocks, which only run when the block really computes) and the output changes, boundedly; `hf_accel.remove`
restores bit-identical outputs and leaves no hook behind; the state resets between generations; cond and uncond
streams keep separate caches.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

import hf_accel
from hf_accel.errors import UnsupportedModelError
from hf_accel.plugins.diffusion_cache import cache_stats, diffusion_calibrate
from hf_accel.plugins.diffusion_cache import _hooks as H
from hf_accel.plugins.diffusion_cache.calibrate import _fit
from hf_accel.quality.digits_pipeline import DigitsPipeline

DIGITS = Path(hf_accel.__file__).parent / "quality" / "assets" / "digits"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


# -- tiny models --------------------------------------------------------------------------------------------------
def sd_pipe(seed: int = 0) -> StableDiffusionPipeline:
    """SD-shaped: UNet2DConditionModel with cross-attention down/up blocks, VAE; prompt embeddings given directly."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_images(pipe, steps: int = 7, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    pe, ne = torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 5, 16, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=5.0, height=16, width=16,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt").images


def digits_pipe(seed: int = 0) -> DigitsPipeline:
    """The digits reference's architecture (UNet2DModel, class-conditional) with random weights."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=16, num_class_embeds=11).eval()
    pipe = DigitsPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digits_images(pipe, steps: int = 10, n: int = 4, seed: int = 0, guidance: float = 1.0) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(class_labels=[i % 10 for i in range(n)], num_inference_steps=steps, generator=gens,
                guidance_scale=guidance, output_type="pt").images


def dit_pipe(seed: int = 0) -> DiTPipeline:
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=4, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_images(pipe, steps: int = 6) -> torch.Tensor:
    out = pipe(class_labels=[0, 1], num_inference_steps=steps, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    return torch.from_numpy(out)


def flux_model(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12,
                                  axes_dims_rope=(2, 2, 4)).eval()


def flux_loop(model, steps: int = 6, streams: str = "one", feed_uncond: bool = True) -> list[torch.Tensor]:
    """A custom flow-matching loop (no pipeline). streams: "one" call per step, "calls" cond + uncond as two calls,
    "context" the same inside diffusers' cache_context("cond"/"uncond"). Returns the cond output of every step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=g)
    ehs, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 12, generator=g)
    img_ids = torch.stack([torch.zeros(16), torch.arange(16.0) // 4, torch.arange(16.0) % 4], 1)
    txt_ids = torch.zeros(5, 3)
    ts = torch.linspace(1, 1 / steps, steps).tolist() + [0.0]
    outs = []

    def call(name, e):
        kw = dict(encoder_hidden_states=e, pooled_projections=pooled, timestep=torch.tensor([ts[i]]),
                  img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
        if streams == "context":
            with model.cache_context(name):
                return model(x, **kw)[0]
        return model(x, **kw)[0]

    with torch.no_grad():
        for i in range(steps):
            v = call("cond", ehs)
            outs.append(v)
            if streams != "one":
                u = call("uncond", ehs * 0)
                v = u + 2 * (v - u) if feed_uncond else v
            x = x + (ts[i + 1] - ts[i]) * v
    return outs


class Counter:
    """Counts real computations of submodules (a forward hook on a module *inside* a block only fires when the
    block computes, not when a cache hook returns a kept output)."""

    def __init__(self, **modules):
        self.n = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(*_):
            self.n[key] += 1
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def psnr(a, b) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def no_hooks_left(model: torch.nn.Module) -> bool:
    return not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in model.modules())


# -- registration and errors --------------------------------------------------------------------------------------
def test_registered_as_diffusion_caches():
    infos = {i.name: i for i in hf_accel.list_plugins()}
    for name in ("deepcache", "fora", "fbcache"):
        cls = infos[name].cls
        assert cls.family is hf_accel.Family.DIFFUSION_CACHE
        assert cls.supported_kinds == {hf_accel.ModelKind.DIFFUSION_PIPELINE, hf_accel.ModelKind.DIFFUSION_MODEL}
    with pytest.raises(hf_accel.ConflictError):
        hf_accel.AccelConfig.from_spec("deepcache+fbcache")


def test_wrong_architecture_is_refused_and_nothing_changes():
    pipe = sd_pipe()
    with pytest.raises(UnsupportedModelError, match="deepcache or fbcache"):
        hf_accel.apply(pipe, "fora")
    with pytest.raises(UnsupportedModelError, match="not a UNet"):
        hf_accel.apply(dit_pipe(), "deepcache")
    with pytest.raises(UnsupportedModelError, match="depth must be in 0..5"):
        hf_accel.apply(pipe, "deepcache(depth=6)")
    with pytest.raises(hf_accel.OptionError):
        hf_accel.apply(pipe, "deepcache(interval=0)")
    assert not hf_accel.get_config(pipe) and no_hooks_left(pipe.unet)


# -- deepcache ----------------------------------------------------------------------------------------------------
def test_unet_split_follows_the_skip_connections():
    unet = sd_pipe().unet
    s = H.split_unet(unet, 1)
    # 6 skip connections: conv_in, 2 layers + downsampler of block 0, 2 layers of block 1
    assert s.n_skips == 6
    assert s.shallow == ["conv_in", "down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
                         "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.1.resnets.2",
                         "up_blocks.1.attentions.2"]
    assert s.boundary == "up_blocks.1.attentions.0" and s.probe[0] == "down_blocks.0.attentions.0"
    assert H.split_unet(unet, 5).deep[0][0] == "mid_block"  # everything shallow but the mid block (and up 0)


@pytest.mark.parametrize("make,run", [(sd_pipe, sd_images), (digits_pipe, digits_images)], ids=["sd", "digits"])
def test_deepcache_interval_1_is_exact_and_remove_restores(make, run):
    pipe = make()
    ref = run(pipe)
    hf_accel.apply(pipe, "deepcache(interval=1)")
    assert torch.equal(run(pipe), ref)
    hf_accel.remove(pipe)
    assert torch.equal(run(pipe), ref) and no_hooks_left(pipe.unet)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_deepcache_skips_the_deep_branch_on_the_expected_steps(depth):
    pipe = sd_pipe()
    ref = sd_images(pipe)
    unet = pipe.unet
    count = Counter(conv_in=unet.conv_in, mid=unet.mid_block.resnets[0].conv1,
                    down1=unet.down_blocks[1].resnets[0].conv1, last=unet.up_blocks[-1].resnets[-1].conv1,
                    up0=unet.up_blocks[0].resnets[0].conv1)
    hf_accel.apply(pipe, f"deepcache(interval=3, depth={depth})")
    out = sd_images(pipe, steps=7)
    count.close()
    # 7 steps, one UNet call each (cond + uncond batched): full at steps 0, 3, 6
    assert count.n == {"conv_in": 7, "mid": 3, "down1": 7 if depth >= 4 else 3, "last": 7, "up0": 3}
    stats = cache_stats(pipe, "deepcache")
    assert (stats.calls, stats.full, stats.reused) == (7, 3, 4)
    assert not torch.equal(out, ref)
    assert psnr(out, ref) > 20  # bounded change (random weights, 7 steps; measured 30-40 dB)
    hf_accel.remove(pipe)
    assert torch.equal(sd_images(pipe), ref)


def test_deepcache_state_resets_between_generations_and_batch_sizes():
    pipe = sd_pipe()
    hf_accel.apply(pipe, "deepcache(interval=4)")
    a = sd_images(pipe, steps=6, seed=1)
    b = sd_images(pipe, steps=9, seed=2)  # a different generation in between, other step count
    c = sd_images(pipe, steps=6, seed=1)
    d = sd_images(pipe, steps=6, seed=1, batch=2)  # batch size changes: new state, no shape errors
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert cache_stats(pipe, "deepcache").generations == 4
    fresh = sd_pipe()
    hf_accel.apply(fresh, "deepcache(interval=4)")
    assert torch.equal(sd_images(fresh, steps=9, seed=2), b)  # no leftovers of generation a in b
    assert torch.equal(sd_images(fresh, steps=6, seed=1, batch=2), d)


def test_deepcache_cfg_batch_digits():
    pipe = digits_pipe()
    ref = digits_images(pipe, guidance=3.0)  # cond + uncond in one batch of 8
    hf_accel.apply(pipe, "deepcache(interval=1, depth=2)")
    assert torch.equal(digits_images(pipe, guidance=3.0), ref)
    hf_accel.remove(pipe)
    hf_accel.apply(pipe, "deepcache(interval=2, depth=2)")
    out = digits_images(pipe, guidance=3.0)
    stats = cache_stats(pipe, "deepcache")
    assert (stats.calls, stats.full, stats.reused) == (10, 5, 5)
    # random weights: features change a lot between steps (relative L1 0.2-0.8), so only finiteness is checked
    # here; quality is measured on the trained reference (test_calibrate_on_the_digits_reference, the benchmark)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


# -- fora ---------------------------------------------------------------------------------------------------------
def test_fora_on_dit_pipeline_with_cfg_batch():
    pipe = dit_pipe()
    ref = dit_images(pipe)
    hf_accel.apply(pipe, "fora(interval=1)")
    assert torch.equal(dit_images(pipe), ref)
    hf_accel.remove(pipe)
    blocks = pipe.transformer.transformer_blocks
    count = Counter(first=blocks[0].ff, last=blocks[-1].ff)
    hf_accel.apply(pipe, "fora(interval=3)")
    out = dit_images(pipe, steps=6)
    count.close()
    assert count.n == {"first": 2, "last": 2}  # steps 0 and 3 of 6
    assert not torch.equal(out, ref) and psnr(out, ref) > 15
    hf_accel.remove(pipe)
    assert torch.equal(dit_images(pipe), ref) and no_hooks_left(pipe.transformer)


@pytest.mark.parametrize("streams", ["one", "calls", "context"])
def test_fora_flux_custom_loop(streams):
    model = flux_model()
    ref = flux_loop(model, streams=streams)
    count = Counter(double=model.transformer_blocks[1].ff, single=model.single_transformer_blocks[2].proj_mlp)
    hf_accel.apply(model, "fora(interval=2)")
    out = flux_loop(model, streams=streams)
    count.close()
    calls = 2 if streams != "one" else 1
    assert count.n == {"double": 3 * calls, "single": 3 * calls}  # steps 0, 2, 4 of 6, per stream
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[1], ref[1])
    assert float((out[-1] - ref[-1]).norm() / ref[-1].norm()) < 0.5
    hf_accel.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(flux_loop(model, streams=streams), ref))


@pytest.mark.parametrize("streams", ["calls", "context"])
def test_cond_and_uncond_streams_keep_separate_caches(streams):
    """The cond trajectory (uncond output discarded) must not depend on interleaved uncond calls."""
    a, b = flux_model(), flux_model()
    hf_accel.apply(a, "fora(interval=2)")
    hf_accel.apply(b, "fora(interval=2)")
    alone = flux_loop(a, streams="one")
    mixed = flux_loop(b, streams=streams, feed_uncond=False)
    assert all(torch.equal(x, y) for x, y in zip(alone, mixed))


# -- fbcache ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,run", [(sd_pipe, sd_images), (digits_pipe, digits_images), (dit_pipe, dit_images)],
                         ids=["sd", "digits", "dit"])
def test_fbcache_threshold_0_is_exact(make, run):
    pipe = make()
    ref = run(pipe)
    hf_accel.apply(pipe, "fbcache(threshold=0)")
    assert torch.equal(run(pipe), ref)
    hf_accel.remove(pipe)
    assert torch.equal(run(pipe), ref)


def test_fbcache_huge_threshold_reuses_all_but_warmup_and_respects_max_skip():
    model = flux_model()
    ref = flux_loop(model)
    count = Counter(head=model.transformer_blocks[0].ff, tail=model.single_transformer_blocks[-1].proj_mlp)
    hf_accel.apply(model, "fbcache(threshold=1e9, warmup=1)")
    out = flux_loop(model)
    assert count.n == {"head": 6, "tail": 1}  # the head block always runs; the rest only at the warmup step
    assert torch.equal(out[0], ref[0]) and not torch.equal(out[-1], ref[-1])
    hf_accel.remove(model)
    count.n = dict.fromkeys(count.n, 0)
    hf_accel.apply(model, "fbcache(threshold=1e9, warmup=1, max_skip=2)")
    flux_loop(model)
    count.close()
    assert count.n == {"head": 6, "tail": 2}  # computed at steps 0 and 3
    assert [s for s, _ in cache_stats(model, "fbcache").diffs] == [1, 2, 4, 5]


def test_fbcache_unet_reuses_the_deep_branch_adaptively():
    pipe = sd_pipe()
    unet = pipe.unet
    count = Counter(conv_in=unet.conv_in, mid=unet.mid_block.resnets[0].conv1)
    hf_accel.apply(pipe, "fbcache(threshold=1e9, depth=1)")
    sd_images(pipe, steps=7)
    count.close()
    assert count.n == {"conv_in": 7, "mid": 1}
    stats = cache_stats(pipe, "fbcache")
    assert stats.full == 1 and stats.reused == 6 and len(stats.diffs) == 6


def test_correction_fit_is_exact_least_squares_and_changes_reuse():
    q0 = torch.randn(2, 4, 8, 8)
    trace, q = [], q0
    for s, t in enumerate([900.0, 700.0, 500.0, 300.0]):
        trace.append((("cond", 0), s, t, q))
        q = 0.5 * q + 0.25
    ts, a, b = _fit(trace)
    assert ts == (700.0, 500.0, 300.0)
    assert all(abs(x - 0.5) < 1e-5 for x in a) and all(abs(x - 0.25) < 1e-5 for x in b)

    model = flux_model()
    hf_accel.apply(model, "fbcache(threshold=1e9)")
    plain = flux_loop(model)
    hf_accel.remove(model)
    steps = torch.linspace(1, 1 / 6, 6).tolist()
    identity = dict(cal_timesteps=steps, cal_scale=[1.0] * 6, cal_offset=[0.0] * 6)
    hf_accel.apply(model, {"fbcache": dict(threshold=1e9, correction=True, **identity)})
    assert all(torch.equal(x, y) for x, y in zip(flux_loop(model), plain))  # (1, 0): plain reuse
    hf_accel.remove(model)
    coefficients = dict(cal_timesteps=steps, cal_scale=[0.5] * 6, cal_offset=[0.0] * 6)
    hf_accel.apply(model, {"fbcache": dict(threshold=1e9, correction=True, **coefficients)})
    corrected = flux_loop(model)
    assert torch.equal(corrected[0], plain[0]) and not torch.equal(corrected[-1], plain[-1])
    hf_accel.remove(model)
    hf_accel.apply(model, {"fbcache": dict(threshold=1e9, **coefficients)})  # correction is opt-in
    assert all(torch.equal(x, y) for x, y in zip(flux_loop(model), plain))


# -- calibration --------------------------------------------------------------------------------------------------
def test_calibrate_meets_target_psnr_and_saves_with_the_pipeline(tmp_path):
    pipe = digits_pipe()
    labels = list(range(6))
    res = diffusion_calibrate(pipe, target_psnr=30.0, labels=labels, steps=12, seed=5,
                              thresholds=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4))
    assert res.met and res.psnr >= 30.0 and res.threshold > 0
    assert len(res.cal_timesteps) == 11  # every step after the first has a fitted correction
    plugin = hf_accel.get_config(pipe).plugins[0]
    assert plugin.threshold == res.threshold and plugin.cal_scale == res.cal_scale
    # independent check on the same seeds: uncached vs cached at the chosen threshold
    gens = lambda: [torch.Generator().manual_seed(5 + i) for i in range(6)]  # noqa: E731
    cached = pipe(class_labels=labels, num_inference_steps=12, generator=gens(), output_type="pt").images
    hf_accel.remove(pipe)
    ref = pipe(class_labels=labels, num_inference_steps=12, generator=gens(), output_type="pt").images
    per_image = [psnr(a, b) for a, b in zip(cached, ref)]
    assert sum(per_image) / len(per_image) >= 30.0
    # the choice saves with the artifact and comes back on load
    hf_accel.apply(pipe, plugin)
    pipe.save_pretrained(tmp_path / "p")
    again = DigitsPipeline.from_pretrained(tmp_path / "p")
    restored = hf_accel.get_config(again).plugins[0]
    assert (restored.threshold, restored.cal_timesteps) == (res.threshold, res.cal_timesteps)


def test_calibrate_target_speedup():
    pipe = digits_pipe()
    res = diffusion_calibrate(pipe, target_speedup=2.0, labels=[0, 1, 2], steps=10, fit_correction=False)
    assert res.met and res.step_speedup >= 2.0 and res.cal_timesteps == ()
    assert res.threshold == min(r["threshold"] for r in res.rows if r["step_speedup"] >= 2.0)
    stats = cache_stats(pipe, "fbcache")  # independent re-run at the stored threshold
    c0, f0 = stats.calls, stats.full
    digits_images(pipe, steps=10, n=3)
    assert (stats.calls - c0) / (stats.full - f0) >= 2.0


@pytest.mark.skipif(not (DIGITS / "model_index.json").exists(), reason="digits reference not built")
def test_calibrate_on_the_digits_reference():
    from hf_accel.quality.diffusion import generate, load_digits_reference
    from hf_accel.quality.diffusion import psnr as psnr_img

    pipe, _ = load_digits_reference()
    res = diffusion_calibrate(pipe, target_psnr=30.0, labels=list(range(10)), steps=20, seed=0)
    assert res.met and res.psnr >= 30 and res.step_speedup > 1.2
    test, _ = generate(pipe, 10, seed=0, steps=20)
    hf_accel.remove(pipe)
    ref, _ = generate(pipe, 10, seed=0, steps=20)
    assert float(psnr_img(test, ref).mean()) >= 30.0


# -- torch.compile ------------------------------------------------------------------------------------------------
def test_hooks_first_then_compile_per_block():
    """Documented order: apply the cache, then compile each block in place. The compiled blocks give the eager
    cached result and keep a bounded number of graphs (compute / reuse), not one per step."""
    import torch._dynamo

    model = flux_model()
    hf_accel.apply(model, "fora(interval=2)")
    eager = flux_loop(model)
    torch._dynamo.reset()
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.compile(backend="eager")
    compiled = flux_loop(model)
    compiled2 = flux_loop(model, steps=8)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager, compiled))
    assert len(compiled2) == 8
    hf_accel.remove(model)
    torch._dynamo.reset()
