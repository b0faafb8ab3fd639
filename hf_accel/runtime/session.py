"""The decode engine: per-bucket state, prefill, the captured decode step, and the forward/rewind API.

A `Runtime` belongs to one model. It owns the KV pool, the compiled forward and one `Session` per bucket
(batch rounded up to a power of two, capacity = prompt + new tokens rounded up to a quarter octave). A session holds
every buffer its graphs read or write (`State`), so a CUDA graph captured once serves every later call of that
bucket: a call copies its prompt and sampling values into the buffers and replays. Nothing in a step asks the host
for a length: the KV slot, positions and the mask are computed on the device from `State.slot`.

    tokens produced so far n  ->  ids[:, T + n - 1] is the next input token, its KV slot is `slot` = T + n - 1

On the GPU the step's model forward goes through torch.compile (dynamic in batch and capacity, so new buckets do
not recompile; coordinate-descent tuning turns batch-1 matmuls into Triton GEMVs that fuse with a quantized
weight's dequantisation) and the whole step, sampling included, is captured as one CUDA graph. On the CPU the same
functions run eagerly. `compile="full"` (or True) compiles the step's forward as one graph; `compile="regional"`
compiles one decoder layer and reuses it for every layer (a fraction of the first compile's time; regional.py).
"""

from __future__ import annotations

import collections
import math
import time
import warnings

import torch

from ..compat import cache_kwarg
from ..distributed import local_kv_heads, offload_reason
from .attention import as_kind, mask_kind, prefill_mask, use_fast_attention
from .cache import KV_LAYER_ATTR, KVCache, KVPool, StaticKVLayer, Unsupported
from .regional import Regions, compile_mode, regional_unsupported
from .sampling import SamplingPlan, StepKey, choose, process


def bucket_batch(b: int) -> int:
    return 1 << (b - 1).bit_length() if b <= 64 else 32 * math.ceil(b / 32)


def bucket_capacity(n: int, smallest: int = 256) -> int:
    """Round up to a multiple of a quarter of the enclosing power of two (waste <= 25%), at least `smallest`."""
    if n <= smallest:
        return smallest
    page = 1 << max((n - 1).bit_length() - 3, 0)
    return page * math.ceil(n / page)


def error_summary(error: BaseException, limit: int = 400) -> str:
    """One line for a warning: the error's type, its first line and its last line. Inductor wraps a failed kernel
    build in a long message whose cause (the Triton or compiler error) comes last."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = " | ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
    return f"{type(error).__name__}: {text[:limit]}"


class State:
    """Device buffers of one (batch, capacity) bucket. Graphs hold their addresses: only ever write them in place."""

    def __init__(self, b: int, c: int, vocab: int, device):
        long, boolean = dict(dtype=torch.long, device=device), dict(dtype=torch.bool, device=device)
        self.ids = torch.zeros(b, c, **long)  # prompt + generated tokens (the output)
        self.prompt_valid = torch.zeros(b, c, **boolean)  # real (non-padding) prompt slots
        self.prompt_len = torch.zeros(1, **long)  # T (padded prompt length)
        self.slot = torch.zeros(1, **long)  # KV slot of the next input token
        self.row_slot = torch.zeros(b, 1, **long)  # the same per row, for a per-row session (`Runtime.start`)
        self.positions = torch.zeros(b, 1, **long)  # position id of the next input token
        self.tokens = torch.zeros(b, 1, **long)  # the next input token
        self.done = torch.zeros(b, **boolean)
        self.all_done = torch.zeros(1, **boolean)
        self.n_done = torch.zeros(b, **long)  # tokens generated when the row finished
        self.seen = torch.zeros(b, vocab, **boolean)  # repetition penalty: tokens present in the row
        self.eos = torch.full((8,), -1, **long)
        self.eos_mask = torch.zeros(vocab, **boolean)
        self.pad = torch.zeros(1, **long)
        self.min_new = torch.zeros(1, **long)
        self.min_len = torch.zeros(1, **long)
        fl = dict(dtype=torch.float32, device=device)
        self.temperature, self.top_p, self.penalty = torch.ones(1, **fl), torch.ones(1, **fl), torch.ones(1, **fl)

    def load_plan(self, plan: SamplingPlan, n_rows: int, input_ids) -> None:
        eos = torch.tensor(plan.eos[:8], dtype=torch.long)
        self.eos.fill_(-1)
        if plan.pad_finished:  # rows stop at EOS only when generate() built an EOS criterion
            self.eos[: len(eos)] = eos.to(self.eos.device)
        self.eos_mask.zero_()
        if len(eos):
            self.eos_mask[eos.to(self.eos.device)] = True
        self.pad.fill_(plan.pad)
        self.min_new.fill_(plan.min_new_tokens)
        self.min_len.fill_(plan.min_length)
        self.temperature.fill_(plan.temperature or 1.0)
        self.top_p.fill_(plan.top_p if plan.top_p is not None else 1.0)
        self.penalty.fill_(plan.repetition_penalty or 1.0)
        if plan.repetition_penalty is not None:
            counted = torch.ones_like(input_ids, dtype=torch.bool)
            ignore = plan.penalty_ignore
            if ignore is not None:
                first = torch.as_tensor(ignore, device=input_ids.device).reshape(-1, 1)
                counted = torch.arange(input_ids.shape[1], device=input_ids.device)[None] >= first
            counts = torch.zeros(n_rows, self.seen.shape[1], device=self.seen.device)
            counts.scatter_add_(1, input_ids, counted.float())
            self.seen.zero_()
            self.seen[:n_rows] = counts > 0


def sample_and_record(logits: torch.Tensor, st: State, key: StepKey) -> None:
    """Choose the next token of every row from float32 logits [B, V] and advance the state by one token."""
    tok = choose(process(logits, st, key), key.do_sample)
    if key.pad_finished:
        tok = torch.where(st.done, st.pad, tok)
    n_new = st.slot - st.prompt_len + 2  # this token's rank among the new ones (1 = first)
    st.ids.index_copy_(1, st.slot + 1, tok[:, None])
    if key.penalty:
        st.seen.scatter_(1, tok[:, None], True)
    finished = (tok[:, None] == st.eos).any(dim=1)
    st.n_done.copy_(torch.where(finished & ~st.done, n_new, st.n_done))
    st.done.logical_or_(finished)
    st.all_done.copy_(st.done.all())
    st.tokens.copy_(tok[:, None])
    st.positions.add_(1)
    st.slot.add_(1)


def decode_step_mask(cache, slots, prompt_valid, prompt_len, window: int, kind: str, dtype):
    """The decode step's mask [B, 1, Q, C] (the cache's layers may store their own way: `KVCache.decode_mask`)."""
    return cache.decode_mask(prompt_valid, prompt_len, slots, window, kind, dtype)


def decode_logits(model, cache, tokens, positions, mask):
    """Logits [B, Q, V] of Q new tokens under `mask` (the cache's layers were pointed at their slots)."""
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                **{cache_kwarg(model): cache})
    return out.logits


