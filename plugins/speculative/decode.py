"""The speculative decoding loop: draft k tokens per row, verify them in one target forward, keep what the target
would have produced. Plain functions and three small drafters, in the spirit of gpt-fast's `speculative_decode`;
Medusa's drafter (medusa.py) proposes a tree of candidates instead of a chain and runs through the same loop.

Lossless by construction:
- greedy: a draft is kept while it equals the target's argmax; the first mismatch is replaced by the argmax, and a
  row that keeps all k drafts gets the target's next token as a bonus. The output is the target's greedy output.
- sampling: exact rejection sampling (Leviathan et al. 2023, Chen et al. 2023): keep draft x with probability
  min(1, p(x)/q(x)); at the first rejection sample from norm(max(0, p - q)); after k kept drafts sample the bonus
  from p. p and q are the target's and the drafter's distributions after the same warpers (temperature, top-k,
  top-p, ...); a draft-free drafter proposes deterministically, i.e. q is one-hot. The output follows p exactly.
- trees (`verify_tree`): candidates are deterministic (q one-hot, several candidates per node). At every node the
  target's own token is drawn (argmax, or a sample of the warped p given the node's ancestors) and the walk moves to
  the child holding that token; the first node without such a child yields the drawn token. This is recursive
  rejection sampling with one-hot proposals (accepting candidate c with probability p(c) and resampling from p with
  the rejected candidates removed is the same as drawing from p and checking), so each kept token and the final one
  are draws from the target's own conditional: greedy output is the target's, sampled output has its distribution.

Every row keeps its own committed length `n[b]` (see `rows.py`): rows accept different numbers of tokens, finish at
their own EOS or token budget, and their rejected drafts are masked and later overwritten. Models run their forwards
through a backend (`backends.py`): the eager per-row cache, or a fast-runtime session when `fast` is applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .backends import EagerRows


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class Batch:
    """The left-padded token layout shared by the target and the drafter (slot = index in `seq`).

    Each row's committed length is kept twice: `n` on the device (for per-row gathers and masks) and `n_host` on the
    host (exact after every round's one sync), so that slicing, rewinding and shaping forwards need no device op.
    Slots at or beyond a row's length hold scratch (the last round's uncommitted tokens); `output` pads them."""

    seq: torch.Tensor  # [B, capacity] committed tokens, then scratch
    real: torch.Tensor  # [B, capacity] False at left-pad slots
    n_pads: torch.Tensor  # [B]
    n_device: torch.Tensor  # [B] committed tokens per row (slots), prompt included; read it as `n`
    prompt_len: int
    n_host: list = field(default_factory=list)  # the same on the host
    n_stale: bool = False  # `n_device` lags `n_host` (batch 1: a loop on the fast runtime never reads it)
    _aranges: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_prompt(cls, input_ids, attention_mask, pad_id: int, capacity: int) -> "Batch":
        b, t = input_ids.shape
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # One extra pad column in front: every row then has two slots before its first new token, so the drafter can
        # always re-feed the row's last two committed tokens (see ModelDrafter).
        seq = torch.full((b, capacity), pad_id, dtype=input_ids.dtype, device=dev)
        seq[:, 1: t + 1] = input_ids
        real = torch.ones(b, capacity, dtype=torch.bool, device=dev)
        real[:, 0] = False
        real[:, 1: t + 1] = attention_mask.bool()
        n_pads = (~real[:, : t + 1]).sum(1)
        return cls(seq, real, n_pads, torch.full((b,), t + 1, device=dev), t + 1, [t + 1] * b)

    @property
    def n(self) -> torch.Tensor:
        """[B] committed tokens per row on the device, brought up to date on first use after `advance`."""
        if self.n_stale:
            self.n_stale = False
            if len(self.n_host) == 1:
                self.n_device.fill_(self.n_host[0])
            else:
                self.n_device.copy_(torch.tensor(self.n_host))
        return self.n_device

    @property
    def n_max(self) -> int:
        return max(self.n_host)

    def _arange(self, start: int, end: int) -> torch.Tensor:
        """torch.arange(start, end) on the batch's device, made once per call (one op less per use)."""
        key = (start, end)
        if key not in self._aranges:
            self._aranges[key] = torch.arange(start, end, device=self.seq.device)
        return self._aranges[key]

    def last_tokens(self, count: int) -> torch.Tensor:
        """The last `count` committed tokens of every row, [B, count] (batch 1: a view of `seq`)."""
        if len(self.n_host) == 1:
            n = self.n_host[0]
            return self.seq[:, n - count: n]
        return self.seq.gather(1, self.n[:, None] + self._arange(-count, 0))

    def write(self, new: torch.Tensor) -> None:
        """Put `new` [B, m] at each row's next m slots (scratch until `advance` commits some of them)."""
        if len(self.n_host) == 1:
            n = self.n_host[0]
            self.seq[:, n: n + new.shape[1]] = new
        else:
            self.seq.scatter_(1, self.n[:, None] + self._arange(0, new.shape[1]), new)

    def advance(self, counts: list[int]) -> None:
        """Commit the first counts[b] tokens that `write` put after each row."""
        self.n_host = [n + c for n, c in zip(self.n_host, counts)]
        self.n_stale = True

    def output(self, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        """[B, T + L] like `generate()`: the prompt, then each row's generated tokens padded to the longest."""
        new = self.seq[:, self.prompt_len: self.n_max]
        new = new.masked_fill(self._arange(self.prompt_len, self.n_max) >= self.n[:, None], pad_id)
        return torch.cat([input_ids, new], 1)


@dataclass
class Sampler:
    """Greedy, or sampling after position-independent warpers (transformers' own objects, applied to p and q alike)."""

    greedy: bool
    warpers: list = field(default_factory=list)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        shape = logits.shape
        scores = logits.reshape(-1, shape[-1])
        for warper in self.warpers:
            scores = warper(None, scores)
        return torch.softmax(scores, dim=-1).reshape(shape)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row from logits [B, V]: (tokens [B], probs [B, V] or None when greedy)."""
        if self.greedy:
            return logits.argmax(-1), None
        p = self.probs(logits)
        return torch.multinomial(p, 1)[:, 0], p


class Proposal(NamedTuple):
    """A drafter's output for one round."""

    drafts: torch.Tensor  # [B, m] drafted tokens (a chain, or the non-root nodes of `tree` in node order)
    probs: torch.Tensor | None = None  # [B, m, V] q of sampled chain drafts; None when drafts are deterministic
    tree: "Tree | None" = None  # None: the drafts are a chain


@dataclass
class Tree:
    """The shape of branching drafts. Node 0 is the row's last committed token (the root), nodes 1..m the drafts;
    every parent comes before its children. The same tree serves every row (each row has its own tokens in it)."""

    parent: torch.Tensor  # [N] parent node (-1 at the root)
    depth: torch.Tensor  # [N] root depth 0
    visible: torch.Tensor  # [N, N] bool: node j is an ancestor of node i, or i itself
    levels: list  # levels[d - 1]: LongTensor of the nodes at depth d, d = 1 .. max_depth
    parents: tuple = ()  # `parent` on the host (the runtime session keys its tree graphs by it)

    @classmethod
    def from_parents(cls, parent: list[int], device=None) -> "Tree":
        n = len(parent)
        if parent[0] != -1 or any(not 0 <= parent[i] < i for i in range(1, n)):
            raise ValueError(f"a draft tree needs parent[0] == -1 and 0 <= parent[i] < i; got {parent}")
        depth = [0] * n
        visible = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            depth[i] = depth[parent[i]] + 1
            visible[i] = visible[parent[i]]
            visible[i, i] = True
        levels = [torch.tensor([i for i in range(n) if depth[i] == d]) for d in range(1, max(depth) + 1)]
        return cls(torch.tensor(parent), torch.tensor(depth), visible, levels, tuple(parent)).to(device or "cpu")

    @property
    def max_depth(self) -> int:
        return len(self.levels)

    def to(self, device) -> "Tree":
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            return [move(x) for x in v] if isinstance(v, list) else v

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


# ---------------------------------------------------------------------------------------------------- verify
def verify(sampler: Sampler, logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None):
    """Target logits [B, k+1, V] for the drafts [B, k] -> (accepted [B] in 0..k, new [B, k+1]): each row's tokens
    are new[b, :accepted[b] + 1], the kept drafts then the target's own token (beyond: anything).

    `draft_probs` [B, k, V] is q (None for deterministic drafts, q one-hot)."""
    b, k = drafts.shape
    if sampler.greedy:
        # The kept drafts equal the target's argmax, so the row's tokens are the argmax itself. accepted is None:
        # the loop counts the matches on the host (`greedy_accepted`) after the round's sync, four device ops less.
        return None, logits.argmax(-1)
    rows = torch.arange(b, device=drafts.device)
    p = sampler.probs(logits)  # [B, k+1, V]
    p_draft = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_draft = torch.ones_like(p_draft) if draft_probs is None else draft_probs.gather(-1, drafts[..., None])[..., 0]
    keep = torch.rand_like(p_draft) * q_draft < p_draft  # u < p/q, i.e. probability min(1, p/q)
    accepted = keep.long().cumprod(1).sum(1)
    p_next = p[rows, accepted]  # [B, V]: p at the first rejected position, or the bonus position after k kept
    at = accepted.clamp(max=k - 1)
    if draft_probs is None:
        q_at = torch.nn.functional.one_hot(drafts[rows, at], p.shape[-1]).to(p.dtype)
    else:
        q_at = draft_probs[rows, at]
    residual = (p_next - q_at).clamp_min(0)
    residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-30)
    p_next = torch.where((accepted < k)[:, None], residual, p_next)  # computed for every row: no host sync
    return accepted, with_token(drafts, accepted, torch.multinomial(p_next, 1)[:, 0])


