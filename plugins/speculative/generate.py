"""`model.generate` with speculative decoding: the per-instance wrapper every speculative plugin installs.

transformers' `generate()` still does all of its preparation (generation config, special tokens, attention mask,
logits processors, stopping criteria); the wrapper hands it our loop as a `custom_generate` callable, which replaces
only the decoding loop. A call the loop cannot serve exactly (beam search, a logits processor that depends on the
sequence such as repetition penalty, stop strings, return_dict_in_generate, flash attention, a sliding window shorter
than the generation, ...) runs transformers' own loop for that mode, with one warning per reason, so the output is
always what the target alone would produce. The last call's acceptance statistics are in
`model.hf_accel_spec_stats`.

With the `fast` plugin applied too, the loop runs the target (and a draft model) on the fast runtime's sessions
(backends.py) and a call it cannot serve goes to the runtime's own loop (which may in turn hand it to transformers).
"""

from __future__ import annotations

import functools
import warnings

from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GENERATION_MODES_MAPPING

from hf_accel.compat import get_cache
from hf_accel.runtime import Unsupported, get_runtime
from hf_accel.runtime.attention import FAST_VARIANTS
from hf_accel.runtime.generate import USES_RUNTIME, decode_loop

from .backends import opener
from .decode import DraftLength, Sampler, speculative_generate

STATS_ATTR = "hf_accel_spec_stats"
# generate() arguments that choose another decoding path; such calls go to the wrapped generate untouched
PASS_THROUGH = ("custom_generate", "assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit",
                "past_key_values", "cache", "inputs_embeds", "synced_gpus", "prefix_allowed_tokens_fn", "negative_prompt_ids")
# warpers that look at the scores only, so applying them to every drafted position is what the target would do
POSITION_FREE = tuple(getattr(lp, name) for name in (
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper", "InfNanRemoveLogitsProcessor") if hasattr(lp, name))
MODEL_KWARGS = {"attention_mask", "use_cache", "past_key_values", "cache", "position_ids", "cache_position", "logits_to_keep"}


def plan(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs):
    """(sampler, max_new_tokens, eos_ids) for our loop, or a reason why transformers' loop must run instead."""
    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"generation mode {mode.value}"
    if generation_config.return_dict_in_generate:
        return "return_dict_in_generate (scores, logits, hidden states)"
    extra = sorted(k for k, v in model_kwargs.items() if v is not None and k not in MODEL_KWARGS)
    if extra:
        return f"model inputs {extra}"
    cache = get_cache(model_kwargs)
    if cache is not None and cache.get_seq_length() > 0:
        return "a pre-filled past_key_values"
    attn = getattr(model.config, "_attn_implementation", "eager")
    if attn not in ("eager", "sdpa") and attn not in FAST_VARIANTS:  # a wrapper of sdpa (a KV plugin's score hook)
        return f"attn_implementation={attn!r} (per-row masks need 'sdpa' or 'eager')"
    kv = kv_plugin_cache(model_kwargs)
    if kv is not None and (get_runtime(model) is None or kv.runtime_servable is not True):
        served = "sink, snapkv; kvquant at batch 1"
        if get_runtime(model) is None:
            return (f"the K/V live in a KV plugin's cache ({type(kv).__name__}), which speculative decoding keeps per "
                    f"row only on the fast runtime, for a KV plugin it serves ({served}; add 'fast' to the spec)")
        return (f"the K/V live in a KV plugin's cache ({type(kv).__name__}) that the fast runtime does not serve, and "
                f"speculative decoding keeps a KV plugin's K/V only on the runtime (it serves {served})")
    max_length, eos = None, None
    for criterion in stopping_criteria:
        if isinstance(criterion, sc.MaxLengthCriteria):
            max_length = criterion.max_length
        elif isinstance(criterion, sc.EosTokenCriteria):
            eos = criterion.eos_token_id.to(input_ids.device)
        else:
            return f"stopping criterion {type(criterion).__name__}"
    if max_length is None or max_length <= input_ids.shape[1]:
        return "no max_length, or no new tokens to generate"
    window = _sliding_window(model.config)
    if window is not None and max_length + 1 > window:
        return f"a sliding attention window ({window}) shorter than the generation"
    greedy = mode == GenerationMode.GREEDY_SEARCH
    others = [type(p).__name__ for p in logits_processor if greedy or not isinstance(p, POSITION_FREE)]
    if others:
        return f"logits processors {others}"
    return Sampler(greedy, list(logits_processor)), max_length - input_ids.shape[1], eos


def kv_plugin_cache(model_kwargs):
    """The empty cache a KV plugin's generate wrapper passed (it declares `runtime_servable`, runtime contract point
    2), or None. The loop's own per-row cache must never stand in for it: that would decode with full K/V."""
    cache = get_cache(model_kwargs)
    return cache if cache is not None and hasattr(cache, "runtime_servable") else None


class NoSpeculation(Exception):
    """This call cannot be served exactly by the speculative loop: it runs the model's own decoding instead."""


def _sliding_window(config) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and all(t == "full_attention" for t in layer_types):
        return None
    return window


def hf_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs):
    runtime = get_runtime(model)
    if runtime is not None:  # `fast` is applied too: its loop serves the call (or hands it to transformers)
        return decode_loop(runtime, model, input_ids, logits_processor, stopping_criteria, generation_config,
                           streamer, False, model_kwargs)
    mode = generation_config.get_generation_mode()
    method = getattr(type(model), GENERATION_MODES_MAPPING[mode])
    extra = {"streamer": streamer} if mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE) else {}
    return method(model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                  generation_config=generation_config, synced_gpus=False, **extra, **model_kwargs)


