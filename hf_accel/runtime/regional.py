"""Regional compilation of the fast runtime's step (`fast(compile="regional")`): compile one decoder layer, reuse it.

`compile="full"` hands the whole step to torch.compile, so dynamo and inductor trace, lower and generate code for
every decoder layer (32 of them on Llama-3-8B: 77 s at batch 8, 115 s at batch 1 with coordinate-descent tuning on
an H200). The layers are the same code with different weights, and with `inline_inbuilt_nn_modules` (torch's
default) a module's parameters are graph inputs, not constants: one compiled decoder layer serves them all. Here
the step runs eagerly and calls compiled regions:

- `layer`: every decoder layer's forward, one compiled function (its cost is about one layer's);
- `rotary`, `norm`, `head`: the position embedding, the final norm and the lm_head (at batch 1, coordinate-descent
  tuning turns the lm_head into a Triton GEMV, as in the full compile);
- the step's mask (see `Runtime.forward_fn`).

The CUDA graph captures whatever runs, compiled or not, so a replay costs the same kernels; what is lost is fusion
across region boundaries (a layer's last residual add with the next layer's first norm).

What would recompile per layer, and why it does not: transformers' attention calls
`cache.update(k, v, self.layer_idx)`, and the cache indexes its layers with that integer. Dynamo specialises an
integer attribute of a module, so every layer index would be a new guard and a new compile (the 9th layer then
runs eagerly: `recompile_limit`). Inside a region the layer gets a `OneLayerCache` holding only its own KV layer,
whose `update` never reads the index; dynamo then installs no guard on it (it is read lazily, never used). The KV
layer objects differ per layer, but dynamo guards on their type and on their tensors' metadata, which are the same.
A KV plugin's layer must likewise keep per-layer Python state out of its decode path (kvquant's and the eviction
plugins' do; `tests/test_runtime_regional.py` counts graphs for them).

Assumption: a decoder layer updates only its own cache layer. Models that share K/V across layers (Gemma-3n's
`num_kv_shared_layers`) would be served wrongly by a one-layer view, so they get the full compile.
"""

from __future__ import annotations

import contextlib
import types
import weakref

import torch

from .cache import KVCache

COMPILE_MODES = {True: "full", False: None, "full": "full", "regional": "regional"}
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "norm_f")  # the base model's last norm, by architecture


def compile_mode(value) -> str | None:
    """`fast(compile=...)` -> "full", "regional" or None (eager). True keeps its old meaning: the full compile."""
    if isinstance(value, (bool, str)) and value in COMPILE_MODES:
        return COMPILE_MODES[value]
    raise ValueError(f"option 'compile' must be one of True, False, 'full', 'regional'; got {value!r}")


def own_code(fn, name: str):
    """A copy of `fn` with a code object of its own. Dynamo keeps its compiled entries (and their recompile budget)
    per code object, so each region and batch class gets its own entries, compiled with its own options."""
    names = {"co_name": name, **({"co_qualname": name} if hasattr(fn.__code__, "co_qualname") else {})}  # 3.11+
    code = fn.__code__.replace(**names)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def run_module(forward, module, *args, **kwargs):
    """The body of a module region: the module's class `forward` (its hooks ran outside, in `nn.Module.__call__`).
    `forward` is the class's function, the same object for every layer: guarded once."""
    return forward(module, *args, **kwargs)


class OneLayerCache(KVCache):
    """The cache as one decoder layer sees it inside its region: every layer index means this layer, so the index
    (a different constant per layer) is never read, hence never guarded on."""

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.layers[0].update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[0].get_seq_length()

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        return self.layers[0].get_mask_sizes(query_length)


_one_layer_caches: "weakref.WeakKeyDictionary[KVCache, list[OneLayerCache]]" = weakref.WeakKeyDictionary()


def one_layer_caches(cache: KVCache) -> list[OneLayerCache]:
    """One `OneLayerCache` per layer of a session's cache, made once (they hold the layers, not the cache)."""
    views = _one_layer_caches.get(cache)
    if views is None:
        views = _one_layer_caches[cache] = [OneLayerCache([layer]) for layer in cache.layers]
    return views


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The base model's list of decoder layers: its ModuleList child with one entry per hidden layer."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    base = getattr(model, "base_model", model)
    for child in base.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == config.num_hidden_layers:
            return child
    return None


