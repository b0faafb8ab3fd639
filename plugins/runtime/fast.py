"""`fast`: transformers' generate() on a static KV cache with the decode step captured as a CUDA graph.

The engine lives in `hf_accel.runtime` (its docstring holds the contract for other plugins); this plugin only
attaches a `Runtime` to the model and patches `model.generate` on the instance, through the Patcher, so that
`hf_accel.remove(model)` restores the original method and releases the cache and graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hf_accel.errors import OptionError, UnsupportedModelError
from hf_accel.plugin import Family, Plugin
from hf_accel.runtime import RUNTIME_ATTR, Runtime, wrap_generate
from hf_accel.runtime.attention import DECODE_ATTENTION


@dataclass
class FastRuntime(Plugin):
    """Static KV cache, CUDA-graph decode steps and on-GPU sampling inside model.generate()."""

    name = "fast"
    family = Family.RUNTIME
    conflicts_with = ("family:runtime",)

    # torch.compile the decode step's forward (CUDA only): True or "full", the whole forward as one graph;
    # "regional", one decoder layer compiled and reused by every layer (first compile ~1 layer's); False: eager
    compile: bool | Literal["full", "regional"] = True
    cuda_graphs: bool = True  # capture each decode step as one CUDA graph (CUDA only)
    prefill_tokens: int = 16384  # prompt tokens per prefill forward: long batches are prefilled in groups of rows
    lookahead: int = 2  # decode steps queued ahead of the host's EOS / streaming read-back
    decode_attention: str = "matmul"  # "matmul" (spread over the cache length) or "sdpa" (PyTorch's kernel)
    tune: bool = True  # inductor coordinate-descent tuning of the compiled step (longer first compile)

    def __post_init__(self):
        if self.prefill_tokens < 1:
            raise OptionError(f"plugin 'fast': option 'prefill_tokens' must be >= 1, got {self.prefill_tokens}")
        if not 0 <= self.lookahead <= 64:
            raise OptionError(f"plugin 'fast': option 'lookahead' must be in [0, 64], got {self.lookahead}")
        if self.decode_attention not in DECODE_ATTENTION:
            raise OptionError(f"plugin 'fast': option 'decode_attention' must be one of {list(DECODE_ATTENTION)}, "
                              f"got {self.decode_attention!r}")

    def check(self, model):
        super().check(model)
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"plugin 'fast' runs decoder-only models; {type(model).__name__} is an encoder-decoder model"
            )

    def apply(self, model, patcher):
        runtime = Runtime(model, compile=self.compile, cuda_graphs=self.cuda_graphs,
                          prefill_tokens=self.prefill_tokens, lookahead=self.lookahead,
                          decode_attention=self.decode_attention, tune=self.tune)
        patcher.set_attr(model, RUNTIME_ATTR, runtime)
        patcher.set_attr(model, "generate", wrap_generate(model, runtime, model.generate))

    def card_metadata(self, model):
        return {"runtime": "fast", "compile": self.compile, "cuda_graphs": self.cuda_graphs}
