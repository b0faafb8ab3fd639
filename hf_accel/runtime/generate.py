"""`model.generate` on the fast runtime.

The wrapper lets transformers' own `generate()` do all of its preparation (generation_config merging, special
tokens, attention mask, left-padding checks, num_return_sequences, logits processors, stopping criteria) and hands
it our loop as a `custom_generate` callable, which replaces only the decoding loop. Whatever the loop does not
implement (beam search, a custom logits processor, output_scores, ...) goes to transformers' own method for that
mode, with one warning per reason, so the output is always transformers' output.

The loop: prefill (eager), first token, then one CUDA-graph replay per token. The host never waits for the step it
just launched: it reads the `all_done` flag (and, with a streamer, the token) of the step `lookahead` steps back,
copied to pinned memory, while the newer steps are queued; so EOS ends the loop at most `lookahead` steps late and
the GPU queue never drains.
"""

from __future__ import annotations

import collections
import copy
import functools

import torch
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import StopStringCriteria, StoppingCriteriaList
from transformers.generation.utils import GENERATION_MODES_MAPPING

from ..compat import get_cache
from .cache import Unsupported
from .sampling import SamplingPlan, plan_from_hf
from .session import Runtime, bucket_capacity, sample_and_record

# generate() arguments that hand the loop to something else; the wrapper passes such calls through untouched
_PASS_THROUGH = ("custom_generate", "assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit",
                 "past_key_values", "cache", "inputs_embeds", "synced_gpus", "prefix_allowed_tokens_fn", "negative_prompt_ids",
                 "logits_processor", "stopping_criteria", "token_healing")
# set on a `custom_generate` callable that runs its own loop on this runtime (contract point 4)
USES_RUNTIME = "hf_accel_uses_runtime"
# model kwargs that the loop understands (everything else, e.g. pixel_values, falls back)
_KNOWN_MODEL_KWARGS = {"attention_mask", "position_ids", "past_key_values", "cache", "use_cache", "logits_to_keep",
                       "cache_position", "output_attentions", "output_hidden_states"}


def wrap_generate(model, runtime: Runtime, original):
    """The per-instance `generate` installed by the plugin (through the Patcher, so `hf_accel.remove` undoes it)."""

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if getattr(kwargs.get("custom_generate"), USES_RUNTIME, False):  # a loop that drives this runtime itself
            return original(*args, **kwargs)  # (speculative decoding, contract point 4): hand it over quietly
        # a flag set to False (`synced_gpus=False`, as a tensor-parallel caller passes) hands nothing over; nor does
        # a KV plugin's empty cache that its `_hf_accel_kv_layer` layers serve here (`runtime_servable`, contract 2)
        passing = [k for k in _PASS_THROUGH if kwargs.get(k) is not None and kwargs[k] is not False
                   and not _empty_list(kwargs[k]) and not _servable(kwargs[k])]
        if passing or runtime.disabled:
            reason = runtime.disabled or f"generate({passing[0]}=...) is not handled by the fast runtime"
            runtime.warn(f"{reason}; this call runs transformers' own generate")
            return original(*args, **kwargs)
        config = kwargs.get("generation_config") or model.generation_config
        overrides = {}
        if kwargs.get("cache_implementation") or getattr(config, "cache_implementation", None):
            overrides["cache_implementation"] = None  # the runtime owns the cache; don't let generate() allocate one
        stop = kwargs["stop_strings"] if "stop_strings" in kwargs else getattr(config, "stop_strings", None)
        tokenizer = kwargs.get("tokenizer")
        if stop and tokenizer is not None:
            # transformers drops `tokenizer` before a custom_generate callable can see it, so the stop-string
            # criterion is built here and handed over like a user's
            overrides["stop_strings"] = None
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(tokenizer, stop)])
        kwargs.pop("tokenizer", None)
        if overrides:
            if kwargs.get("generation_config") is not None:
                kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
                kwargs["generation_config"].update(**overrides)
            else:
                kwargs.update(overrides)
        streamer = kwargs.get("streamer")

        def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                 **model_kwargs):
            return decode_loop(runtime, model, input_ids, logits_processor, stopping_criteria, generation_config,
                               streamer, synced_gpus, model_kwargs)

        return original(*args, custom_generate=loop, **kwargs)

    return generate


def _empty_list(value) -> bool:
    return isinstance(value, list) and not value


def _servable(value) -> bool:
    """A KV plugin's cache that the runtime may replace by its plugin's layers (it stays unused unless the call
    falls back to transformers' loop, which then decodes with it)."""
    return getattr(value, "runtime_servable", False) is True


def _hf_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, synced_gpus,
             model_kwargs):
    mode = generation_config.get_generation_mode()
    method = getattr(type(model), GENERATION_MODES_MAPPING[mode])
    extra = {"streamer": streamer} if mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE) else {}
    return method(model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                  generation_config=generation_config, synced_gpus=synced_gpus, **extra, **model_kwargs)