def forward_tokens(model, cache, tokens, positions, slots, prompt_valid, prompt_len, window: int, kind: str, dtype):
    """Logits [B, Q, V] of Q new tokens whose K/V go to `slots` (the cache's layers were pointed at `slots`)."""
    mask = decode_step_mask(cache, slots, prompt_valid, prompt_len, window, kind, dtype)
    return decode_logits(model, cache, tokens, positions, mask)


def forward_tokens_batched(*args):
    """The same step for batch > 1, under its own code object so that it is compiled with its own options."""
    return forward_tokens(*args)


def tree_mask(prompt_valid, prompt_len, base, depth, visible, window: int | None, kind: str, dtype):
    """[B, 1, Q, C] for the Q nodes of a draft tree at slots base .. base+Q-1 (`base` [B, 1] per row, or [1]):
    node i sees the real prompt tokens, the generated ones before `base` and, inside the tree, itself and its
    ancestors (`visible` [Q, Q] bool). For a sliding window, node i stands at slot base + depth[i] (its position)."""
    c, q = prompt_valid.shape[1], visible.shape[0]
    j = torch.arange(c, device=prompt_valid.device)
    base = base.reshape(-1, 1)  # [B or 1, 1]
    rel = j - base  # [B', C]: key slot relative to the tree's root
    before = prompt_valid[:, None, :] | ((j >= prompt_len) & (rel < 0))[:, None, :]  # [B, 1, C]
    if window:
        before = before & (j > base[:, :, None] + depth[None, :, None] - window)  # [B, Q, C]
    inside = visible[:, rel.clamp(0, q - 1)].transpose(0, 1) & ((rel >= 0) & (rel < q))[:, None, :]  # [B', Q, C]
    return as_kind((before | inside)[:, None], "additive" if kind == "fast" else kind, dtype)


def tree_step_mask(cache, slots, base, depth, visible, prompt_valid, prompt_len, window: int, kind: str, dtype):
    """`tree_mask` in the argument order of the step functions (cache and slots first, as `decode_step_mask`)."""
    return tree_mask(prompt_valid, prompt_len, base, depth, visible, window, kind, dtype)


def tree_outputs(model, cache, tokens, positions, mask):
    """Logits [B, Q, V] and the last hidden states [B, Q, H] (the lm_head's input) of the Q tree nodes."""
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                output_hidden_states=True, **{cache_kwarg(model): cache})
    return out.logits, out.hidden_states[-1]


def forward_tree(model, cache, tokens, positions, slots, base, depth, visible, prompt_valid, prompt_len,
                 window: int, kind: str, dtype):
    """Logits [B, Q, V] and the last hidden states [B, Q, H] (the lm_head's input) of the Q nodes of a draft tree
    whose K/V go to `slots` = base + node index (see `tree_mask`; `positions` = the row's next position + depth)."""
    mask = tree_step_mask(cache, slots, base, depth, visible, prompt_valid, prompt_len, window, kind, dtype)
    return tree_outputs(model, cache, tokens, positions, mask)


def forward_tree_batched(*args):
    """The tree step for batch > 1 (its own compile options, as `forward_tokens_batched`)."""
    return forward_tree(*args)


