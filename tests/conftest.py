"""Shared fixtures: tiny models of several real transformers architectures, built from configs (no downloads)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import hf_accel  # noqa: F401  (installs the integrations)

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=None)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**_COMMON, head_dim=16)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}


# --- parallel runs (pytest-xdist; pyproject's addopts say `-n auto --dist loadfile --no-loadscope-reorder`) ---------
# A worker runs whole test files (their module fixtures are built once). Files that take longest on the 2-core CI
# machine go first, so that the run does not end on one long file while the other workers sit idle (seconds measured
# in process on CI's kind of machine; the order only matters to xdist's scheduler).
HEAVY_FIRST = ["test_runtime_regional", "test_kv_quant_attention", "test_medusa", "test_kv_evict_fast", "test_kv_fast",
               "test_kv_adakv_fast", "test_speculative_fast", "test_distributed", "test_diffusion_cache",
               "test_quality", "test_kv_h2o_fast", "test_runtime"]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU (at most 8) for a run over several test files. In process: a run of one file
    (spawning workers would only add their start-up), a machine with one CPU, and a machine with CUDA (GPU tests
    capture graphs, measure memory and time kernels on a GPU of their own)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    files = {arg.split("::")[0] for arg in config.args}
    if len(files) == 1 and os.path.isfile(next(iter(files))):
        return 0
    if _cpus() < 2 or torch.cuda.is_available():
        return 0
    return min(8, _cpus())


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker gets its share of the cores: more intra-op threads than cores only add contention (tiny models).
    _share = max(1, _cpus() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    if torch.get_num_threads() > _share:
        torch.set_num_threads(_share)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects the same order; the scheduler follows it
        rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
        items.sort(key=lambda item: rank.get(getattr(getattr(item, "module", None), "__name__", ""), len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch]().eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (use with `pytest.mark.usefixtures`): on a busy 2-core machine
    threads only add syncing and contention (10x slower on 16x16 images)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plugin_doubles():
    """Register the test-only plugins of plugin_doubles.py for one test."""
    from hf_accel.registry import registry
    from plugin_doubles import ALL

    for cls in ALL:
        registry.register(cls, "tests", "0")
    yield ALL
    for cls in ALL:
        registry.unregister(cls.name)


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def saved_model(tmp_path, arch):
    """A tiny model of `arch` saved as a normal checkpoint; returns (path, model)."""
    model = build(arch)
    path = tmp_path / f"{arch}-base"
    model.save_pretrained(path)
    return path, model


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_types(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def sample_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def make_tokenizer():
    """A character-level fast tokenizer over VOCAB ids (pad 0, bos 1, eos 2), built without downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
