"""`quest`: query-aware page selection (Quest, Tang et al. 2024, arXiv:2406.10774), a speed plugin for long context.

The full cache is kept (nothing is evicted: any token can come back at a later step). Slots are grouped in pages of
`page` tokens; each page keeps the element-wise minimum and maximum of its keys. At each decode step, per KV head,
the page's upper bound on q.k, sum_d max(q_d * min_d, q_d * max_d) summed over the query heads of the group (the
group shares one selection, as in Double Sparsity / grouped Quest), picks the top `budget / page` pages; the first
page (attention sinks) and the newest page are always read. Attention then reads only those pages: through the
Triton kernel `hf_accel.kernels.decode_attention` on CUDA (pages read in place), or a gather + SDPA elsewhere.
Prefill (and a later turn's prompt) attends in full, as in the paper.

Left padding: a row's pages start at its first real token (page p: its real tokens p*page .. p*page + page - 1) and
padding slots belong to no page, so a row has the pages, summaries and selections it has alone. (Pages were fixed
runs of storage slots: padding moved a row's page boundaries, and one more padding column changed its tokens.) The
Triton kernel reads storage pages: it serves batches whose rows all start on a page boundary (any unpadded batch),
others take the gather path.

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
    # real: [B, capacity] bool, slot holds a real token; first: [B] each row's first real slot, where its pages start;
    # kmin/kmax: [B, H, pages, D] page summaries (+inf / -inf while a page holds no real token)
    row_state = ("real", "first", "kmin", "kmax")

    def __init__(self, cache, layer_idx: int, policy: "QuestPolicy"):
        super().__init__(cache, layer_idx, align=policy.page * math.ceil(128 / policy.page))  # whole pages
        self.policy = policy
        self.page = policy.page
        self.selections = 0  # decode steps that read a selection (for tests and benchmarks)
        self.aligned: bool | None = None  # every row's pages are storage pages (the kernel's layout); None: unknown

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
        if start == 0 or q > 1:  # a prompt: decode tokens are real and come after it, so `first` stays put
            self.first = self.real[:, : self.buf.n].to(torch.uint8).argmax(-1)  # the first True (0 while none)
            self.aligned = None
        self.seen += q
        self.cumulative_length = self.seen
        self.keys, self.values = keys, values  # views: what transformers may look at
        self._summarise(start)
        n = self.buf.n
        if q == 1 and n > self.policy.budget:
            SELF_ATTEND.set(self)  # the attention hook calls self.attend with this step's query
        return keys, values

    def _summarise(self, start: int) -> None:
        """Fold the real keys written since `start` into the min/max of their rows' pages (slots are written once)."""
        b, h, cap, d = self.buf.k.shape
        n_pages, n = cap // self.page, self.buf.n
        if self.kmin is None or self.kmin.shape[2] != n_pages:
            kmin = self.buf.k.new_full((b, h, n_pages, d), math.inf)
            kmax = self.buf.k.new_full((b, h, n_pages, d), -math.inf)
            if self.kmin is not None:
                kmin[:, :, : self.kmin.shape[2]] = self.kmin
                kmax[:, :, : self.kmax.shape[2]] = self.kmax
            self.kmin, self.kmax = kmin, kmax
        slot = torch.arange(start, n, device=self.real.device)
        page = (slot - self.first[:, None]).clamp(min=0) // self.page  # [B, q]; padding (< first) is masked below
        idx = page[:, None, :, None].expand(b, h, n - start, d)
        seg, pad = self.buf.k[:, :, start:n], ~self.real[:, None, start:n, None]
        self.kmin.scatter_reduce_(2, idx, seg.masked_fill(pad, math.inf), "amin")
        self.kmax.scatter_reduce_(2, idx, seg.masked_fill(pad, -math.inf), "amax")

    def select_pages(self, query: torch.Tensor) -> torch.Tensor:
        """[B, H, P] int32 indices of the pages to read for this step's query [B, Hq, 1, D] (sorted; -1: none).
        Page p of a row holds its real tokens p*page .. p*page + page - 1 (`first` + those in storage)."""
        b, hq, _, d = query.shape
        page, n, budget = self.page, self.buf.n, self.policy.budget
        n_pages = math.ceil(n / page)  # every row's pages (fewer for a row with padding)
        h = self.kmin.shape[1]
        qg = query.reshape(b, h, hq // h, d)
        kmin, kmax = self.kmin[:, :, :n_pages], self.kmax[:, :, :n_pages]
        score = (torch.matmul(qg.clamp(min=0), kmax.transpose(-1, -2))
                 + torch.matmul(qg.clamp(max=0), kmin.transpose(-1, -2))).float().sum(2)  # [B, H, pages]
        tokens = (n - self.first).view(b, 1, 1)  # each row's real tokens
        empty = torch.arange(n_pages, device=score.device) * page >= tokens  # past the row's last page
        score = score.masked_fill(empty, -math.inf)  # (their +inf / -inf summaries scored -inf or NaN)
        score[..., 0] = math.inf  # each row's first page: its sinks
        score.scatter_(2, ((tokens - 1) // page).expand(b, h, 1), math.inf)  # the newest page holds this token
        full = max(2, budget // page)  # pages a longer row reads
        # a row of <= budget tokens (it attends in full alone) has at most ceil(budget / page) pages: all are read
        k = min(n_pages, max(full, math.ceil(budget / page)))
        top = score.topk(k, dim=-1).indices
        if k > full:  # budget not a whole number of pages: a longer row reads `full` pages
            top = top.masked_fill((torch.arange(k, device=top.device) >= full) & (tokens > budget), -1)
        return top.sort(-1).values.to(torch.int32)

    def attend(self, module, query, key, value, attention_mask, scaling, base, *args, **kwargs):
        from hf_accel.kernels.decode_attention import kernel_supported, paged_decode_attention

        self.selections += 1
        pages = self.select_pages(query)
        b, hq, _, d = query.shape
        h = key.shape[1]
        keys, values = self.buf.k, self.buf.v
        n_valid = torch.full((b,), self.buf.n, dtype=torch.int32, device=query.device)
        use_kernel = self.policy.kernel == "triton" or (self.policy.kernel == "auto" and query.is_cuda)
        if use_kernel and kernel_supported(query, self.page) and self._rows_aligned():
            qg = query.reshape(b, h, hq // h, d)
            storage = torch.where(pages >= 0, pages + (self.first // self.page).view(b, 1, 1).int(), -1)
            out = paged_decode_attention(qg, keys, values, storage, n_valid, self.real, scaling, self.page)
            return out.reshape(b, hq, 1, d).transpose(1, 2), None
        offs = torch.arange(self.page, device=query.device)
        slots = (self.first.view(b, 1, 1, 1) + pages.long()[..., None] * self.page + offs).flatten(2)  # [B, H, P*page]
        slots = torch.where(pages.repeat_interleave(self.page, dim=-1) >= 0, slots, -1)
        safe = slots.clamp(0, keys.shape[2] - 1)
        ks = keys.gather(2, safe[..., None].expand(-1, -1, -1, keys.shape[-1]))
        vs = values.gather(2, safe[..., None].expand(-1, -1, -1, values.shape[-1]))
        real = self.real.gather(1, safe.flatten(1)).view_as(slots)
        visible = ((slots >= 0) & (slots < self.buf.n) & real)[:, :, None, :]  # [B, H, 1, S]
        return grouped_attention(query, ks, vs, visible, scaling), None

    def _rows_aligned(self) -> bool:
        """Every row's first real slot is on a page boundary: its pages are storage pages (asked once per call)."""
        if self.aligned is None:
            self.aligned = bool((self.first % self.page == 0).all())
        return self.aligned

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
