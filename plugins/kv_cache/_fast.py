"""`kvquant` inside the fast runtime: a static-capacity quantized KV layer, served through `_hf_accel_kv_layer`.

The runtime (hf_accel/runtime/__init__.py, contract point 2) preallocates one layer per decoder layer and bucket,
writes the prompt eagerly and then replays each decode step from a CUDA graph, so everything here has fixed shapes
and reads its positions from device tensors. Storage of one layer (B rows, H KV heads, C = capacity slots, D dims):

    codes  kc, vc   uint8 [B, H, C, D * bits / 8]    every written token, quantized (`_layers.quantize`; int4 and
                                                     int2 packed two and four per byte)
    scales ks, kz,  [B, H, C, D / group]             per-token scale and minimum, model dtype
           vs, vz
    channel         [B, H, 1, D]                     the keys' per-channel scale (fixed at the first flush)
    ring   rk, rv   [B, H, W, D]                     the last W tokens in full precision, slot s at s % W
                                                     (W = min(C, residual + 32 + SPEC_TOKENS))

The quantization is `KVLayer`'s (kvquant's cache for transformers' loop), and so is the moment a token stops being
read in full precision. `KVLayer` keeps new tokens in full precision and, after a step, quantizes all but the
`residual` most recent ones, 32 at a time (`FLUSH_EVERY`); the first flush (at the prompt when it is longer than
`residual`) also fixes the keys' per-channel scale from the tokens it quantizes. Since a token's codes depend only on
the token and that scale, this layer quantizes each token once, when it is written (prompt tokens at the prefill),
and decides per slot which copy attention reads: slots before the flush boundary `qlen` read the dequantised codes,
the others the ring. With T the padded prompt length, the first flush happens when `seen` (tokens stored) first
reaches T0 = max(T, residual + 1, 2) and quantizes q0 = T0 - residual tokens; later ones add 32 tokens each, so

    qlen(seen) = 0                                     if seen < T0
               = q0 + 32 * floor((seen - T0) / 32)     otherwise,

and a step that writes tokens at slots p0.. reads qlen(p0) slots quantized (transformers' loop also attends before
flushing; a speculative verify that would cross a boundary is split there, `forward_cuts`). T, T0 and q0 are
device scalars set by the prefill, so one captured graph serves every prompt length of a bucket, and the boundary
is a function of the slot alone: the runtime's `rewind` needs nothing from the layer.
The dequantised full-capacity K/V that `update` returns are the same numbers `KVLayer` hands to attention; under
torch.compile the dequantisation and the ring select are elementwise and fuse into one pass over the codes.

The one case where the channel scale cannot be taken at the prefill is residual = 0 with a one-token prompt (the
first flush takes tokens 0 and 1): then the first decode step takes it from the ring and re-quantizes slots 0 and 1.

Reading the codes (`kvquant(kernel=...)`). Dequantised full-capacity K/V cost more bandwidth than the bf16 cache they
replace (read the codes, write bf16 K/V, read them again in attention), so on CUDA a decode step's `update` returns
no tensors but a `QuantKV` view (the layer and this step's boundary `qlen`) as both keys and values, and the
runtime's attention (`fast_sdpa`, contract point 2) calls `view.attend(query, mask, scale)`: the Triton kernel
`hf_accel.kernels.kvquant_attention` reads codes, scales and ring in place, each cached token once. Nothing of
capacity size is written per step besides the new tokens' codes. The view is used only when the model's attention is
"sdpa" (served by `fast_sdpa`, which knows it); with any other attention, or `kernel='torch'`, or a head_dim / group
the kernel does not read, `update` returns the dequantised tensors as before. On the CPU `auto` keeps the dequantised
path; `kernel='triton'` takes the view there too (the op then runs its torch reference, or the kernel under
TRITON_INTERPRET=1), which is how the CPU tests check the plumbing.
"""

from __future__ import annotations

import weakref

import torch

from hf_accel.kernels.kvquant_attention import kernel_supported, kvquant_decode_attention
from hf_accel.runtime import RuntimeLayer, Unsupported
from hf_accel.runtime.attention import mask_kind

from ._layers import FLUSH_EVERY, QUANT_CHUNK, dequantize, quantize

SPEC_TOKENS = 16  # ring slots beyond the flush window: `Session.forward` may place up to 1 + SPEC_TOKENS tokens
FIELDS = ("kc", "vc", "ks", "kz", "vs", "vz", "rk", "rv", "channel")


