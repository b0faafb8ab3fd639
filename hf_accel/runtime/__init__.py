"""hf_accel's decode runtime: generate() at the memory-bandwidth limit (the `fast` plugin's engine).

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.bfloat16, device_map="cuda", accel="fast")
    model.generate(**inputs, max_new_tokens=256)          # same arguments, same output as transformers
    pipeline("text-generation", model=model_id, accel="int8+fast")

How (gpt-fast style, plain functions): `cache.py` preallocates K/V per layer; `session.py` prefills with SDPA
(flash when unpadded), then runs each decode step, forward + sampling + bookkeeping, as one CUDA graph per bucket
(batch rounded to a power of two, capacity to a quarter octave), the forward compiled once with symbolic batch and
capacity; `sampling.py` holds the processors (greedy, temperature, top-k, top-p, repetition penalty, min length,
EOS, stop strings) as device ops; `generate.py` plugs the loop into transformers' `generate()` as a
`custom_generate` callable; `bench.py` measures it. On the CPU the same functions run eagerly (no compile, no
graphs), which is what the CPU tests cover.

Contract for other plugins (what must hold for them to run under the fast runtime without breaking capture)
-----------------------------------------------------------------------------------------------------------
Anything that runs inside a decode step is traced by torch.compile (CUDA, unless `fast(compile=False)`) and
replayed from a CUDA graph. "Capturable" means: no host syncs (`.item()`, `.cpu()`, `bool(tensor)`, printing),
no data-dependent shapes or Python branches on tensor values, no new tensor whose address must outlive the step,
and the same kernels on every call. Parameters and buffers are read at the address they had at capture: a plugin
that later replaces a weight tensor (not `copy_` into it) must call `hf_accel.runtime.invalidate(model)`.

1. Weights (quantization, pruning, compression): replace modules (e.g. `Int8Linear`) with any `nn.Module` whose
   forward is capturable. It is compiled with the rest of the step, so a dequantisation written in plain torch
   (`F.linear(x, w.to(x.dtype)) * scale`) fuses into the batch-1 GEMV. Prefill runs the same forward eagerly.
2. KV-cache policies: set the attribute `_hf_accel_kv_layer` on the model (through `patcher.set_attr`) to a
   factory `(layer_idx, batch, capacity, kv_heads, head_dim, dtype, device) -> layer`, where a layer (a `RuntimeLayer`,
   which answers transformers' cache queries) behaves like `StaticKVLayer`: `update(k, v)` writes the prompt into rows `layer.prefill_rows`, slots [0, T) and returns
   what attention should read for the prompt; in decode (`prefill_rows is None`) it writes the new K/V at the
   device tensor `layer.slots` and returns [batch, kv_heads, capacity, head_dim] tensors (e.g. dequantised views),
   or, only when the model's attention is "sdpa" (then served by `fast_sdpa`), one object as both keys and values
   with `attend(query, mask, scale) -> [batch, Q, heads, head_dim]` (capturable) and `materialize() -> (keys,
   values)`: attention over the layer's own storage without a full-capacity copy (kvquant's Triton kernel).
   The runtime masks every slot that is not a real prompt token or an already generated one; slots not yet written
   must still read as finite numbers. The factory is called once per layer and bucket (the runtime's bf16 pool is
   then not allocated); it may raise `Unsupported(..., whole_model=False)` to send a call to transformers' loop.
   Optional: `factory.release()`, called when the runtime drops its sessions (a larger bucket, `invalidate`, a
   moved model), so a factory that pools storage across buckets, like `KVPool`, can free it; `layer.dynamic_dims()`,
   the (tensor, dims) pairs that torch.compile treats as symbolic: every dim that follows the capacity, and the
   batch dim when batch > 1 (batch 1 compiles apart); default: keys and values, dims 2 and (batch > 1) 0.
   Storage slots of their own (eviction): by default slot = sequence slot (the prompt at [0, T), the n-th new token
   at T + n - 1). A layer may store elsewhere: the prefill hands it `layer.prefill_valid` [rows, T] (False = left
   padding), the decode steps still give it sequence slots (it maps them, e.g. to kept + s - T), and
   `layer.visible(slots) -> bool [B, Q, capacity]` (capturable; asked of the first layer, for all layers) replaces
   the runtime's decode mask; position ids stay the sequence's. `factory.kv_capacity(prompt_len, new_tokens)`
   sizes such layers (the session key then ends with it) below the sequence capacity. snapkv, sink, h2o and adakv do
   this (plugins/kv_cache/_fast_evict.py).
   A KV plugin whose generate wrapper passes its own cache as `past_key_values` (for transformers' loop) sets
   `cache.runtime_servable`: True (empty, and the factory serves the same policy) lets the runtime take the call,
   the cache being used only if the call falls back; False sends the call to transformers' loop. kvquant does this
   (plugins/kv_cache/_fast.py), and so do snapkv, sink, h2o and adakv alone; other KV policies' caches are not
   servable.
3. Attention kernels: register with `transformers.AttentionInterface.register(name, fn)` and set the model's
   implementation. The runtime then always passes a boolean 4-D mask [batch, 1, Q, keys] (True = attend), the
   cache's full-capacity K/V and `module.layer_idx`; `fn` must be capturable. ("sdpa" is served by `fast_sdpa`,
   which folds grouped-query heads instead of repeating the cache; "eager" gets an additive mask; flash
   implementations take 2-D masks and fall back to transformers.)
4. Speculative decoding (a `custom_generate` of its own): `get_runtime(model).start(input_ids, attention_mask,
   max_new_tokens, per_row=False)` prefills and returns `(session, logits)`; `session.forward(tokens[B, Q])`
   returns float32 logits [B, Q, V] of Q tokens placed at the next Q slots (one CUDA graph per Q, the buffer is
   reused), and `session.rewind(n)` forgets the last n of them. Rejected drafts need no cache copy: their slots
   are masked and later overwritten. `per_row=True` gives every row its own next slot (`State.row_slot`): the
   layers get slots [B, Q] (a layer that takes them sets `per_row_slots = True`, as `StaticKVLayer` does; else
   `start` raises Unsupported at batch > 1), the mask hides each row's slots after its own queries, and
   `rewind(n)` takes a LongTensor with one count per row (device ops, no sync), so rows that accepted different
   numbers of drafts stay exact. The capacity is exact (prompt + new tokens + one round's drafts); the decode
   step is unchanged (one shared slot). `runtime.companion(draft_model)` is a runtime with the same options for a
   draft model, released with this one. Mark the `custom_generate` callable with `hf_accel_uses_runtime = True`
   and `fast`'s generate hands it over without a warning. The speculative plugins do all this
   (plugins/speculative/backends.py). Draft trees (Medusa): `session.forward(tokens[B, Q], tree=parents)` (a host
   tuple, -1 at node 0) places node i at slot next + i but position next + depth(i), with a mask of the cache, the
   node and its ancestors, and returns (logits, last hidden states [B, Q, H]) (also for a chain, `hidden=True`), one
   graph per tree; `session.move(src, dst)` then copies each row's accepted path's K/V ([B, m] absolute slots) to
   contiguous slots (one graph per m) before `rewind`. A KV plugin's layer takes part only with
   `move_slots(src, dst)` (the runtime's own layers move themselves); otherwise both raise Unsupported.

A model or call that the runtime cannot serve exactly (encoder-decoder, flash attention, mixed sliding-window
layers shorter than the cache, a layer that bypasses `past_key_values.update`, a failed capture, beam search,
custom logits processors, output_scores, ...) runs transformers' own loop, with one warning per reason.
"""

from __future__ import annotations

from .attention import FAST_SDPA, fast_sdpa
from .cache import KVCache, KVPool, RuntimeLayer, StaticKVLayer, Unsupported
from .generate import fast_generate, wrap_generate
from .sampling import SamplingPlan, plan_from_hf
from .session import Runtime, Session, bucket_batch, bucket_capacity

RUNTIME_ATTR = "_hf_accel_runtime"


def get_runtime(model) -> Runtime | None:
    """The `Runtime` the `fast` plugin attached to `model`, or None."""
    return getattr(model, RUNTIME_ATTR, None)


def invalidate(model) -> None:
    """Drop captured graphs and the KV pool (after weights were replaced); the next call captures again."""
    runtime = get_runtime(model)
    if runtime is not None:
        runtime.release()


__all__ = ["FAST_SDPA", "KVCache", "KVPool", "RUNTIME_ATTR", "Runtime", "RuntimeLayer", "SamplingPlan", "Session", "StaticKVLayer",
           "Unsupported", "bucket_batch", "bucket_capacity", "fast_generate", "fast_sdpa", "get_runtime",
           "invalidate", "plan_from_hf", "wrap_generate"]