def install(model, patcher, name: str, make_drafter, length: DraftLength) -> dict:
    """What every speculative plugin's apply() does (drafters and medusa): `model.generate` decodes through
    `speculative_generate` with drafters from `make_drafter(batch, sampler, open_rows)`; with `fast` applied, on
    the runtime's sessions (backends.py); returns the stats dict."""
    stats: dict = {}

    def decode(model, input_ids, attention_mask, *, warn, kv_plugin: bool, **planned):
        streamer = planned.get("streamer")
        if streamer is not None:
            planned["streamer"] = streamer = _Streamed(streamer)

        def run(open_rows):
            return speculative_generate(model, make_drafter, input_ids, attention_mask, length=length, stats=stats,
                                        open_rows=open_rows, **planned)

        if get_runtime(model) is None:
            return run(None)
        eager = "the speculative loop runs on its eager per-row cache instead of the fast runtime"
        try:
            return run(opener(model, lambda reason: warn(reason, eager), target_kv_plugin=kv_plugin))
        except Unsupported as e:  # a capture failed mid-call (the runtime is then disabled): run the call again
            if streamer is not None and streamer.started:  # tokens were streamed already; they cannot be recalled
                raise
            if kv_plugin:  # only the runtime keeps the plugin's K/V: the call runs without speculation
                raise NoSpeculation(str(e)) from e
            warn(str(e), eager)
            return run(None)

    patcher.set_attr(model, STATS_ATTR, stats)
    patcher.set_attr(model, "generate", wrap_generate(model.generate, name, decode, stats))
    return stats


class _Streamed:
    """A streamer that remembers whether it was given tokens: until then a failed call may run again."""

    def __init__(self, streamer):
        self.streamer, self.started = streamer, False

    def put(self, value):
        self.started = True
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


def wrap_generate(original, name: str, decode, stats: dict):
    """The `generate` installed on the instance.

    `decode(model, input_ids, attention_mask, *, sampler, max_new_tokens, eos_ids, pad_id, streamer, warn)` is
    the plugin's own loop, called when `plan` accepts the call; `warn(reason, consequence)` warns once per reason.
    """
    warned: set[str] = set()

    def warn_once(reason: str, consequence: str = "this call runs without speculative decoding") -> None:
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"hf_accel {name}: {reason}; {consequence}", stacklevel=3)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        passing = [k for k in PASS_THROUGH if kwargs.get(k) is not None]
        if passing:
            warn_once(f"generate({passing[0]}=...) chooses its own decoding")
            return original(*args, **kwargs)
        streamer = kwargs.get("streamer")  # generate() does not hand it to a custom_generate callable

        def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
            model_kwargs.pop("synced_gpus", None)

            def fallback(reason: str):
                warn_once(reason)
                stats.clear()
                stats.update(method=name, fallback=reason)
                return hf_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                               model_kwargs)

            decided = plan(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
            if isinstance(decided, str):
                return fallback(decided)
            sampler, max_new, eos = decided
            pad = generation_config._pad_token_tensor
            stats.clear()
            stats.update(method=name, batch=input_ids.shape[0], sampling=not sampler.greedy)
            try:
                return decode(model, input_ids, model_kwargs.get("attention_mask"), sampler=sampler,
                              max_new_tokens=max_new, eos_ids=eos, pad_id=int(pad) if pad is not None else 0,
                              streamer=streamer, warn=warn_once, kv_plugin=kv_plugin_cache(model_kwargs) is not None)
            except NoSpeculation as e:
                return fallback(f"{e} (the KV plugin's layers are kept only by the fast runtime)")

        setattr(loop, USES_RUNTIME, True)  # `fast`'s generate (contract point 4) hands it over without a warning
        return original(*args, custom_generate=loop, **kwargs)

    return generate