def _why_not(runtime, generation_config, synced_gpus, model_kwargs) -> str:
    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"generation mode {mode.value}"
    if synced_gpus:
        return "synced_gpus"
    if generation_config.return_dict_in_generate:
        return "return_dict_in_generate (scores, logits, hidden states)"
    extra = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _KNOWN_MODEL_KWARGS)
    if extra:
        return f"model inputs {extra}"
    if model_kwargs.get("output_attentions") or model_kwargs.get("output_hidden_states"):
        return "output_attentions / output_hidden_states"
    cache = get_cache(model_kwargs)
    if getattr(cache, "runtime_servable", None) is False:  # e.g. an eviction policy's cache, when `fast` wraps it
        return f"a {type(cache).__name__} that the fast runtime cannot serve"
    return ""


def decode_loop(runtime, model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                synced_gpus, model_kwargs):
    reason = _why_not(runtime, generation_config, synced_gpus, model_kwargs)
    plan = None
    if not reason:
        plan, reason = plan_from_hf(logits_processor, stopping_criteria, generation_config)
    if plan is not None and plan.max_length <= input_ids.shape[1]:
        plan, reason = None, "no new tokens to generate"
    if plan is not None:
        try:
            return fast_generate(runtime, input_ids, model_kwargs.get("attention_mask"), plan, streamer)
        except Unsupported as e:
            reason = str(e)
            if e.whole_model:  # a model we cannot serve (cache bypassed, capture failed): stop trying
                runtime.disabled = reason
    runtime.stats["fallbacks"] += 1
    runtime.warn(f"{reason}; this call runs transformers' own decoding loop")
    return _hf_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, synced_gpus,
                    model_kwargs)


class _Lagged:
    """Per-step `all_done` flag and new tokens, read `depth` steps after the step was launched."""

    def __init__(self, st, depth: int, want_tokens: bool):
        self.st, self.cuda = st, st.ids.is_cuda
        self.depth = depth if self.cuda else 0
        ring, b = self.depth + 1, st.tokens.shape[0]
        pin = dict(pin_memory=True) if self.cuda else {}
        self.flags = torch.zeros(ring, dtype=torch.bool, **pin)
        self.tokens = torch.zeros(ring, b, dtype=torch.long, **pin) if want_tokens else None
        self.events = [torch.cuda.Event() for _ in range(ring)] if self.cuda else []
        self.pending: collections.deque[int] = collections.deque()

    def push(self, i: int) -> None:
        r = i % len(self.flags)
        self.flags[r: r + 1].copy_(self.st.all_done, non_blocking=True)
        if self.tokens is not None:
            self.tokens[r].copy_(self.st.tokens[:, 0], non_blocking=True)
        if self.cuda:
            self.events[r].record()
        self.pending.append(i)

    def ready(self) -> bool:
        return len(self.pending) > self.depth

    def pop(self) -> tuple[int, bool, torch.Tensor | None]:
        i = self.pending.popleft()
        r = i % len(self.flags)
        if self.cuda:
            self.events[r].synchronize()
        return i, bool(self.flags[r]), (self.tokens[r].clone() if self.tokens is not None else None)


@torch.no_grad()
def fast_generate(runtime: Runtime, input_ids: torch.Tensor, attention_mask, plan: SamplingPlan, streamer=None):
    """Greedy or sampled generation of `plan.max_length - T` tokens at most; returns ids [B, T + n] like generate()."""
    n_rows, t = input_ids.shape
    max_new = plan.max_length - t
    capacity = bucket_capacity(plan.max_length)
    runtime.check(capacity)
    if len(plan.eos) > 8:
        raise Unsupported(f"{len(plan.eos)} EOS token ids (at most 8)", whole_model=False)
    session = runtime.session(n_rows, capacity, t, max_new)
    st = session.state
    key = plan.key
    session.prepare_decode(key)
    first_logits = session.prefill(input_ids, attention_mask)
    st.load_plan(plan, n_rows, input_ids)
    sample_and_record(first_logits, st, key)
    runtime.stats["calls"] += 1
    stop = plan.stop_strings

    def check_stop_strings(n: int) -> None:  # n tokens generated; tensor ops only
        hit = stop(st.ids[:, : t + n], None).to(st.done.device)
        st.n_done.copy_(torch.where(hit & ~st.done, n, st.n_done))
        st.done.logical_or_(hit)
        st.all_done.copy_(st.done.all())

    if stop is not None:
        check_stop_strings(1)
    lag = _Lagged(st, runtime.lookahead, streamer is not None)
    lag.push(0)
    finished = False  # all rows done at the last step read back

    def read_back() -> None:
        nonlocal finished
        i, done, tokens = lag.pop()
        if streamer is not None and not finished:
            streamer.put(tokens[:n_rows].cpu())
        finished = finished or done

    for i in range(1, max_new):
        while lag.ready():
            read_back()
        if finished:
            break
        session.decode(key)
        if stop is not None:
            check_stop_strings(i + 1)
        lag.push(i)
    while lag.pending:
        read_back()
    if streamer is not None:
        streamer.end()
    n_done = st.n_done[:n_rows]
    done = st.done[:n_rows]
    n = int(n_done.max()) if bool(done.all()) else max_new
    return st.ids[:n_rows, : t + n].clone()