def regional_unsupported(model) -> str | None:
    """Why the regional compile cannot serve `model` (it then gets the full compile), or None."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "num_kv_shared_layers", 0):
        return "its layers share K/V across layers (num_kv_shared_layers)"
    layers = decoder_layers(model)
    if layers is None:
        return f"no ModuleList of {config.num_hidden_layers} decoder layers found in {type(model).__name__}"
    if any("forward" in layer.__dict__ for layer in layers):  # someone's per-layer wrapper: a guard per layer
        return "its decoder layers carry an instance `forward` of their own"
    return None


class Regions:
    """The compiled regions of one model, and the context that routes its modules through them during a step."""

    def __init__(self, model, tune: bool, backend: str = "inductor"):
        self.model, self.tune, self.backend = model, tune, backend
        base = getattr(model, "base_model", model)
        self.layers = list(decoder_layers(model))
        glue = {"rotary": getattr(base, "rotary_emb", None),
                "norm": next((getattr(base, n) for n in FINAL_NORMS if hasattr(base, n)), None),
                "head": model.get_output_embeddings()}
        # a module with an instance `forward` of its own (someone else's wrapper) stays eager
        self.glue = {name: m for name, m in glue.items()
                     if isinstance(m, torch.nn.Module) and "forward" not in m.__dict__}
        self._compiled: dict[tuple, object] = {}

    def compiled(self, fn, region: str, single: bool, tree: bool):
        """`fn` compiled for one region and step kind (batch 1 or symbolic batch, chain or tree); coordinate-descent
        tuning at batch 1 only, as in the full compile."""
        key = (region, single, tree)
        if key not in self._compiled:
            name = f"{region}_region_{'single' if single else 'batched'}{'_tree' if tree else ''}"
            options = {"options": {"coordinate_descent_tuning": self.tune and single}} \
                if self.backend == "inductor" else {}
            self._compiled[key] = torch.compile(own_code(fn, name), backend=self.backend, **options)
        return self._compiled[key]

    def compiled_entries(self) -> dict[str, int]:
        """Compiled entries per region function, e.g. {"layer_region_single": 1}: more than one means a guard
        failed and dynamo recompiled (dynamo's debug accessor; {} where this torch lacks it)."""
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        except ImportError:
            return {}
        return {fn._torchdynamo_orig_callable.__name__:
                len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))
                for fn in self._compiled.values()}

    @contextlib.contextmanager
    def installed(self, cache: KVCache, single: bool, tree: bool):
        """For the duration of one step (or its capture): each decoder layer and glue module runs its compiled
        region; each layer gets its `OneLayerCache` in place of the whole cache."""
        routed = [(m, self._router(m, "layer", single, tree, cache, view))
                  for m, view in zip(self.layers, one_layer_caches(cache))]
        routed += [(m, self._router(m, name, single, tree, cache)) for name, m in self.glue.items()]
        routed = [(m, router) for m, router in routed if "forward" not in m.__dict__]  # never replace a wrapper
        for m, router in routed:
            m.forward = router
        try:
            yield
        finally:
            for m, _ in routed:
                del m.forward

    def _router(self, module, region: str, single: bool, tree: bool, cache: KVCache, view: OneLayerCache | None = None):
        """The eager `forward` put on a module: swaps the cache for the layer's view, marks the symbolic dims of the
        region's inputs (they are made by eager code, after the session marked its own buffers), calls the region."""
        forward = type(module).forward
        fn = self.compiled(run_module, region, single, tree)
        capacity = getattr(cache.layers[0], "capacity", None)

        def route(*args, **kwargs):
            if view is not None:
                args = tuple(view if a is cache else a for a in args)
                kwargs = {k: (view if v is cache else v) for k, v in kwargs.items()}
            for t in _tensors(args, kwargs):
                mark_symbolic_dims(t, single, capacity)
            return fn(forward, module, *args, **kwargs)

        return route


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):  # (cos, sin) position embeddings
            yield from (t for t in a if isinstance(t, torch.Tensor))


def mark_symbolic_dims(t: torch.Tensor, single: bool, capacity: int | None) -> None:
    """Dim 0 is the batch (symbolic when > 1); the last dim of a 4-D tensor as long as the cache is the mask's key
    dim (symbolic capacity). One compile then serves every bucket, as in the full compile."""
    if not single and t.dim() >= 1:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    if t.dim() == 4 and t.shape[-1] == capacity:
        torch._dynamo.maybe_mark_dynamic(t, 3)