def greedy_accepted(drafts: list[int], target: list[int]) -> int:
    """Greedy verification of one row on the host: how many leading drafts equal the target's argmax."""
    return next((i for i, (d, t) in enumerate(zip(drafts, target)) if d != t), len(drafts))


def with_token(kept: torch.Tensor, accepted: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """[B, m+1]: the kept tokens [B, m] with `token` [B] at each row's index `accepted` [B]."""
    new = torch.cat([kept, token[:, None]], 1)
    new[torch.arange(new.shape[0], device=new.device), accepted] = token
    return new


def verify_tree(sampler: Sampler, logits: torch.Tensor, nodes: torch.Tensor, tree: Tree):
    """Target logits [B, N, V] at the nodes [B, N] of `tree` -> (path [B, D+1], accepted [B], next token [B]).

    Every node draws the target's token (argmax, or one sample of the warped p given the node's ancestors); see
    `accept_path`. The candidates are deterministic, so this is lossless (see the top of this file)."""
    b, n, v = logits.shape
    if sampler.greedy:
        draws = logits.argmax(-1)  # [B, N]
    else:
        draws = torch.multinomial(sampler.probs(logits).reshape(b * n, v), 1).reshape(b, n)
    return accept_path(draws, nodes, tree)


def accept_path(draws: torch.Tensor, nodes: torch.Tensor, tree: Tree):
    """The target's draws [B, N] at every node -> (path [B, D+1], accepted [B], next token [B]).

    A node is accepted when its token is its parent's draw and its parent is accepted (the root always is); each row
    keeps its deepest accepted node and the path to it. path[b, d] is the node at depth d of that path for
    d <= accepted[b] (node 0 first; filler beyond); the next token is the draw at the path's end."""
    b = draws.shape[0]
    ok = nodes == draws[:, tree.parent.clamp_min(0)]
    ok[:, 0] = True
    ok = ~(tree.visible & ~ok[:, None, :]).any(-1)  # every node on the way from the root matches (few kernels)
    accepted = torch.where(ok, tree.depth, -1).max(1).values  # depth of the deepest accepted node
    deepest = ok & (tree.depth == accepted[:, None])
    last = deepest.long().argmax(1)  # the first one if siblings hold equal tokens
    on_path = tree.visible[last]  # [B, N]: its ancestors and itself
    d = torch.arange(tree.max_depth + 1, device=draws.device)
    path = (on_path[:, None, :] & (tree.depth == d[:, None])).long().argmax(-1)  # [B, D+1]
    return path, accepted, draws[torch.arange(b, device=draws.device), last]


# ---------------------------------------------------------------------------------------------------- drafters
# A drafter has `propose(batch, k) -> Proposal` and `observe(fed, logits, hidden, last)`, called after each verify
# forward with the fed tokens [B, m+1], the target's logits [B, m+1, V], its last hidden states [B, m+1, H] (None
# unless the drafter sets `wants_hidden = True`) and, per row, the index in `fed` of the last accepted node [B]
# (None for a greedy chain: its count is known on the host only, after the round's sync).
class ModelDrafter:
    """A smaller model (or the int8 self-copy) drafts autoregressively on its own per-row KV (`open_rows`: the eager
    cache, or a runtime session when the target runs on the fast runtime; see backends.py).

    Invariant: at the start of a round the draft KV holds every committed slot of a row except the last one or two.
    Each round re-feeds the last two committed tokens (rewriting one slot with identical K/V when it was already
    there), which keeps the batch rectangular although rows accepted different numbers of drafts last round."""

    def __init__(self, model, batch: Batch, sampler: Sampler, open_rows=None):
        self.sampler = sampler
        # every prompt slot but the last two, which the first round feeds
        self.rows = (open_rows or EagerRows)(model, batch, batch.prompt_len - 2)

    def propose(self, batch: Batch, k: int):
        tokens, offset = batch.last_tokens(2), -2
        if self.sampler.greedy and hasattr(self.rows, "chain"):  # a runtime session drafts all k in one graph
            return Proposal(self.rows.chain(batch, tokens, offset, k))
        drafts, probs = [], []
        for _ in range(k):
            logits = self.rows.forward(batch, tokens, offset, last_only=True)[:, -1]
            token, p = self.sampler.pick(logits)
            drafts.append(token)
            probs.append(p)
            offset += tokens.shape[1]
            tokens = token[:, None]
        return Proposal(torch.stack(drafts, 1), None if self.sampler.greedy else torch.stack(probs, 1))

    def observe(self, fed, logits, hidden, last) -> None:
        pass


class LookupDrafter:
    """Prompt lookup (n-gram copy): find the latest earlier occurrence of the row's last n tokens (n from ngram_max
    down to ngram_min) in its prompt and output, and propose the k tokens that followed it."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def propose(self, batch: Batch, k: int):
        seq = batch.seq.cpu()  # one small copy per round; the search is cheap host work
        drafts = [self._lookup(seq[b, p:n], k) for b, (n, p) in enumerate(zip(batch.n_host, batch.n_pads.tolist()))]
        return Proposal(torch.stack(drafts).to(batch.seq.device))

    def _lookup(self, row: torch.Tensor, k: int) -> torch.Tensor:
        length = row.shape[0]
        for size in range(min(self.ngram_max, length - 1), self.ngram_min - 1, -1):
            windows = row.unfold(0, size, 1)[:-1]  # every earlier n-gram (not the suffix itself)
            hits = (windows == row[-size:]).all(1).nonzero()
            if len(hits):
                start = int(hits[-1]) + size
                follow = row[start: start + k]
                if len(follow):
                    return torch.cat([follow, follow[-1:].expand(k - len(follow))])
        return row[-1:].expand(k).clone()  # no match: any guess costs the same, the verify step is batched

    def observe(self, fed, logits, hidden, last) -> None:
        pass


class RecycleDrafter:
    """Token Recycling (Luo et al. 2024), chain form: an adjacency table keeps, for every token id, the token the
    target ranked first after it the last time it was verified (candidates from the verify step, otherwise thrown
    away); drafts follow the table from the row's last token. The table lives on the plugin, so it stays warm across
    calls. (The paper keeps top-8 successors and verifies a BFS tree; tree verification is not implemented.)"""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [V] successor of each token id

    def propose(self, batch: Batch, k: int):
        token, drafts = batch.last_tokens(1)[:, 0], []
        for _ in range(k):
            token = self.table[token]
            drafts.append(token)
        return Proposal(torch.stack(drafts, 1))

    def observe(self, fed, logits, hidden, last) -> None:
        self.table[fed.reshape(-1)] = logits.argmax(-1).reshape(-1).to(self.table.dtype)


# ---------------------------------------------------------------------------------------------------- draft length
def best_draft_length(alpha: float, k_max: int, draft_cost: float) -> int:
    """k maximising expected tokens per unit time: (1 - a^(k+1)) / (1 - a) tokens for 1 + c*k target-step costs,
    with a the per-token acceptance rate and c the cost of one draft step relative to one verify step."""
    a = min(max(alpha, 0.0), 0.99)
    return max(range(1, k_max + 1), key=lambda k: (1 - a ** (k + 1)) / ((1 - a) * (1 + draft_cost * k)))


@dataclass
class DraftLength:
    """Fixed k, or (adaptive) an acceptance-driven controller: an EMA of the per-token acceptance rate, measured as
    accepted / (accepted + rejections) over the active rows of each round, sets k through `best_draft_length`."""

    k: int
    adaptive: bool = False
    draft_cost: float = 0.0
    k_max: int = 0
    alpha: float = 0.6
    momentum: float = 0.5

    def __post_init__(self):
        self.k_max = self.k_max or self.k
        if self.adaptive:
            self.k = best_draft_length(self.alpha, self.k_max, self.draft_cost)

    def update(self, accepted: list[int], k: int) -> None:
        """`accepted`: drafts kept by each active row this round, out of `k`."""
        if not self.adaptive or not accepted:
            return
        kept = sum(accepted)
        rejections = sum(a < k for a in accepted)
        rate = kept / max(kept + rejections, 1)
        self.alpha = self.momentum * self.alpha + (1 - self.momentum) * rate
        self.k = best_draft_length(self.alpha, self.k_max, self.draft_cost)


# ---------------------------------------------------------------------------------------------------- the loop
def commit(accepted: int, new: list[int], eos: set[int], budget: int) -> tuple[int, int]:
    """Host side of one row's round: of its tokens `new` (accepted + 1 are valid) it keeps up to the first EOS and
    at most `budget`. Returns (tokens kept, budget left: 0 once an EOS is kept or the budget is spent)."""
    count = accepted + 1
    stop = next((j + 1 for j, token in enumerate(new[:count]) if token in eos), None)
    if stop is not None:
        count = stop
    count = min(count, budget)
    return count, 0 if stop is not None else budget - count


@torch.no_grad()
def speculative_generate(target, drafter_factory, input_ids, attention_mask, *, max_new_tokens: int,
                         sampler: Sampler, eos_ids: torch.Tensor | None, pad_id: int, length: DraftLength,
                         stats: dict, streamer=None, open_rows=None) -> torch.Tensor:
    """Generate up to `max_new_tokens` per row; returns [B, T + L] ids like `generate()` (rows that stop early are
    padded with `pad_id`). `drafter_factory(batch, sampler, open_rows)` builds the drafter once the batch layout
    exists. `length.k_max` bounds the drafts of one round (for a tree drafter: its number of non-root nodes).
    `open_rows(model, batch, cached, eager_reason=None, trees=False)` gives a model its per-row KV (backends.py);
    default: the eager `RowCache`.

    A round's eager work runs between two forwards (on the fast runtime: two CUDA-graph replays) and is launch-bound,
    so it is kept to few device ops: the row's tokens go to the slots after it before anything is known about them
    (`Batch.write`), and one host sync brings back the accepted counts and tokens; EOS, budget, lengths and the
    backends' slots are then host arithmetic."""
    b, t = input_ids.shape
    dev = input_ids.device
    capacity = t + 1 + max_new_tokens + length.k_max + 1  # a row's last write ends at slot capacity - 2
    batch = Batch.from_prompt(input_ids, attention_mask, pad_id, capacity)
    open_rows = open_rows or (lambda model, batch, cached, eager_reason=None, trees=False:
                              EagerRows(model, batch, cached))
    drafter = drafter_factory(batch, sampler, open_rows)
    wants_hidden = getattr(drafter, "wants_hidden", False)
    trees = wants_hidden or getattr(drafter, "trees", False)  # a runtime session must be able to move K/V slots
    # all but the last prompt token, which the first round feeds
    rows_kv = open_rows(target, batch, batch.prompt_len - 1, trees=True) if trees else \
        open_rows(target, batch, batch.prompt_len - 1)
    stats["runtime"] = hasattr(rows_kv, "session")  # the target verifies on the fast runtime (backends.py)
    eos = set() if eos_ids is None else set(eos_ids.reshape(-1).tolist())
    budget_h = [max_new_tokens] * b  # tokens each row may still add; 0 once done
    totals = dict(rounds=0, row_rounds=0, drafted=0, accepted=0, generated=0)
    k_used: list[int] = []
    while max(budget_h) > 0:
        k = length.k
        drafts, draft_probs, tree = drafter.propose(batch, k)
        fed = torch.cat([batch.last_tokens(1), drafts], 1)  # [B, m+1] at slots n-1 .. n+m-1
        extra = {"tree": tree, "hidden": wants_hidden} if trees else {}
        logits = rows_kv.forward(batch, fed, -1, **extra)
        logits, hidden = logits if wants_hidden else (logits, None)
        if tree is None:
            accepted, new = verify(sampler, logits, drafts, draft_probs)  # greedy: accepted None (host count)
            depth, last = drafts.shape[1], accepted
        else:
            path, accepted, next_token = verify_tree(sampler, logits, fed, tree)
            depth, last = tree.max_depth, path[torch.arange(b, device=dev), accepted]
            # roll back per row: the accepted path's K/V moves to contiguous slots n-1 .. n-1+accepted; the other
            # nodes stay beyond the committed length, where nothing sees them and the next round overwrites them
            j = batch._arange(0, depth + 1)
            rows_kv.move(batch.n[:, None] - 1 + path, batch.n[:, None] - 1 + j)
            new = with_token(fed.gather(1, path[:, 1:]), accepted, next_token)
        drafter.observe(fed, logits, hidden, last)
        batch.write(new)  # [B, depth+1] after each row: scratch until `advance` commits its first counts
        # the round's one host sync: the accepted counts (greedy chains: the fed drafts) and the row's tokens
        head = fed if accepted is None else accepted[:, None]
        rounds = torch.cat([head, new], 1).tolist()
        cut = head.shape[1]
        new_h = [r[cut:] for r in rounds]
        acc_h = [greedy_accepted(r[1:cut], r[cut:]) for r in rounds] if accepted is None else [r[0] for r in rounds]
        active_h = [left > 0 for left in budget_h]
        count_h, budget_h = map(list, zip(*(commit(a, r, eos, left) for a, r, left in zip(acc_h, new_h, budget_h))))
        if streamer is not None and count_h[0]:
            streamer.put(torch.tensor(new_h[0][: count_h[0]]))
        batch.advance(count_h)
        live = [a for a, on in zip(acc_h, active_h) if on]
        totals["rounds"] += 1
        totals["row_rounds"] += len(live)
        totals["drafted"] += depth * len(live)  # the most a row could keep (a tree: its depth)
        totals["accepted"] += sum(live)
        totals["generated"] += sum(count_h)
        k_used.append(depth)
        length.update(live, k)

    stats.update(totals, draft_lengths=k_used, mean_accepted=totals["accepted"] / max(totals["row_rounds"], 1),
                 tokens_per_verify=totals["generated"] / max(totals["row_rounds"], 1),
                 acceptance_rate=totals["accepted"] / max(totals["drafted"], 1))
    if streamer is not None:
        streamer.end()
    return batch.output(input_ids, pad_id)