class RegionalStep:
    """`forward_tokens` (or `forward_tree`) for `compile="regional"`, same arguments: the mask builder runs compiled,
    then the model runs eagerly with its decoder layers and glue modules routed through their compiled regions."""

    def __init__(self, regions: Regions, single: bool, tree: bool):
        self.regions, self.single, self.tree = regions, single, tree
        self.mask = regions.compiled(tree_step_mask if tree else decode_step_mask, "mask", single, tree)
        self.outputs = tree_outputs if tree else decode_logits

    def __call__(self, model, cache, tokens, positions, slots, *mask_args):
        mask = self.mask(cache, slots, *mask_args)
        with self.regions.installed(cache, self.single, self.tree):
            return self.outputs(model, cache, tokens, positions, mask)


def move_slots(keys: list, values: list, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy each row's K/V at slots `src` [B, m] to slots `dst` [B, m] in every layer ([B, H, C, D] buffers; all
    reads of a layer happen before its writes)."""
    for buffers in (keys, values):
        for buf in buffers:
            b, h, _, d = buf.shape
            m = src.shape[1]
            moved = buf.gather(2, src[:, None, :, None].expand(b, h, m, d))
            buf.scatter_(2, dst[:, None, :, None].expand(b, h, m, d), moved)


class Runtime:
    """Everything the fast path keeps for one model: KV pool, compiled forward, sessions and their graphs."""

    def __init__(self, model, *, compile: bool | str = True, cuda_graphs: bool = True, prefill_tokens: int = 16384,
                 lookahead: int = 2, decode_attention: str = "matmul", tune: bool = True):
        self.model = model
        # True / "full": the step's forward as one graph; "regional": one compiled decoder layer, reused; False: eager
        self.compile_mode = compile_mode(compile)
        self.compile_backend = "inductor"  # tests count graphs with "eager" (no code generation)
        self.options = {"compile": compile, "cuda_graphs": cuda_graphs}
        self.init_options = dict(compile=compile, cuda_graphs=cuda_graphs, prefill_tokens=prefill_tokens,
                                 lookahead=lookahead, decode_attention=decode_attention, tune=tune)
        self.companions: dict[int, Runtime] = {}  # id(model) -> runtime of a model that runs next to this one
        self.decode_attention = decode_attention  # see hf_accel.runtime.attention
        # inductor's coordinate-descent tuning, batch 1 only: it turns the batch-1 matmuls into fast GEMVs (longer first
        # compile); with a symbolic batch it only slows the compile down (a bs-8 compile outran 260 s on the H200)
        self.tune = tune
        self.prefill_tokens = prefill_tokens
        self.lookahead = lookahead
        self.stats = collections.Counter()  # captures, pool_moves, calls, fallbacks
        self.seconds = collections.Counter()  # warmup (the first one compiles) and capture, summed over graphs
        self.disabled: str | None = None
        self.warned: set[str] = set()
        self.compile_error: str | None = None  # set when torch.compile failed and the step fell back to eager
        self.verified = False  # the first prefill proves that every layer writes through our cache
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = config
        heads = config.num_attention_heads
        self.kv_heads = local_kv_heads(model, getattr(config, "num_key_value_heads", None) or heads)  # TP: 1/tp
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        head = model.get_output_embeddings()
        self.vocab = head.weight.shape[0] if head is not None else config.vocab_size
        self.window, self.mixed_window = self._window(config)
        self.placement = None
        self.sessions: dict[tuple[int, int], Session] = {}
        cache_kwarg(model)  # resolved here, outside the compiled step
        self._follow_model()

    def _follow_model(self) -> None:
        """(Re)derive device, dtype and mask kind from the model: it may have moved (`.cuda()`, `.half()`), changed
        its attention implementation or had weights swapped (a plugin applied later) since the plugin was applied.
        Any change drops the graphs (they hold the old addresses) and the cache."""
        model = self.model
        weights = hash(tuple(p.data_ptr() for p in model.parameters()))
        placement = (next(model.parameters()).device, model.dtype, model.config._attn_implementation, weights,
                     id(self.kv_factory()))
        if placement == self.placement:
            return
        if self.placement is not None:
            self._release_factory()
        self.placement = placement
        self.device, self.dtype = placement[:2]
        self.cuda = self.device.type == "cuda"
        self.use_compile = self.compile_mode is not None and self.cuda
        self.use_graphs = self.options["cuda_graphs"] and self.cuda
        self.kind = mask_kind(model)
        self.sessions = {}
        self._forward = {}  # batch == 1 -> step function
        self._regions = None  # the compiled regions (compile="regional"), made with the first step function
        self._mempool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.pool = KVPool(self.config.num_hidden_layers, self.kv_heads, self.head_dim, self.dtype, self.device)

    def kv_factory(self):
        """A KV plugin's layer factory (`_hf_accel_kv_layer`, see the contract in __init__), or None."""
        return getattr(self.model, KV_LAYER_ATTR, None)

    def _release_factory(self) -> None:
        release = getattr(self.kv_factory(), "release", None)
        if release is not None:
            release()

    @staticmethod
    def _window(config) -> tuple[int, bool]:
        window = getattr(config, "sliding_window", None) or 0
        types = set(getattr(config, "layer_types", None) or [])
        return window, bool(window and "full_attention" in types and len(types) > 1)

    def check(self, capacity: int) -> None:
        self._follow_model()
        if self.disabled:
            raise Unsupported(self.disabled)
        if getattr(self.model.config, "is_encoder_decoder", False):
            raise Unsupported("encoder-decoder models are not supported")
        reason = offload_reason(self.model)
        if reason:  # one static cache and one CUDA graph per step need every layer resident on one device
            raise Unsupported(f"{reason}; the fast runtime needs the whole model on one device", whole_model=False)
        if self.kind is None:
            raise Unsupported(f"attention implementation {self.model.config._attn_implementation!r} takes no 4-D mask "
                              "(use attn_implementation='sdpa' or 'eager')", whole_model=False)
        if self.mixed_window and self.window < capacity:
            raise Unsupported(f"mixed full/sliding-window layers with a window ({self.window}) shorter than the "
                              "cache", whole_model=False)

    # --- forward, compiled on CUDA ---------------------------------------------------------------------------------

    def forward_fn(self, batch: int, tree: bool = False):
        """The step function for a batch bucket: compiled on CUDA (batch 1 and batch > 1 each compile once).
        `tree`: the draft-tree forward (`forward_tree`), compiled apart."""
        single = batch == 1
        key = (single, tree) if tree else single
        if key not in self._forward:
            self._forward[key] = self._step_fn(single, tree)
        return self._forward[key]

    def _step_fn(self, single: bool, tree: bool):
        if not self.use_compile:
            return forward_tree if tree else forward_tokens
        regions = self.regions()
        if regions is not None:
            return RegionalStep(regions, single, tree)
        fn = (forward_tree if single else forward_tree_batched) if tree else \
            (forward_tokens if single else forward_tokens_batched)
        return self.compile(fn, tune=self.tune and single)

    def compile(self, fn, tune: bool = False):
        """torch.compile with the runtime's backend; coordinate-descent tuning only where asked (batch 1)."""
        options = {"options": {"coordinate_descent_tuning": tune}} if self.compile_backend == "inductor" else {}
        return torch.compile(fn, backend=self.compile_backend, **options)

    def regions(self) -> Regions | None:
        """The compiled regions under compile="regional" (None: the full compile; also, with a warning, for a
        model whose layers a one-layer cache cannot serve)."""
        if self.compile_mode != "regional":
            return None
        if self._regions is None:
            reason = regional_unsupported(self.model)
            if reason:
                self.warn(f"compile='regional' cannot serve {type(self.model).__name__} ({reason}); it gets the full "
                          "compile")
                self.compile_mode = "full"
                return None
            self._regions = Regions(self.model, self.tune, self.compile_backend)
        return self._regions

    def move_fn(self):
        """`move_slots`, compiled on CUDA (inductor fuses each layer's gather and scatter)."""
        if "move" not in self._forward:
            self._forward["move"] = self.compile(move_slots) if self.use_compile else move_slots
        return self._forward["move"]

    def uncompile(self, error: BaseException) -> None:
        self.compile_error = f"{type(error).__name__}: {error}"  # whole, for benchmarks and bug reports
        self.warn(f"torch.compile failed ({error_summary(error)}); the decode step runs eagerly inside its CUDA graph")
        self.use_compile, self._forward, self._regions = False, {}, None

    def warn(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(f"hf_accel 'fast': {message}", stacklevel=3)

    # --- sessions --------------------------------------------------------------------------------------------------

    def session(self, batch: int, capacity: int, prompt_len: int | None = None,
                new_tokens: int | None = None) -> "Session":
        """The session of a bucket. A KV plugin's factory with `kv_capacity(prompt_len, new_tokens)` (an eviction
        policy: kept prompt tokens + new ones) sizes its layers below the sequence capacity; the key then ends with
        that size (contract point 2 in __init__)."""
        factory = self.kv_factory()
        sizer = getattr(factory, "kv_capacity", None)
        kv = capacity
        if sizer is not None and prompt_len is not None:
            kv = min(capacity, sizer(prompt_len, capacity - prompt_len if new_tokens is None else new_tokens))
        key = (bucket_batch(batch), capacity) if kv == capacity else (bucket_batch(batch), capacity, kv)
        if key[0] * kv > self.pool.tokens:  # the pool must move: every graph points at the old storage
            self._drop_graphs()  # first, so that the old storage is free before the new one is taken
            self._release_factory()  # a KV plugin's layers take the pool's place: it frees its storage too
            self.pool.ensure(key[0], kv, allocate=factory is None)
            self.stats["pool_moves"] += 1
        if key not in self.sessions:
            self.sessions[key] = Session(self, *key)
        return self.sessions[key]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 256,
              *, per_row: bool = False):
        """Prefill a prompt for a caller that runs its own loop (speculative decoding): returns (session, logits of
        the last prompt position [B, V]); the session's next `forward` places its tokens right after the prompt.

        `per_row=True` (matters for batch > 1): every row keeps its own next slot, so `rewind` takes one count per
        row and rows that accepted different numbers of drafts stay exact. The layers then get per-row slots [B, Q];
        `StaticKVLayer` takes them, a KV plugin's layer says so with `per_row_slots = True` (else Unsupported)."""
        n, t = input_ids.shape
        capacity = bucket_capacity(t + max_new_tokens)
        self.check(capacity)
        session = self.session(n, capacity, t, max_new_tokens)
        session.per_row = per_row and session.batch > 1  # one row: the shared slot is that row's slot
        if session.per_row and not all(getattr(layer, "per_row_slots", False) for layer in session.cache.layers):
            raise Unsupported("the KV layers take one slot index for all rows (no `per_row_slots`), so rows cannot "
                              "keep different lengths", whole_model=False)
        logits = session.prefill(input_ids, attention_mask)
        st = session.state
        st.slot.add_(1)
        st.positions.add_(1)
        st.row_slot.copy_(st.slot.expand_as(st.row_slot))
        return session, logits[:n]

    def companion(self, model) -> "Runtime":
        """A runtime with this one's options for another model that decodes next to this one (a speculative
        draft); kept with this runtime and released with it, so `hf_accel.remove` drops it too."""
        runtime = self.companions.get(id(model))
        if runtime is None:  # it holds `model`, so the id cannot be reused while the entry lives
            runtime = self.companions[id(model)] = Runtime(model, **self.init_options)
        return runtime

    def _drop_graphs(self) -> None:
        """Forget every session and its graphs. Later captures go to a new private memory pool: capturing into a
        pool whose graphs are gone while some of its blocks are still alive trips the caching allocator
        (`use_count > 0` assert, seen on the H200 with torch 2.11 when a longer prompt moved the KV pool)."""
        self.sessions = {}
        if self.use_graphs:
            self._mempool = torch.cuda.graph_pool_handle()

    def release(self) -> None:
        """Drop graphs, sessions and the KV pool (the next call captures again)."""
        self._drop_graphs()
        self._release_factory()
        self.pool.k, self.pool.v, self.pool.tokens = [], [], 0
        for runtime in self.companions.values():
            runtime.release()


