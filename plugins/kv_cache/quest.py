"""`quest`: query-aware page selection (Quest, Tang et al. 2024, arXiv:2406.10774), a speed plugin for long context.

The full cache is kept (nothing is evicted: any token can come back at a later step). Slots are grouped in pages of
`page` tokens; each page keeps the element-wise minimum and maximum of its keys. At each decode step, per KV head,
the page's upper bound on q.k, sum_d max(q_d * min_d, q_d * max_d) summed over the query heads of the group (the
group shares one selection, as in Double Sparsity / grouped Quest), picks the top `budget / page` pages; the first
page (attention sinks) and the newest page are always read. Attention then reads only those pages: through the
Triton kernel `hf_accel.kernels.decode_attention` on CUDA (pages read in place), or a gather + SDPA elsewhere.
Prefill (and a later turn's prompt) attends in full, as in the paper. Left padding is masked per row: padding
slots are excluded from the page summaries and from attention.

Storage is a buffer written in place (`_store.GrowBuffer`), so a step does not copy the cache (transformers'
DynamicLayer concatenates, i.e. rewrites it, at every step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hf_accel.errors import OptionError

from ._generate import KV_PLUGINS, KVPlugin
from ._layers import SELF_ATTEND
from ._store import BufferedLayer, grouped_attention, step_positions


class QuestLayer(BufferedLayer):
    # real: [B, capacity] bool, slot holds a real token; kmin/kmax: [B, H, pages, D] page summaries
    row_state = ("real", "kmin", "kmax")

    def __init__(self, cache, layer_idx: int, policy: "QuestPolicy"):
        super().__init__(cache, layer_idx, align=policy.page * math.ceil(128 / policy.page))  # whole pages
        self.policy = policy
        self.page = policy.page
        self.selections = 0  # decode steps that read a selection (for tests and benchmarks)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, d = key_states.shape
        start = self.buf.n
        pos = step_positions(self.cache, self.seen, q, b, key_states.device)
        keys, values = self.buf.append(key_states, value_states)
        cap = self.buf.k.shape[2]
        if self.real is None or self.real.shape[1] != cap:
            real = torch.zeros(b, cap, dtype=torch.bool, device=key_states.device)
            if self.real is not None:
                real[:, : self.real.shape[1]] = self.real
            self.real = real
        self.real[:, start:start + q] = pos >= 0
        self.seen += q
        self.cumulative_length = self.seen
        self.keys, self.values = keys, values  # views: what transformers may look at
        self._summarise(start)
        n = self.buf.n
        if q == 1 and n > self.policy.budget:
            SELF_ATTEND.set(self)  # the attention hook calls self.attend with this step's query
        return keys, values

    def _summarise(self, start: int) -> None:
        """Refresh the min/max of the pages touched by the slots written since `start`."""
        page, n = self.page, self.buf.n
        cap = self.buf.k.shape[2]
        n_pages = cap // page
        b, h, _, d = self.buf.k.shape
        if self.kmin is None or self.kmin.shape[2] != n_pages:
            kmin = self.buf.k.new_zeros(b, h, n_pages, d)
            kmax = self.buf.k.new_zeros(b, h, n_pages, d)
            if self.kmin is not None:
                kmin[:, :, : self.kmin.shape[2]] = self.kmin
                kmax[:, :, : self.kmax.shape[2]] = self.kmax
            self.kmin, self.kmax = kmin, kmax
        p0, p1 = start // page, math.ceil(n / page)
        seg = self.buf.k[:, :, p0 * page:p1 * page].reshape(b, h, p1 - p0, page, d)
        slot = torch.arange(p0 * page, p1 * page, device=seg.device)
        ok = ((slot < n)[None] & self.real[:, p0 * page:p1 * page]).reshape(b, 1, p1 - p0, page, 1)
        lo = torch.where(ok, seg, math.inf).amin(3)
        hi = torch.where(ok, seg, -math.inf).amax(3)
        self.kmin[:, :, p0:p1] = torch.where(torch.isinf(lo), 0.0, lo).to(seg.dtype)
        self.kmax[:, :, p0:p1] = torch.where(torch.isinf(hi), 0.0, hi).to(seg.dtype)

    def select_pages(self, query: torch.Tensor) -> torch.Tensor:
        """[B, H, P] int32 indices of the pages to read for this step's query [B, Hq, 1, D] (sorted)."""
        b, hq, _, d = query.shape
        page, n = self.page, self.buf.n
        n_pages = math.ceil(n / page)
        h = self.kmin.shape[1]
        qg = query.reshape(b, h, hq // h, d)
        kmin, kmax = self.kmin[:, :, :n_pages], self.kmax[:, :, :n_pages]
        score = (torch.matmul(qg.clamp(min=0), kmax.transpose(-1, -2))
                 + torch.matmul(qg.clamp(max=0), kmin.transpose(-1, -2))).float().sum(2)  # [B, H, pages]
        has_real = self.real[:, : n_pages * page].reshape(b, n_pages, page).any(-1)  # [B, pages]
        score = score.masked_fill(~has_real[:, None], -math.inf)
        first = self.real[:, : n_pages * page].float().argmax(-1) // page  # each row's first real page: its sinks
        score.scatter_(2, first.view(b, 1, 1).expand(b, h, 1), math.inf)
        score[..., n_pages - 1] = math.inf  # the newest page holds this step's token
        k = min(n_pages, max(2, self.policy.budget // page))
        return score.topk(k, dim=-1).indices.sort(-1).values.to(torch.int32)

    def attend(self, module, query, key, value, attention_mask, scaling, base, *args, **kwargs):
        from hf_accel.kernels.decode_attention import gather_pages, kernel_supported, paged_decode_attention

        self.selections += 1
        pages = self.select_pages(query)
        b, hq, _, d = query.shape
        h = key.shape[1]
        keys, values = self.buf.k, self.buf.v
        n_valid = torch.full((b,), self.buf.n, dtype=torch.int32, device=query.device)
        use_kernel = self.policy.kernel == "triton" or (self.policy.kernel == "auto" and query.is_cuda)
        if use_kernel and kernel_supported(query, self.page):
            qg = query.reshape(b, h, hq // h, d)
            out = paged_decode_attention(qg, keys, values, pages, n_valid, self.real, scaling, self.page)
            return out.reshape(b, hq, 1, d).transpose(1, 2), None
        ks, slots = gather_pages(keys, pages, self.page)
        vs, _ = gather_pages(values, pages, self.page)
        real = self.real.gather(1, slots.clamp(min=0).flatten(1)).view_as(slots)
        visible = ((slots >= 0) & (slots < self.buf.n) & real)[:, :, None, :]  # [B, H, 1, S]
        return grouped_attention(query, ks, vs, visible, scaling), None

    def materialize(self):
        return self.buf.view()


@dataclass
class QuestPolicy(KVPlugin):
    """Query-aware page selection (Quest): full cache kept, each decode step reads only the top pages per KV head."""

    name = "quest"
    needs_attention = True  # the attention hook hands the step's query to the layer
    conflicts_with = KV_PLUGINS + ("kvquant",)
    budget: int = 2048  # tokens read per KV head and decode step (selected pages x page)
    page: int = 16  # tokens per page (the Triton kernel needs a power of two >= 16)
    kernel: Literal["auto", "torch", "triton"] = "auto"  # auto: Triton on CUDA, gather + SDPA elsewhere

    def __post_init__(self):
        if self.page < 1 or self.budget < 2 * self.page:
            raise OptionError(f"plugin 'quest': need page >= 1 and budget >= 2 * page (the sink page and the newest "
                              f"page are always read); got page={self.page}, budget={self.budget}")

    def make_layer(self, cache, layer_idx):
        return QuestLayer(cache, layer_idx, self)

    def card_metadata(self, model):
        return {"kv_read_budget_tokens": self.budget, "kv_page": self.page}
