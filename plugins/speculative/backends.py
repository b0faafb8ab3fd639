"""Where the speculative loop keeps a model's per-row KV: its own eager `RowCache`, or a fast-runtime session.

The loop and the drafters only ask one thing of a backend: `forward(batch, tokens, offset, last_only)` runs tokens
[B, q] at slots n[b] + offset + j of each row and returns their float32 logits. What was written beyond a row's
committed length is never seen and is overwritten later, so rolling back needs no call. Both backends use the
batch's slot layout (`decode.Batch`: one pad column, the left-padded prompt, then each row's tokens; a target's
session leaves the pad column out, so that its prompt is the one the model alone sees).

- `EagerRows` (rows.py): one eager transformers forward per call. Serves everything, including tree drafts and the
  hidden states Medusa reads.
- `SessionRows`: the target's `fast` runtime (`hf_accel.runtime`, contract point 4), or for a draft model a
  companion runtime with the same options. The session is started per row (`Runtime.start(per_row=True)`): each
  row has its own next slot, and `rewind` takes one count per row, so the batch needs no shared length. Each forward
  of Q tokens is one CUDA graph per Q on the GPU (the decode step is compiled), so small models stop paying kernel
  launches per layer. The backend remembers where it left every row (`next`, host ints, exact like the batch's
  `n_host`) and rewinds the session to the slots the loop asks for: a few device ops, no host sync. Medusa's draft
  trees run there too: the nodes at the row's next slots with positions by depth and an ancestor mask (`Session.forward(tree=...)`, one
  graph per tree, returning the last hidden states the heads read), then `Session.move` copies the accepted path's
  K/V to contiguous slots (one graph per path length); KV layers that cannot move slots send the call to the eager
  cache.
"""

from __future__ import annotations

import torch

from hf_accel.runtime import Unsupported, get_runtime

from .rows import RowCache, num_layers, row_forward


class EagerRows:
    """A `RowCache` and eager forwards; the first `cached` slots of every row are written at once."""

    def __init__(self, model, batch, cached: int):
        self.model = model
        self.cache = RowCache(num_layers(model), batch.seq.shape[1])
        if cached > 0:
            start = torch.zeros_like(batch.n)
            row_forward(model, self.cache, batch.seq[:, :cached], start, batch.real, batch.n_pads, cached,
                        last_only=True)

    def forward(self, batch, tokens, offset: int, last_only: bool = False, *, tree=None, hidden: bool = False):
        q = tokens.shape[1]
        return row_forward(self.model, self.cache, tokens, batch.n + offset, batch.real, batch.n_pads,
                           batch.n_max + offset + q, last_only, tree=tree, hidden=hidden)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.cache.move(src, dst)