class Session:
    """One (batch, capacity) bucket: its cache views, its state and the graphs captured over them."""

    def __init__(self, rt: Runtime, batch: int, capacity: int, kv_capacity: int | None = None):
        self.rt, self.batch, self.capacity = rt, batch, capacity
        factory = rt.kv_factory()
        if factory is not None:
            layers = [factory(i, batch, kv_capacity or capacity, rt.kv_heads, rt.head_dim, rt.dtype, rt.device)
                      for i in range(rt.config.num_hidden_layers)]
        else:
            layers = rt.pool.layers(batch, capacity)
        self.cache = KVCache(layers)
        self.state = State(batch, capacity, rt.vocab, rt.device)
        self.graphs: dict[tuple, object] = {}
        self.verify_buffers: dict[tuple[int, bool], tuple] = {}
        self.n_rows = 0
        self.per_row = False  # set by `Runtime.start`: forward places each row at its own slots

    # -- running a function eagerly, or capturing it once and replaying ----------------------------------------------

    def _mark_dynamic(self) -> None:
        """Batch (when > 1) and capacity are symbolic for torch.compile: one compile serves every bucket."""
        mark = torch._dynamo.maybe_mark_dynamic
        st = self.state
        for layer in self.cache.layers:
            if hasattr(layer, "dynamic_dims"):  # a KV plugin's layer says which dims are batch or capacity
                dims = layer.dynamic_dims()
            else:
                axes = (0, 2) if self.batch > 1 else (2,)
                dims = [(layer.keys, axes), (layer.values, axes)]
            for t, axes in dims:
                for axis in axes:
                    mark(t, axis)
        mark(st.prompt_valid, 1)
        if self.batch > 1:
            for t in (st.prompt_valid, st.tokens, st.positions):
                mark(t, 0)

    def _run(self, key: tuple, fn) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if self.rt.use_compile:
            self._mark_dynamic()
        with use_fast_attention(self.rt.model, self.rt.decode_attention):
            fn()

    def _capture(self, key: tuple, fn, reset=None) -> None:
        """Warm `fn` up twice on a side stream (this runs it: callers save or reset the state, or pass `reset`, run
        after each warm-up), then capture it."""
        rt = self.rt
        if rt.use_compile:
            self._mark_dynamic()
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with use_fast_attention(rt.model, rt.decode_attention), torch.cuda.stream(stream):
            for _ in range(2):  # compiles, autotunes, creates cuBLAS handles: none of that may happen under capture
                try:
                    fn()
                except Exception as e:
                    if not rt.use_compile:
                        raise Unsupported(f"the decode step of {type(rt.model).__name__} failed "
                                          f"({type(e).__name__}: {str(e)[:300]})") from e
                    rt.uncompile(e)
                    if reset is not None:  # a step that failed part-way (chain: a later sub-step) starts over
                        reset()
                    fn()
                if reset is not None:
                    reset()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()  # once per graph: the warm-up's (compile's) time apart from the capture's
        warmed = time.perf_counter()
        rt.seconds["warmup"] += warmed - start
        graph = torch.cuda.CUDAGraph()
        try:
            with use_fast_attention(rt.model, rt.decode_attention), torch.cuda.graph(graph, pool=rt._mempool):
                fn()
        except Exception as e:
            raise Unsupported(f"could not capture the decode step of {type(rt.model).__name__} as a CUDA graph "
                              f"({type(e).__name__}: {str(e)[:300]})") from e
        torch.cuda.synchronize()
        rt.seconds["capture"] += time.perf_counter() - warmed
        rt.stats["captures"] += 1
        self.graphs[key] = graph

    def prepare_decode(self, key: StepKey) -> None:
        """Capture the decode step for this plan before the prefill (warm-up steps scribble on the state)."""
        if self.rt.use_graphs and ("decode", key) not in self.graphs:
            self.state.slot.fill_(0)
            self.cache.set_slots(self.state.slot)
            self._capture(("decode", key), lambda: self._decode_step(key))

    def _decode_step(self, key: StepKey) -> None:
        rt, st = self.rt, self.state
        step = rt.forward_fn(self.batch)
        logits = step(rt.model, self.cache, st.tokens, st.positions, st.slot, st.prompt_valid, st.prompt_len,
                      rt.window, rt.kind, rt.dtype)
        sample_and_record(logits[:, -1].float(), st, key)

    def decode(self, key: StepKey) -> None:
        """One token for every row: a graph replay (or the eager step on the CPU)."""
        self.cache.set_slots(self.state.slot)
        self._run(("decode", key), lambda: self._decode_step(key))

    # -- prefill ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the prompt, fill the cache and the state; return the last position's float32 logits [batch, V].
        Afterwards slot = T - 1 and positions = last prompt position: `sample_and_record` then advances both."""
        rt, st = self.rt, self.state
        n, t = input_ids.shape
        self.n_rows = n
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        st.ids.zero_()
        st.ids[:n, :t] = input_ids
        st.prompt_valid.zero_()
        st.prompt_valid[:n, :t] = valid
        st.prompt_len.fill_(t)
        st.slot.fill_(t - 1)
        st.positions.fill_(-1)
        st.positions[:n, 0] = valid.sum(1) - 1
        st.done.zero_()
        st.done[n:] = True  # rows that only fill the batch bucket
        st.n_done.zero_()
        st.all_done.zero_()
        position_ids = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
        logits = torch.zeros(self.batch, rt.vocab, dtype=torch.float32, device=rt.device)
        rows = max(1, rt.prefill_tokens // t)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(rt.model) else {}
        with use_fast_attention(rt.model, rt.decode_attention):
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                self.cache.set_prefill(slice(r0, r1), valid[r0:r1])
                try:
                    out = rt.model(input_ids=input_ids[r0:r1], position_ids=position_ids[r0:r1],
                                   attention_mask=prefill_mask(valid[r0:r1], rt.window, rt.kind, rt.dtype),
                                   **{cache_kwarg(rt.model): self.cache}, use_cache=True, **keep)
                finally:
                    self.cache.set_prefill(None)
                logits[r0:r1] = out.logits[:, -1].float()
        if not rt.verified:
            layers = self.cache.layers
            if not all(getattr(layer, "written", True) for layer in layers):
                raise Unsupported(f"{type(rt.model).__name__} does not write its keys/values through the cache "
                                  "(`past_key_values.update`), so a static cache cannot serve it")
            rt.verified = True
        return logits

    # -- the contract for speculative decoding: forward Q tokens, rewind ------------------------------------------

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, tree: tuple | None = None, hidden: bool = False):
        """Logits [batch, Q, V] (float32) of Q tokens placed at the next Q slots of every row; advances slots and
        positions by Q. Captured once per Q. The returned buffer is overwritten by the next call with the same Q.

        `tree` (a draft tree: the parent node of each of the Q nodes, a host tuple, -1 at node 0, every parent before
        its children): node i still goes to slot next + i, but at position next + depth(i), and it sees the row's
        cache, itself and its ancestors only (`tree_mask`); captured once per tree. `hidden=True` also returns the
        last hidden states [batch, Q, H] (what Medusa heads read): (logits, hidden). Either needs KV layers whose
        slots can be moved (`move`; else Unsupported). After verifying a tree, `move` the accepted path's K/V to
        contiguous slots and `rewind` the rest."""
        if tree is not None or hidden:
            return self._forward_tree(tokens, tuple(tree) if tree is not None else (-1,) + tuple(range(tokens.shape[1] - 1)))
        rt, st = self.rt, self.state
        q, per_row = tokens.shape[1], self.per_row
        if (q, per_row) not in self.verify_buffers:  # everything the graph reads must outlive this call
            self.verify_buffers[q, per_row] = (
                torch.zeros(self.batch, q, dtype=torch.long, device=rt.device),
                torch.zeros((self.batch, q) if per_row else (q,), dtype=torch.long, device=rt.device),
                torch.zeros(self.batch, q, dtype=torch.long, device=rt.device),
                torch.zeros(self.batch, q, rt.vocab, dtype=torch.float32, device=rt.device),
                torch.arange(q, device=rt.device),
            )
        tok, slots, pos, out, offsets = self.verify_buffers[q, per_row]
        _rows(tok, tokens.shape[0]).copy_(tokens)
        next_slot = st.row_slot if per_row else st.slot  # [B, 1] or [1]

        def step():
            slots.copy_(next_slot + offsets)
            # a rewound slot may be a left pad (masked key, position -1): absolute position tables need >= 0
            pos.copy_((st.positions + offsets).clamp_min(0))
            logits = rt.forward_fn(self.batch)(rt.model, self.cache, tok, pos, slots, st.prompt_valid,
                                               st.prompt_len, rt.window, rt.kind, rt.dtype)
            out.copy_(logits.float())
            next_slot.add_(q)
            st.positions.add_(q)

        self.cache.set_slots(slots)
        self._run_advancing(("forward", q, per_row), step, (tok, pos, slots) if per_row else (tok, pos))
        return out

    def _run_advancing(self, key: tuple, step, batch_dims: tuple) -> None:
        """Run `step`, which advances the next slot(s) and the positions (`forward`, `chain`, tree forwards): captured
        once per key, its warm-ups undone so that they write the same slots and never run past the capacity.
        `batch_dims`: the step's buffers whose dim 0 is the batch (symbolic for torch.compile, as the decode step's)."""
        rt, st = self.rt, self.state
        next_slot = st.row_slot if self.per_row else st.slot
        if rt.use_compile and self.batch > 1 and key not in self.graphs:
            for t in batch_dims:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if key not in self.graphs and rt.use_graphs:
            saved = next_slot.clone(), st.positions.clone()

            def reset():
                next_slot.copy_(saved[0])
                st.positions.copy_(saved[1])

            self._capture(key, step, reset)
        self._run(key, step)

    @torch.no_grad()
    def chain(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Greedy drafting in one call: `tokens` [B, Q0] go to the next Q0 slots, then k - 1 more one-token steps
        each feed the previous step's argmax. Returns the k argmax tokens [batch, k] (a buffer that the next call
        with the same Q0 and k overwrites) and advances slots and positions by Q0 + k - 1, as `forward` of the Q0
        tokens and then of each draft would. One CUDA graph per (Q0, k): a draft model's k steps cost one replay,
        not k replays with host work between them (the steps reuse the compiled Q0- and one-token forwards)."""
        rt, st = self.rt, self.state
        q0, per_row = tokens.shape[1], self.per_row
        key = ("chain", q0, k, per_row)
        if key not in self.verify_buffers:  # everything the graph reads must outlive this call
            long = dict(dtype=torch.long, device=rt.device)
            slots = (lambda q: (self.batch, q)) if per_row else (lambda q: (q,))
            self.verify_buffers[key] = (
                torch.zeros(self.batch, q0, **long), torch.zeros(slots(q0), **long),
                torch.zeros(self.batch, q0, **long),
                torch.zeros(self.batch, 1, **long), torch.zeros(slots(1), **long), torch.zeros(self.batch, 1, **long),
                torch.zeros(self.batch, k, **long), torch.arange(q0, device=rt.device),
            )
        tok0, slots0, pos0, tok1, slots1, pos1, out, offsets = self.verify_buffers[key]
        _rows(tok0, tokens.shape[0]).copy_(tokens)
        next_slot = st.row_slot if per_row else st.slot  # [B, 1] or [1]

        def argmax_after(tok, slots, pos, offs):
            slots.copy_(next_slot + offs)
            pos.copy_((st.positions + offs).clamp_min(0))  # a rewound slot may be a left pad (position -1)
            self.cache.set_slots(slots)
            # asked at every run, as `forward` does: a failed compile during the capture's warm-up (`uncompile`)
            # swaps in the eager step, which the retry must use
            fn = rt.forward_fn(self.batch)
            logits = fn(rt.model, self.cache, tok, pos, slots, st.prompt_valid, st.prompt_len, rt.window, rt.kind,
                        rt.dtype)
            next_slot.add_(tok.shape[1])
            st.positions.add_(tok.shape[1])
            return logits[:, -1].argmax(-1)

        def step():
            out[:, 0] = argmax_after(tok0, slots0, pos0, offsets)
            for i in range(1, k):
                tok1.copy_(out[:, i - 1: i])
                out[:, i] = argmax_after(tok1, slots1, pos1, offsets[:1])

        batch_dims = (tok0, pos0, slots0, tok1, pos1, slots1) if per_row else (tok0, pos0, tok1, pos1)
        self._run_advancing(key, step, batch_dims)
        return out

    def check_trees(self) -> None:
        """Unsupported unless tree forwards and `move` can run on this session's KV layers: the runtime's own
        `StaticKVLayer`s, or a KV plugin's layers with `move_slots(src, dst)` that store keys at sequence slots."""
        for layer in self.cache.layers:
            own = type(layer) is StaticKVLayer
            if not (own or callable(getattr(layer, "move_slots", None))) or hasattr(layer, "visible"):
                raise Unsupported(f"the KV layers ({type(layer).__name__}) cannot move a verified draft path to "
                                  "contiguous slots (no `move_slots`), so draft trees cannot run on them",
                                  whole_model=False)

    def _tree_buffers(self, parents: tuple) -> tuple:
        key = ("tree", parents, self.per_row)
        if key not in self.verify_buffers:  # everything the graph reads must outlive this call
            self.check_trees()
            rt, q = self.rt, len(parents)
            if parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
                raise ValueError(f"a draft tree needs parent[0] == -1 and 0 <= parent[i] < i; got {parents}")
            depth = [0] * q
            visible = torch.eye(q, dtype=torch.bool)
            for i in range(1, q):
                depth[i] = depth[parents[i]] + 1
                visible[i] |= visible[parents[i]]
            dev, long = rt.device, dict(dtype=torch.long, device=rt.device)
            self.verify_buffers[key] = (
                torch.zeros(self.batch, q, **long),  # tokens
                torch.zeros((self.batch, q) if self.per_row else (q,), **long),  # slots
                torch.zeros(self.batch, q, **long),  # positions
                torch.zeros(self.batch, q, rt.vocab, dtype=torch.float32, device=dev),  # logits
                torch.zeros(self.batch, q, rt.config.hidden_size, dtype=rt.dtype, device=dev),  # hidden states
                torch.arange(q, device=dev),
                torch.tensor(depth, **long),
                visible.to(dev),
            )
        return key, self.verify_buffers[key]

    def _forward_tree(self, tokens: torch.Tensor, parents: tuple):
        rt, st = self.rt, self.state
        key, (tok, slots, pos, out, hid, offsets, depth, visible) = self._tree_buffers(parents)
        q = len(parents)
        _rows(tok, tokens.shape[0]).copy_(tokens)
        next_slot = st.row_slot if self.per_row else st.slot  # [B, 1] or [1]

        def step():
            slots.copy_(next_slot + offsets)
            pos.copy_((st.positions + depth).clamp_min(0))  # a rewound slot may be a left pad (position -1)
            logits, h = rt.forward_fn(self.batch, tree=True)(rt.model, self.cache, tok, pos, slots, next_slot, depth,
                                                             visible, st.prompt_valid, st.prompt_len, rt.window,
                                                             rt.kind, rt.dtype)
            out.copy_(logits.float())
            hid.copy_(h)
            next_slot.add_(q)  # as for a chain of Q tokens: `rewind` and `move` put the accepted path in place
            st.positions.add_(q)

        self.cache.set_slots(slots)
        self._run_advancing(key, step, (tok, pos, slots, next_slot) if self.per_row else (tok, pos))
        return out, hid

    @torch.no_grad()
    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy each row's K/V at slots `src` [n, m] to slots `dst` [n, m] in every layer (n <= batch rows; all
        reads before the writes): a verified tree's accepted path goes to contiguous slots. Device ops, captured
        once per m; no host sync. Slots are absolute (the prompt's first slot is 0); the session's next slot and
        position do not change (`rewind` to the end of the kept path)."""
        rt = self.rt
        m = src.shape[1]
        key = ("move", m)
        if key not in self.verify_buffers:
            self.check_trees()
            self.verify_buffers[key] = (torch.zeros(self.batch, m, dtype=torch.long, device=rt.device),
                                        torch.zeros(self.batch, m, dtype=torch.long, device=rt.device))
        src_buf, dst_buf = self.verify_buffers[key]
        layers = self.cache.layers

        def step():
            if all(type(layer) is StaticKVLayer for layer in layers):
                rt.move_fn()([layer.keys for layer in layers], [layer.values for layer in layers], src_buf, dst_buf)
            else:
                for layer in layers:
                    layer.move_slots(src_buf, dst_buf)

        if key not in self.graphs and rt.use_graphs:
            src_buf.zero_()  # the warm-ups run the step: slot 0 onto itself changes nothing
            dst_buf.zero_()
            self._capture(key, step)
        n = src.shape[0]
        src_buf[:n].copy_(src)
        dst_buf[:n].copy_(dst)
        if n < self.batch:  # rows that only fill the bucket copy a slot onto itself
            src_buf[n:].copy_(src[:1].expand(self.batch - n, m))
            dst_buf[n:].copy_(src[:1].expand(self.batch - n, m))
        self._run(key, step)

    def rewind(self, n: int | torch.Tensor) -> None:
        """Forget the last n tokens (their slots are masked from now on and overwritten by the next ones). `n`: an
        int, or a LongTensor with one count per row (device; a `per_row` session, or batch 1): no host sync."""
        st = self.state
        if not isinstance(n, torch.Tensor):
            (st.row_slot if self.per_row else st.slot).sub_(n)
            st.positions.sub_(n)
            return
        n = n.reshape(-1, 1).to(st.slot.device)
        if n.shape[0] < self.batch:  # rows that only fill the bucket follow row 0, so they stay inside the cache
            n = torch.cat([n, n[:1].expand(self.batch - n.shape[0], 1)])
        if self.per_row:
            st.row_slot.sub_(n)
        elif self.batch == 1:
            st.slot.sub_(n[0])
        else:
            raise ValueError("one rewind count per row needs a session started with per_row=True")
        st.positions.sub_(n)


def _rows(buffer: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of a batch buffer (the buffer itself when it has n: one op less per call)."""
    return buffer if buffer.shape[0] == n else buffer[:n]


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
