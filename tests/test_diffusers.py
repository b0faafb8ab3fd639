"""diffusers: accel= on pipelines and models, pipelines as targets, artifacts that reload bit-identically (locally and
through the loopback Hub), loud failures for bad artifacts, atomic apply across a pipeline's parts."""

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DModel,
)
from huggingface_hub import ModelCard

import hf_accel
from hf_accel.artifacts import GUARD_MESSAGE
from hf_accel.diffusers_models import AccelUNet2DModel
from hf_accel.errors import AccelError, ArtifactError, ConflictError, UnknownPluginError, UnsupportedModelError
from hf_accel.plugin import Family, ModelKind, Plugin
from hf_accel.registry import registry

from conftest import module_types, state_hash
from hub_server import local_hub_fixture
from plugin_doubles import DiffusionOnly, OtherQuant

hub = local_hub_fixture()


# -- test plugins -------------------------------------------------------------------------------------------------
@dataclass
class ScaleNoise(Plugin):
    """Runtime patch of a denoiser: scales its prediction through a forward hook (removable)."""

    name = "scale_noise"
    family = Family.RUNTIME
    supported_kinds = frozenset({ModelKind.DIFFUSION_MODEL})
    factor: float = 0.5

    def apply(self, model, patcher):
        def hook(module, args, output):
            output.sample = output.sample * self.factor
            return output

        patcher.add_hook("noise scale hook", model.register_forward_hook(hook).remove)


@dataclass
class ExplodeInDenoiser(Plugin):
    """Rewrites a denoiser module, then fails."""

    name = "explode_denoiser"
    family = Family.RUNTIME
    supported_kinds = frozenset({ModelKind.DIFFUSION_MODEL})

    def apply(self, model, patcher):
        patcher.swap_module(model, "conv_in", torch.nn.Identity(), rewrites_weights=True)
        raise RuntimeError("boom")


@dataclass
class ExplodeInPipeline(Plugin):
    """Patches the pipeline, then fails (after int8 has already rewritten the denoiser)."""

    name = "explode_pipeline"
    family = Family.DIFFUSION_CACHE
    supported_kinds = frozenset({ModelKind.DIFFUSION_PIPELINE})

    def apply(self, model, patcher):
        patcher.set_attr(model, "patched", True)
        raise RuntimeError("boom")


PLUGINS = (ScaleNoise, ExplodeInDenoiser, ExplodeInPipeline, DiffusionOnly, OtherQuant)


@pytest.fixture(scope="module", autouse=True)
def setup():  # module scope: runs before the module-scoped artifacts, so every image is made with one thread
    for cls in PLUGINS:
        registry.register(cls, "tests", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only add contention
    yield
    torch.set_num_threads(threads)
    for cls in PLUGINS:
        registry.unregister(cls.name)


# -- tiny pipelines -----------------------------------------------------------------------------------------------
def ddpm(seed: int = 0) -> DDPMPipeline:
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    return _quiet(DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)))


def dit(seed: int = 0) -> DiTPipeline:
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=8).eval()
    return _quiet(DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=50)))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    if isinstance(pipe, DiTPipeline):
        return pipe(class_labels=[0, 1], num_inference_steps=2, guidance_scale=2.0, generator=g, output_type="np").images
    return pipe(batch_size=2, num_inference_steps=3, generator=g, output_type="np").images


def load(path, **kwargs):
    return _quiet(DiffusionPipeline.from_pretrained(path, **kwargs))