class SessionRows:
    """A per-row runtime session over the batch's slots. The prompt (with the batch's pad column) is prefilled
    whole; slots the loop feeds again get identical K/V. `trees=True`: the loop will verify draft trees and read
    hidden states (Medusa), which needs KV layers whose slots the session can move (else Unsupported at once)."""

    def __init__(self, runtime, batch, trees: bool = False, skip: int = 0):
        t, capacity = batch.prompt_len, batch.seq.shape[1]
        self.runtime = runtime
        # `skip`: leading batch columns the session does not hold (session slot = batch slot - skip). The target
        # skips the batch's extra pad column, which only the drafter needs: a KV plugin's layers then see the
        # prompt the plugin alone sees (same padded length T: sink/snapkv decide whether to compress by T > budget +
        # slack, kvquant schedules its flushes and takes its channel scale from slot 0 on).
        self.skip = skip
        self.session, prompt_logits = runtime.start(batch.seq[:, skip:t], batch.real[:, skip:t].long(), capacity - t,
                                                    per_row=True)
        if trees:
            self.session.check_trees()
        self.rows = batch.seq.shape[0]
        self.full = self.rows == self.session.batch  # no bucket-filler rows: outputs need no slicing
        self.next = list(batch.n_host)  # slot where the session places each row's next token, on the host
        self.prompt_logits = prompt_logits[:, None]  # [B, 1, V]: the prefill's, for the first verify (forward)

    def forward(self, batch, tokens, offset: int, last_only: bool = False, *, tree=None, hidden: bool = False):
        """`tree` (decode.Tree): the tokens are its nodes (`Session.forward(tree=...)`); `hidden=True` also returns
        the last hidden states [B, q, H]: (logits, hidden)."""
        prompt_logits, self.prompt_logits = self.prompt_logits, None
        if prompt_logits is not None and offset == -1 and tree is None and not hidden:
            # The first verify re-feeds the prompt's last token. Its logits and K/V are taken from the prefill, which
            # saw the whole prompt: a KV plugin that compresses at the prefill (snapkv, kvquant) would give a
            # re-fed token other ones than the plugin alone computes. The drafts go one slot left, and a filler
            # token after them keeps Q (and so the captured graph) the same as every later round's; it lands
            # beyond the committed length like a rejected draft.
            if tokens.shape[1] == 1:
                return prompt_logits
            shifted = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)
            logits = torch.cat([prompt_logits, self.forward(batch, shifted, 0)[:, :-1]], 1)
            return logits[:, -1:] if last_only else logits
        self._seek(batch, offset)
        try:
            if tree is None and not hidden:
                logits = self._forward_pieces(batch, tokens, offset)
            else:
                logits, states = self.session.forward(tokens, tree=None if tree is None else tree.parents,
                                                      hidden=True)
                logits, states = self._mine(logits), self._mine(states)
        except Unsupported as e:  # a failed capture (new Q): later calls go eager at once; this one is rerun
            if e.whole_model:
                self.runtime.disabled = str(e)
            raise
        self.next = [n + offset + tokens.shape[1] for n in batch.n_host]
        if last_only:
            logits, states = logits[:, -1:], (states[:, -1:] if hidden else None)
        return (logits, states) if hidden else logits

    def _forward_pieces(self, batch, tokens, offset: int) -> torch.Tensor:
        """Logits [rows, q, V] of `tokens` at the session's next slots: one `Session.forward`, or one per piece where
        a KV layer says a forward must be split (`forward_cuts(first_slot, q)`: kvquant's flush boundaries, after
        which `KVLayer` reads more tokens quantized than one forward's shared boundary would)."""
        q = tokens.shape[1]
        cutters = [layer.forward_cuts for layer in self.session.cache.layers[:1] if hasattr(layer, "forward_cuts")]
        if not cutters or q == 1:
            return self._mine(self.session.forward(tokens))
        firsts = [n + offset for n in batch.n_host]  # the session slot of each row's first token
        cuts = sorted({i for first in firsts for cut in cutters for i in cut(first - self.skip, q)})
        if not cuts:
            return self._mine(self.session.forward(tokens))
        bounds = [0, *cuts, q]
        return torch.cat([self.session.forward(tokens[:, a:b])[: self.rows].clone()
                          for a, b in zip(bounds, bounds[1:])], 1)

    def chain(self, batch, tokens, offset: int, k: int) -> torch.Tensor:
        """Greedy drafts [B, k]: `tokens` at slots n[b] + offset + j, then k - 1 steps on the previous argmax, in one
        call (`Session.chain`: one CUDA graph on the GPU)."""
        self.prompt_logits = None
        self._seek(batch, offset)
        try:
            # a session buffer, not a copy: the loop is done with a round's drafts before the next call
            drafts = self._mine(self.session.chain(tokens, k))
        except Unsupported as e:  # as in `forward`
            if e.whole_model:
                self.runtime.disabled = str(e)
            raise
        self.next = [n + offset + tokens.shape[1] + k - 1 for n in batch.n_host]
        return drafts

    def _seek(self, batch, offset: int) -> None:
        """Rewind the session to each row's slot n + offset: host arithmetic, then one int for all rows (two device
        ops, none when no row moves) or, when rows accepted different counts, one count per row."""
        back = [nxt - n - offset for nxt, n in zip(self.next, batch.n_host)]  # never negative: the loop only asks
        if len(set(back)) > 1:  # for slots it wrote or the next one
            self.session.rewind(torch.tensor(back, device=batch.seq.device))
        elif back[0]:
            self.session.rewind(back[0])

    def _mine(self, out: torch.Tensor) -> torch.Tensor:
        """The batch's rows of a session output (the bucket may hold filler rows after them)."""
        return out if self.full else out[: self.rows]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Each row's K/V at slots `src` [B, m] to `dst` (a verified tree's accepted path, `Session.move`)."""
        self.session.move(src - self.skip, dst - self.skip)


def opener(target, warn, target_kv_plugin: bool = False):
    """`open_rows(model, batch, cached, eager_reason=None, trees=False) -> backend` for one call: a runtime session
    when the target has the `fast` runtime and it can serve (else, with a warning through `warn`, the eager cache),
    the eager cache otherwise. `eager_reason` says why the loop needs the eager cache anyway; `trees` that it
    verifies draft trees and reads hidden states (Medusa: the session must be able to move K/V slots).

    `target_kv_plugin`: the target's KV lives in a KV plugin's layers, which only a runtime session keeps; the eager
    cache would silently decode with full K/V instead, so where the target would need it `Unsupported` is raised
    (the call then runs without speculative decoding, on the plugin's own path)."""
    runtime = get_runtime(target)

    def open_rows(model, batch, cached: int, eager_reason: str | None = None, trees: bool = False):
        if runtime is not None:
            reason = eager_reason
            if reason is None:
                rt = runtime if model is target else runtime.companion(model)
                try:
                    # the target never re-feeds a slot before the prompt's last one: it skips the pad column
                    return SessionRows(rt, batch, trees, skip=1 if model is target else 0)
                except Unsupported as e:
                    reason = str(e)
                    if e.whole_model:  # e.g. a model that bypasses the cache: the runtime stops trying it
                        rt.disabled = reason
            if model is target and target_kv_plugin:
                raise Unsupported(reason, whole_model=False)
            warn(reason)
        return EagerRows(model, batch, cached)

    return open_rows