def qlen(seen: torch.Tensor, t0: torch.Tensor, q0: torch.Tensor) -> torch.Tensor:
    """Slots that `KVLayer` holds quantized once `seen` tokens are stored (device tensors, see the module doc)."""
    flushed = q0 + FLUSH_EVERY * torch.div(seen - t0, FLUSH_EVERY, rounding_mode="floor")
    return torch.where(seen >= t0, flushed, torch.zeros_like(flushed))


def channel_scale(k: torch.Tensor) -> torch.Tensor:
    """The keys' per-channel scale, as `QuantStore.append` takes it: max |k| over the first flush's tokens."""
    return k.float().abs().amax(dim=-2, keepdim=True).clamp(min=1e-4).to(k.dtype)


def constants(bits: int, group: int):
    """`bits` and `group` as a function's defaults, read in compiled code as `bits, group = layer.format()`. Dynamo
    makes a plain int attribute of the layer symbolic once a second model with other bits compiles the same step
    (automatic dynamic: kvquant int4 after int8 in one process), and torch 2.11 then fails on `1 << s` in
    `quantize`; integers read from defaults are always specialized (guarded as constants)."""
    def format(bits: int = bits, group: int = group) -> tuple[int, int]:
        return bits, group
    return format


class QuantKV:
    """What a decode step's `update` returns, as keys and as values, when attention reads the codes: the layer's
    storage and this step's flush boundary `qlen` (slots [0, qlen) read the codes, the others the ring). A plain
    object, created inside the compiled step; only `fast_sdpa` receives it (see the module docstring)."""

    def __init__(self, layer: "QuantStaticLayer", qlen: torch.Tensor):
        self.layer, self.qlen = layer, qlen

    def attend(self, query: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """[B, Q, Hq, D]: attention of `query` [B, Hq, Q, D] under the runtime's 4-D mask, in one op."""
        t, (bits, group) = self.layer.t, self.layer.format()
        return kvquant_decode_attention(query, t["kc"], t["ks"], t["kz"], t["vc"], t["vs"], t["vz"], t["channel"],
                                        t["rk"], t["rv"], self.qlen, mask, scale, bits, group)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantised full-capacity K/V (for an attention call the kernel does not serve)."""
        return self.layer.dequantized(self.qlen)


class QuantStaticLayer(RuntimeLayer):
    """One decoder layer's quantized K/V for the fast runtime (`StaticKVLayer`'s interface)."""

    def __init__(self, t: dict[str, torch.Tensor], bits: int, group: int, residual: int, slot_ids: torch.Tensor,
                 ring_index: torch.Tensor, reads_codes: bool = False):
        super().__init__()
        self.t, self.bits, self.group, self.residual = t, bits, group, residual
        self.format = constants(bits, group)  # what compiled code reads (see `constants`)
        self.reads_codes = reads_codes  # decode returns a `QuantKV` view instead of dequantised tensors
        self.slot_ids, self.ring_index = slot_ids, ring_index  # arange(C), arange(C) % W
        self.keys, self.values = t["kc"], t["vc"]  # what the runtime marks dynamic (batch and capacity)
        self.is_initialized = True
        self.capacity, self.ring = t["kc"].shape[2], t["rk"].shape[2]
        self.bounded = self.ring < self.capacity  # (a flag, not the capacity: torch.compile guards on what is read)
        # T (padded prompt length), T0 (tokens stored at the first flush), q0 (tokens that flush quantizes)
        self.schedule = torch.zeros(3, dtype=torch.long, device=t["kc"].device)
        self.first_flush = 0  # T0 on the host (`forward_cuts`; never read by the compiled step)
        self.prefill_rows: slice | None = None  # None: decode mode
        self.slots: torch.Tensor | None = None
        self.written = False

    def dynamic_dims(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """What torch.compile treats as symbolic: the capacity (and, batch > 1, the batch), so that one compile
        serves every bucket (the ring's length is min(capacity, window): fixed once the capacity exceeds it)."""
        t, batched = self.t, self.t["kc"].shape[0] > 1
        per_slot = [(t[n], (0, 2) if batched else (2,)) for n in ("kc", "vc", "ks", "kz", "vs", "vz")]
        per_row = [(t[n], (0,)) for n in ("rk", "rv", "channel")] if batched else []
        return per_slot + per_row + [(self.slot_ids, (0,)), (self.ring_index, (0,))]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.t.values())

    def forward_cuts(self, first_slot: int, q: int) -> list[int]:
        """Where a forward of `q` tokens at slots first_slot.. must be split (token indices in (0, q)): all its
        queries read `qlen(first_slot)` slots quantized, while `KVLayer` (one token per step) quantizes more once a
        flush boundary T0 + 32 m is passed, so a verify that crosses one is run as separate forwards
        (`SessionRows.forward`, on the host: the boundaries follow from T0 alone)."""
        t0 = self.first_flush
        return [i for i in range(1, q) if first_slot + i >= t0 and (first_slot + i - t0) % FLUSH_EVERY == 0]

    def _codes(self, k: torch.Tensor, v: torch.Tensor, channel: torch.Tensor):
        bits, group = self.format()
        kc, ks, kz = quantize(k / channel, bits, group)
        vc, vs, vz = quantize(v, bits, group)
        return dict(kc=kc, ks=ks, kz=kz, vc=vc, vs=vs, vz=vz)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t = self.t
        if self.prefill_rows is not None:
            self._prefill(key_states, value_states)
            return key_states, value_states
        q = key_states.shape[2]
        if self.bounded and q > SPEC_TOKENS + 1:
            raise Unsupported(f"kvquant under 'fast' places at most {SPEC_TOKENS + 1} tokens per forward (got {q})",
                              whole_model=False)
        p = self.slots  # [q] slots of the new tokens (device)
        p0 = p[:1]
        prompt, t0, q0 = self.schedule[0:1], self.schedule[1:2], self.schedule[2:3]
        t["rk"].index_copy_(2, p % self.ring, key_states)
        t["rv"].index_copy_(2, p % self.ring, value_states)
        channel = t["channel"]
        if self.residual == 0:  # a one-token prompt: this step's flush (slots 0 and 1) fixes the channel scale
            first = (q0 > prompt) & (p0 <= q0 - 1) & (q0 - 1 < p0 + q)  # [1]
            channel.copy_(torch.where(first, channel_scale(t["rk"][:, :, :2]), channel))
        new = self._codes(key_states, value_states, channel)
        for name, x in new.items():
            t[name].index_copy_(2, p, x)
        if self.residual == 0:
            old = self._codes(t["rk"][:, :, :2], t["rv"][:, :, :2], channel)
            for name, x in old.items():
                t[name][:, :, :2].copy_(torch.where(first, x, t[name][:, :, :2]))
        boundary = qlen(p0, t0, q0)
        if self.reads_codes:  # attention reads codes and ring in place: nothing of capacity size is written
            view = QuantKV(self, boundary)
            return view, view
        return self.dequantized(boundary)

    def dequantized(self, boundary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-capacity K/V as `KVLayer` hands them to attention: slots before `boundary` dequantised, the others
        from the ring."""
        t, (bits, group) = self.t, self.format()
        quantized = (self.slot_ids < boundary)[:, None]  # [C, 1]: slots read from the codes
        keys = dequantize(t["kc"], t["ks"], t["kz"], bits, group) * t["channel"]
        values = dequantize(t["vc"], t["vs"], t["vz"], bits, group)
        keys = torch.where(quantized, keys, t["rk"].index_select(2, self.ring_index))
        values = torch.where(quantized, values, t["rv"].index_select(2, self.ring_index))
        return keys, values

    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The prompt [rows, H, T, D] of rows `prefill_rows`: codes for slots [0, T), the channel scale, the ring."""
        t, rows = self.t, self.prefill_rows
        n = k.shape[2]
        if k.shape[1] != t["rk"].shape[1] or k.shape[3] != t["rk"].shape[3]:
            raise Unsupported(f"keys of shape {tuple(k.shape)} do not fit a cache of {t['rk'].shape[1]} heads x "
                              f"{t['rk'].shape[3]} dims")
        t0 = max(n, self.residual + 1, 2)
        q0 = t0 - self.residual
        self.schedule.copy_(torch.tensor([n, t0, q0]))
        self.first_flush = t0
        channel = t["channel"][rows]
        channel.copy_(channel_scale(k[:, :, :q0]) if q0 <= n else torch.ones_like(channel))
        for i in range(0, n, QUANT_CHUNK):  # float32 temporaries stay small for a long prompt
            j = min(n, i + QUANT_CHUNK)
            for name, x in self._codes(k[:, :, i:j], v[:, :, i:j], channel).items():
                t[name][rows, :, i:j].copy_(x)
        m = min(n, self.ring)  # the last tokens also go to the ring, which the decode steps read them from
        ring_slots = torch.arange(n - m, n, device=k.device) % self.ring
        t["rk"][rows].index_copy_(2, ring_slots, k[:, :, n - m:])
        t["rv"][rows].index_copy_(2, ring_slots, v[:, :, n - m:])
        self.written = True


class QuantLayerFactory:
    """The `_hf_accel_kv_layer` factory kvquant installs. Like the runtime's own `KVPool`, its layers are views into
    one flat storage per layer and field that grows only when a larger bucket needs it, so buckets share memory; the
    runtime calls `release()` when it drops its sessions (a larger bucket, `invalidate`, a moved model)."""

    def __init__(self, bits: int, group: int, residual: int, model, kernel: str = "auto"):
        self.bits, self.group, self.residual, self.kernel = bits, group, residual, kernel
        self.model = weakref.ref(model)  # asked for its eviction policy at each call (one may be applied later)
        self.storage: dict[tuple[int, str], torch.Tensor] = {}
        self.indices: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __deepcopy__(self, memo):  # a deep-copied model gets a factory of its own, with no storage
        model = self.model()
        return QuantLayerFactory(self.bits, self.group, self.residual, memo.get(id(model), model), self.kernel)

    def reads_codes(self, head_dim: int, device) -> bool:
        """Whether decode steps hand attention a `QuantKV` view (the kernel path, see the module docstring)."""
        model = self.model()
        if self.kernel == "torch" or getattr(model, "config", None) is None or mask_kind(model) != "fast":
            return False  # only `fast_sdpa` (the runtime's attention for "sdpa" models) knows the view
        if self.kernel == "triton":
            return True
        return torch.device(device).type == "cuda" and kernel_supported(head_dim, self.bits, self.group)

    def __call__(self, layer_idx: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        from ._generate import POLICY_ATTR

        model = self.model()
        policy = getattr(model, POLICY_ATTR, None) if model is not None else None
        if policy is not None:
            raise Unsupported(f"kvquant combined with the eviction policy {policy.name!r} has no layer for the fast "
                              "runtime", whole_model=False)
        if head_dim % self.group:
            raise Unsupported(f"kvquant: group={self.group} does not divide the head dimension {head_dim}")
        ring = min(capacity, self.residual + FLUSH_EVERY + SPEC_TOKENS)
        g = head_dim // self.group
        code = head_dim * self.bits // 8
        shapes = dict(kc=(capacity, code, torch.uint8), vc=(capacity, code, torch.uint8), ks=(capacity, g, dtype),
                      kz=(capacity, g, dtype), vs=(capacity, g, dtype), vz=(capacity, g, dtype),
                      rk=(ring, head_dim, dtype), rv=(ring, head_dim, dtype), channel=(1, head_dim, dtype))
        t = {name: self._view(layer_idx, name, (batch, kv_heads, n, width), dt, device)
             for name, (n, width, dt) in shapes.items()}
        key = (capacity, ring, str(device))
        if key not in self.indices:
            slots = torch.arange(capacity, device=device)
            self.indices[key] = (slots, slots % ring)
        return QuantStaticLayer(t, self.bits, self.group, self.residual, *self.indices[key],
                                reads_codes=self.reads_codes(head_dim, device))

    def _view(self, layer_idx: int, name: str, shape: tuple, dtype, device) -> torch.Tensor:
        need = shape[0] * shape[1] * shape[2] * shape[3]
        flat = self.storage.get((layer_idx, name))
        if flat is None or flat.numel() < need or flat.dtype != dtype or flat.device != torch.device(device):
            self.storage.pop((layer_idx, name), None)  # free before taking the new storage
            # zeros (ones for the channel scale): slots that are not written yet still enter the attention matmul
            # with weight 0, and must be finite
            flat = (torch.ones if name == "channel" else torch.zeros)(need, dtype=dtype, device=device)
            self.storage[(layer_idx, name)] = flat
        return flat[:need].view(shape)

    def release(self) -> None:
        self.storage, self.indices = {}, {}

    def nbytes(self) -> int:
        """Bytes this factory holds (every layer, the largest bucket since the last release)."""
        return sum(t.nbytes for t in self.storage.values())