def linear_types(model) -> set[str]:
    return {type(m).__name__ for n, m in model.named_modules() if n.endswith(("to_q", "to_k", "to_v", "time_emb_proj"))}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A plain DDPM pipeline on disk."""
    path = tmp_path_factory.mktemp("ddpm") / "base"
    ddpm().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """An int8 DDPM artifact on disk and the images of the pipeline that saved it."""
    pipe = hf_accel.apply(ddpm(), "int8")
    path = tmp_path_factory.mktemp("ddpm") / "int8"
    pipe.save_pretrained(path)
    return path, images(pipe)


# -- pipelines as targets -----------------------------------------------------------------------------------------
def test_accel_on_pipeline_and_component_loads(base_dir):
    float_images = images(load(base_dir))
    for pipe in (load(base_dir, accel="int8"), _quiet(DDPMPipeline.from_pretrained(base_dir, accel="int8")),
                 hf_accel.apply(load(base_dir), "int8")):
        assert linear_types(pipe.unet) == {"Int8Linear"}
        assert type(pipe.unet) is AccelUNet2DModel and isinstance(pipe.unet, UNet2DModel)
        assert hf_accel.get_config(pipe).to_string() == hf_accel.get_config(pipe.unet).to_string() == "int8(skip=[lm_head], outliers=0.0, calibration_tokens=32768, calibration_seq_len=512, method=rtn)"
        assert pipe.unet.config._hf_accel["plugins"] == [{"name": "int8", "options": {
            "skip": ["lm_head"], "outliers": 0.0, "calibration_tokens": 32768, "calibration_seq_len": 512, "method": "rtn"}}]
        out = images(pipe)
        assert 0 < np.abs(out - float_images).max() < 0.05  # int8 per channel: a small, real difference

    for cls in (UNet2DModel, AccelUNet2DModel):
        unet = cls.from_pretrained(base_dir, subfolder="unet", accel="int8")
        assert type(unet) is AccelUNet2DModel and linear_types(unet) == {"Int8Linear"}


def test_plugins_act_on_the_pipeline_or_its_denoiser():
    pipe = ddpm()
    hf_accel.apply(pipe, "int8+diffusion_only")  # int8 acts on pipe.unet, diffusion_only on the pipeline
    assert hf_accel.get_config(pipe).names == ["int8", "diffusion_only"]
    assert hf_accel.get_config(pipe.unet).names == ["int8"]
    assert pipe.config._hf_accel["plugins"] == [{"name": "diffusion_only", "options": {}}]
    with pytest.raises(ConflictError):  # conflicts are checked against every part of the pipeline
        hf_accel.apply(pipe, "otherquant")
    with pytest.raises(UnsupportedModelError, match="does not support AccelUNet2DModel .*accepts: diffusion_pipeline"):
        hf_accel.apply(pipe.unet, "scale_noise+explode_pipeline")
    with pytest.raises(UnknownPluginError):  # before any file is looked at
        DiffusionPipeline.from_pretrained("/does/not/exist", accel="int9")


def test_transformer_pipeline_targets_the_transformer(tmp_path):
    pipe = dit()
    hf_accel.apply(pipe, "int8")
    assert type(pipe.transformer).__name__ == "AccelDiTTransformer2DModel"
    assert linear_types(pipe.transformer) == {"Int8Linear"} and "Int8Linear" not in str(module_types(pipe.vae))
    expected = images(pipe)
    pipe.save_pretrained(tmp_path / "dit")
    index = json.loads((tmp_path / "dit" / "model_index.json").read_text())
    assert index["transformer"] == ["hf_accel.diffusers_models", "AccelDiTTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    reloaded = load(tmp_path / "dit")
    assert module_types(reloaded.transformer) == module_types(pipe.transformer)
    assert np.array_equal(images(reloaded), expected)


# -- artifacts ----------------------------------------------------------------------------------------------------
def test_save_and_reload_is_bit_identical(artifact, tmp_path):
    path, expected = artifact
    index = json.loads((path / "model_index.json").read_text())
    assert index["unet"] == ["hf_accel.diffusers_models", "AccelUNet2DModel"]
    config = json.loads((path / "unet" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": GUARD_MESSAGE}
    assert set(config["_hf_accel"]["checksums"]) == {"diffusion_pytorch_model.safetensors"}
    assert not (path / "unet" / "README.md").exists()  # one card, at the pipeline root
    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.hf_accel["spec"] == "int8(skip=[lm_head], outliers=0.0, calibration_tokens=32768, calibration_seq_len=512, method=rtn)"
    assert "DiffusionPipeline.from_pretrained" in card.text and "unet/diffusion_pytorch_model.safetensors" in card.text

    pipe = load(path)  # no accel=: the artifact says what it is
    assert hf_accel.get_config(pipe).names == ["int8"] and type(pipe.unet) is AccelUNet2DModel
    assert np.array_equal(images(pipe), expected)
    assert "quantization_config" not in pipe.unet.config  # the guard is lifted

    sample, t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([7])
    reference = pipe.unet(sample, t).sample
    for unet in (AccelUNet2DModel.from_pretrained(path, subfolder="unet"), UNet2DModel.from_pretrained(path / "unet")):
        assert type(unet) is AccelUNet2DModel and state_hash(unet) == state_hash(pipe.unet)
        assert torch.equal(unet(sample, t).sample, reference)

    pipe.save_pretrained(tmp_path / "again")  # a reloaded artifact saves again, identically
    assert np.array_equal(images(load(tmp_path / "again")), expected)
    pipe.unet.save_pretrained(tmp_path / "unet-only")  # a component alone is an artifact with its own card
    card = ModelCard.load(tmp_path / "unet-only" / "README.md")
    assert card.data.library_name == "diffusers" and "UNet2DModel.from_pretrained" in card.text
    assert state_hash(UNet2DModel.from_pretrained(tmp_path / "unet-only")) == state_hash(pipe.unet)


def test_sharded_variant_and_dtype(artifact, tmp_path):
    pipe = load(artifact[0], dtype=torch.bfloat16)
    to_q = pipe.unet.down_blocks[1].attentions[0].to_q
    assert (to_q.weight.dtype, to_q.weight_scale.dtype, pipe.unet.conv_in.weight.dtype) == (torch.int8, torch.bfloat16, torch.bfloat16)
    pipe.save_pretrained(tmp_path / "v", variant="fp16", max_shard_size=200_000)
    checksums = json.loads((tmp_path / "v" / "unet" / "config.json").read_text())["_hf_accel"]["checksums"]
    assert sorted(checksums) == [f"diffusion_pytorch_model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    reloaded = load(tmp_path / "v", variant="fp16", dtype=torch.bfloat16)
    assert state_hash(reloaded.unet) == state_hash(pipe.unet)
    card = hf_accel.render_card(None, tmp_path / "v")  # `hf-accel card DIR`: from the folder alone
    assert card.data.hf_accel["spec"] == "int8(skip=[lm_head], outliers=0.0, calibration_tokens=32768, calibration_seq_len=512, method=rtn)" and "unet/" + sorted(checksums)[0] in card.text


def test_runtime_plugins_reload_and_remove(tmp_path):
    pipe = ddpm()
    hf_accel.apply(pipe, "int8+scale_noise(factor=0.5)+diffusion_only")
    expected = images(pipe)
    pipe.save_pretrained(tmp_path / "a")
    reloaded = load(tmp_path / "a")
    assert hf_accel.get_config(reloaded) == hf_accel.get_config(pipe)
    assert hf_accel.get_config(reloaded.unet).names == ["int8", "scale_noise"]
    assert np.array_equal(images(reloaded), expected)

    with pytest.warns(UserWarning, match="cannot be undone"):
        left = hf_accel.remove(reloaded)
    assert left and all(line.startswith("int8:") for line in left)
    assert hf_accel.get_config(reloaded).names == ["int8"]  # still true of the model, and still saved as such
    assert "_hf_accel" not in reloaded.config and type(reloaded.unet) is AccelUNet2DModel
    assert not reloaded.unet._forward_hooks


def test_remove_restores_class_and_config(tmp_path):
    pipe = ddpm()
    before = images(pipe)
    hf_accel.apply(pipe, "scale_noise")
    assert type(pipe.unet) is AccelUNet2DModel
    pipe.save_pretrained(tmp_path / "scaled")
    assert hf_accel.remove(pipe) == []
    assert type(pipe.unet) is UNet2DModel and "_hf_accel" not in pipe.unet.config and not hf_accel.get_config(pipe)
    assert np.array_equal(images(pipe), before)
    pipe.save_pretrained(tmp_path / "plain")  # model_index.json follows the class back
    assert json.loads((tmp_path / "plain" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    assert not (tmp_path / "plain" / "README.md").exists()


LOAD_WITHOUT_HF_ACCEL = textwrap.dedent(
    """
    import sys
    from diffusers import DiffusionPipeline, UNet2DModel
    for load in (lambda: DiffusionPipeline.from_pretrained(sys.argv[1]),
                 lambda: UNet2DModel.from_pretrained(sys.argv[1], subfolder="unet")):
        try:
            load()
        except Exception as e:
            print("REFUSED", type(e).__name__, str(e).replace("\\n", " "))
        else:
            print("LOADED")
    assert "hf_accel" not in sys.modules
    """
)


def test_loading_without_hf_accel_fails_loudly(artifact):
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HF_ACCEL, str(artifact[0])], capture_output=True,
                            text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("REFUSED", "LOADED"))]
    assert len(lines) == 2 and all(line.startswith("REFUSED") for line in lines), result.stdout + result.stderr
    assert "import hf_accel.diffusers_models" in lines[0]  # diffusers' own refusal names the module
    assert "pip install hf-accel" in lines[1] and "import hf_accel" in lines[1]  # the load guard


def test_tampered_and_truncated_weights_are_refused(artifact, tmp_path):
    import shutil

    path = shutil.copytree(artifact[0], tmp_path / "copy")
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in the tensor data: safetensors itself would load this silently
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        load(path)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="truncated"):
        UNet2DModel.from_pretrained(path, subfolder="unet")
    weights.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        AccelUNet2DModel.from_pretrained(path / "unet")


def test_artifact_naming_a_missing_plugin_is_refused(artifact, tmp_path):
    import shutil

    path = shutil.copytree(artifact[0], tmp_path / "copy")
    config_path = path / "unet" / "config.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["_hf_accel"]["plugins"].append({"name": "not_installed_plugin", "options": {}})
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="cannot restore .*unknown hf_accel plugin 'not_installed_plugin'"):
        load(path)
    config_path.write_text(original)
    index = json.loads((path / "model_index.json").read_text())
    index["_hf_accel"] = {"format_version": 1, "plugins": [{"name": "not_installed_cache", "options": {}}]}
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="unknown hf_accel plugin 'not_installed_cache'"):
        load(path)


def test_push_to_hub_then_from_pretrained_repo_id(hub, artifact):
    pipe = load(artifact[0])
    hf_accel.record_metric(pipe, {"metric": "psnr", "value": 40.0, "model": "tiny-ddpm", "spec": "int8",
                                  "command": "pytest tests/test_diffusers.py", "date": "2026-11-24"})
    pipe.push_to_hub("user/tiny-ddpm-int8")

    card = ModelCard.load("user/tiny-ddpm-int8")  # ours, not diffusers' generic card
    assert card.data.library_name == "diffusers" and card.data.hf_accel["metrics"][0]["metric"] == "psnr"
    reloaded = load("user/tiny-ddpm-int8")
    assert hf_accel.get_config(reloaded).names == ["int8"]
    assert np.array_equal(images(reloaded), artifact[1])
    unet = UNet2DModel.from_pretrained("user/tiny-ddpm-int8", subfolder="unet")
    assert type(unet) is AccelUNet2DModel and state_hash(unet) == state_hash(pipe.unet)
    with hub.offline():
        assert np.array_equal(images(load("user/tiny-ddpm-int8")), artifact[1])


# -- atomicity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["int8+explode_denoiser", "int8+explode_pipeline"])
def test_failed_plugin_leaves_the_pipeline_exactly_as_before(spec):
    pipe = ddpm()
    hf_accel.apply(pipe, "diffusion_only")
    before = state_hash(pipe.unet), module_types(pipe.unet), dict(pipe.config), dict(pipe.unet.config)
    with pytest.raises(AccelError, match="failed .*boom.*left unchanged"):
        hf_accel.apply(pipe, spec)  # int8 rewrites the denoiser first, then the other plugin fails
    assert (state_hash(pipe.unet), module_types(pipe.unet), dict(pipe.config), dict(pipe.unet.config)) == before
    assert type(pipe.unet) is UNet2DModel and not hasattr(pipe, "patched")
    assert hf_accel.get_config(pipe).names == ["diffusion_only"] and not hf_accel.get_config(pipe.unet)
