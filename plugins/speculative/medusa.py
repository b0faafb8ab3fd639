"""Medusa heads (Medusa-1) with static-tree verification: `accel="medusa(heads=PATH_OR_REPO)"`.

    heads = train_medusa(model, tokenizer, heads=3, steps=200)       # base frozen, reference corpus
    save_heads(heads, "out/medusa", base_model="my/base")           # safetensors + medusa_config.json + README.md
    push_heads("out/medusa", "me/base-medusa")                       # the core's hub helper
    model = AutoModelForCausalLM.from_pretrained(id, accel="medusa(heads='out/medusa')")

Head k (0-based) is one residual block `h + SiLU(W_k h)` followed by the base's frozen lm_head; on the last hidden
state at position i it predicts token i+2+k (the lm_head itself predicts i+1). Medusa is a tree drafter of the
shared speculative loop (decode.py: per-row slots, verification, EOS and budgets, stats). Each round, per row:
1. the root is the row's last committed token (drawn by the target last round, not yet in the KV cache); the heads,
   read at the hidden state of the token before it, give the tree's nodes by their top-k ranks (a static tree: a list
   of paths of ranks, Medusa's sparse default or `tree='3,2,1'`, a full tree of those widths per depth);
2. ONE target forward runs root + nodes at the row's own slots with a tree mask (the row's cached tokens, the
   node's ancestors and itself) and positions by depth (rows.py);
3. `verify_tree` draws the target's token at every node (argmax, or a sample of the warped distribution) and keeps
   the longest path whose tokens are their parent's draws, plus the draw at its end; the K/V of the accepted path
   moves to contiguous slots, the rest rolls back.
Greedy output is token-identical to the target alone; sampled output has the target's distribution (candidates are
deterministic top-k tokens, so drawing from p at each node and following a matching child is exact rejection
sampling). Any batch size, left-padded rows of different lengths, each accepting its own path. The first round of a
call has no hidden state yet: its candidates are placeholders (the same tree; usually only the root's draw is kept).
With `fast` applied too (`accel="fast+medusa(heads=...)"`), steps 2-3 run on the fast runtime's per-row session
(`Session.forward(tree=...)` returns the hidden states the heads read; `Session.move` compacts the accepted path):
on the GPU one CUDA graph per tree and one per path length (backends.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hf_accel.errors import ArtifactError, OptionError, UnsupportedModelError
from hf_accel.plugin import Family, Plugin

from .decode import DraftLength, Proposal, Tree
from .generate import install

__all__ = ["Medusa", "MedusaHeads", "build_tree", "load_heads", "push_heads", "save_heads", "train_medusa"]

CONFIG_NAME = "medusa_config.json"
WEIGHTS_NAME = "medusa_heads.safetensors"
# A sparse tree in the style of Medusa's defaults (paths of top-k ranks per depth), truncated to the heads present.
DEFAULT_TREE = ((0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (0, 0, 0), (0, 0, 1),
                (0, 1, 0), (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0, 0))


# ------------------------------------------------------------------------------------------------------- heads
class MedusaHeads(nn.Module):
    """K residual blocks; logits come from the base's own (frozen) lm_head, passed in at call time."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for block in self.blocks:  # start as the identity: every head begins as a copy of the lm_head's guess
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., H] -> logits [K, ..., V]."""
        return torch.stack([lm_head(hidden + nn.functional.silu(block(hidden))) for block in self.blocks])


def _hidden_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.hidden_size


def _last_hidden(model, **kwargs) -> torch.Tensor:
    return model.get_decoder()(**kwargs).last_hidden_state


def train_medusa(model, tokenizer=None, *, heads: int = 3, steps: int = 200, seq_len: int = 128, batch: int = 8,
                 lr: float = 1e-3, stream: torch.Tensor | None = None, progress: bool = False, seed: int = 0,
                 max_seconds: float | None = None):
    """Train `heads` Medusa heads with the base frozen on the reference corpus (`token_stream(tokenizer, 'train')`).

    Returns (MedusaHeads, losses per step). Loss: mean cross-entropy of head k at position i against token i+2+k.
    `max_seconds`: stop after the step that passes this much training time (fewer than `steps` steps; the number
    done is len(losses)).
    """
    if heads < 1:
        raise OptionError(f"train_medusa: heads must be >= 1, got {heads}")
    if stream is None:
        from hf_accel.quality.corpus import token_stream

        stream = token_stream(tokenizer, "train", max_tokens=max(steps * batch * seq_len, 4 * seq_len))
    if stream.numel() < seq_len + heads + 2:
        raise OptionError(f"train_medusa: the token stream has {stream.numel()} tokens; need > {seq_len + heads + 2}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    medusa = MedusaHeads(_hidden_size(model), heads).to(device=device, dtype=torch.float32)
    lm_head = model.get_output_embeddings()
    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(medusa.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    width = seq_len + heads + 1
    losses = []
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="medusa heads")
    started = time.perf_counter()
    for _ in bar:
        if max_seconds is not None and losses and time.perf_counter() - started > max_seconds:
            break
        starts = torch.randint(0, stream.numel() - width, (batch,), generator=g)
        ids = torch.stack([stream[s: s + width] for s in starts.tolist()]).to(device)
        with torch.no_grad():
            hidden = _last_hidden(model, input_ids=ids[:, :seq_len], use_cache=False).to(torch.float32)
        loss = 0.0
        for k, block in enumerate(medusa.blocks):
            h = hidden + nn.functional.silu(block(hidden))
            logits = nn.functional.linear(h.to(dtype), lm_head.weight).float() if lm_head.bias is None else \
                lm_head(h.to(dtype)).float()
            target = ids[:, 2 + k: 2 + k + seq_len]
            loss = loss + nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss = loss / heads
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.train(was_training)
    for p, flag in flags:
        p.requires_grad_(flag)
    return medusa.eval(), losses


def save_heads(heads: MedusaHeads, directory, *, base_model: str | None = None, training: dict | None = None):
    """safetensors + medusa_config.json + README.md (huggingface_hub ModelCard)."""
    from huggingface_hub import ModelCard, ModelCardData
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, str(directory / WEIGHTS_NAME))
    config = {"format": "hf_accel.medusa", "version": 1, "hidden_size": heads.hidden_size,
              "num_heads": heads.num_heads, "block": "residual_silu_linear+base_lm_head", "base_model": base_model,
              "training": training or {}}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    data = ModelCardData(library_name="hf_accel", base_model=base_model, tags=["medusa", "speculative-decoding",
                                                                                  "hf_accel"])
    usage = f"accel=\"medusa(heads='{directory.name}')\""
    text = (f"---\n{data.to_yaml()}\n---\n\n# Medusa heads for {base_model or 'a causal LM'}\n\n"
            f"{heads.num_heads} Medusa-1 heads (one residual SiLU block each, then the base model's frozen lm_head), "
            f"trained with the base frozen by `scripts/train_medusa.py`.\n\n"
            f"Load with hf_accel: `AutoModelForCausalLM.from_pretrained(base, {usage})`.\n\n"
            f"Training: `{json.dumps(training or {})}`\n")
    ModelCard(text).save(directory / "README.md")
    return directory


def _resolve(path_or_repo: str) -> Path:
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_repo, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is an artifact the user named wrongly or cannot reach
        raise ArtifactError(f"medusa heads {path_or_repo!r}: not a local folder and not downloadable from the Hub "
                            f"({type(e).__name__}: {e}); expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}") from e


def load_heads(path_or_repo: str) -> tuple[MedusaHeads, dict]:
    from safetensors.torch import load_file

    folder = _resolve(path_or_repo)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise ArtifactError(f"medusa heads {path_or_repo!r}: missing {CONFIG_NAME} or {WEIGHTS_NAME} "
                            f"(write them with scripts/train_medusa.py or hf_accel...medusa.save_heads)")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("format") != "hf_accel.medusa":
        raise ArtifactError(f"medusa heads {path_or_repo!r}: {CONFIG_NAME} has format {config.get('format')!r}, "
                            "expected 'hf_accel.medusa'")
    heads = MedusaHeads(int(config["hidden_size"]), int(config["num_heads"]))
    heads.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return heads.eval(), config


def push_heads(folder, repo_id: str, **kwargs):
    """Upload a heads folder with the core's hub helper (`hf_accel.artifacts.push_folder`)."""
    from hf_accel.artifacts import push_folder

    return push_folder(folder, repo_id, commit_message=kwargs.pop("commit_message", "Upload Medusa heads"), **kwargs)


# -------------------------------------------------------------------------------------------------------- tree
def parse_tree(tree: str, num_heads: int) -> tuple[tuple[int, ...], ...]:
    """'default' (Medusa-style sparse tree) or comma-separated top-k widths per depth, e.g. '3,2,1'."""
    if tree == "default":
        paths = tuple(p for p in DEFAULT_TREE if len(p) <= num_heads)
    else:
        try:
            widths = [int(w) for w in str(tree).split(",")]
        except ValueError:
            widths = []
        if not widths or any(not 1 <= w <= 16 for w in widths) or len(widths) > num_heads:
            raise OptionError(f"plugin 'medusa': option 'tree' must be 'default' or comma-separated widths in "
                              f"[1, 16], at most one per head ({num_heads}), e.g. '3,2,1'; got {tree!r}")
        paths, level = [], [()]
        for w in widths:
            level = [p + (r,) for p in level for r in range(w)]
            paths.extend(level)
        paths = tuple(sorted(paths, key=lambda p: (len(p), p)))
        if len(paths) > 256:
            raise OptionError(f"plugin 'medusa': tree {tree!r} has {len(paths)} nodes; at most 256")
    return paths


@dataclass
class MedusaTree(Tree):
    """A static Medusa tree: node i+1 is `paths[i]`, the candidate of rank paths[i][-1] of head len(paths[i]) - 1."""

    paths: tuple = ()
    head: torch.Tensor | None = None  # [N-1] head index of each non-root node
    rank: torch.Tensor | None = None  # [N-1] top-k rank of each non-root node


def build_tree(paths, device="cpu") -> MedusaTree:
    """Paths sorted by length (parse_tree's order: every parent before its children)."""
    index = {(): 0}
    for i, p in enumerate(paths):
        index[tuple(p)] = i + 1
    parent = [-1] + [index[tuple(p[:-1])] for p in paths]
    base = Tree.from_parents(parent, device)
    return MedusaTree(base.parent, base.depth, base.visible, base.levels, base.parents, paths=tuple(paths),
                      head=torch.tensor([len(p) - 1 for p in paths], dtype=torch.long, device=device),
                      rank=torch.tensor([p[-1] for p in paths], dtype=torch.long, device=device))


# -------------------------------------------------------------------------------------------------------- drafter
def _compute_dtype(model):
    dtype = model.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else model.dtype


class MedusaDrafter:
    """Tree drafts from the heads, read at the hidden state of each row's last accepted node (see decode.py)."""

    wants_hidden = True
    trees = True  # both ask the target's backend for tree forwards and hidden states (backends.py)

    def __init__(self, heads: MedusaHeads, tree: MedusaTree, lm_head, dtype, device):
        self.heads, self.tree, self.lm_head, self.dtype = heads, tree, lm_head, dtype
        self.max_rank = int(tree.rank.max()) + 1
        self.hidden: torch.Tensor | None = None  # [B, H]

    def propose(self, batch, k: int) -> Proposal:
        if self.hidden is None:  # the call's first round: no hidden state yet. Placeholder candidates in the same
            # tree (any deterministic candidates are exact; token id = rank keeps siblings distinct, which sampling
            # needs): one tree shape per call, i.e. one graph and compile on the runtime, not a root-only one too
            return Proposal(self.tree.rank[None].expand(batch.seq.shape[0], -1).contiguous(), tree=self.tree)
        logits = self._head_logits(self.hidden.to(self.dtype))  # [K, B, V]
        top = logits.topk(self.max_rank, dim=-1).indices  # [K, B, R]
        nodes = top[self.tree.head, :, self.tree.rank]  # [N-1, B]
        return Proposal(nodes.T.contiguous(), tree=self.tree)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`heads(hidden, lm_head)` [K, B, V] in few kernels: the K blocks as one matmul, the lm_head once over all
        heads (a round's eager work, between two runtime graphs, is launch-bound)."""
        blocks = self.heads.blocks
        if type(self.lm_head) is not nn.Linear or self.lm_head.weight.dtype != blocks[0].weight.dtype:
            return self.heads(hidden, self.lm_head)
        if getattr(self, "_stacked", None) is None or self._stacked[0].device != hidden.device:
            self._stacked = (torch.cat([b.weight for b in blocks]), torch.cat([b.bias for b in blocks]))
        weight, bias = self._stacked
        k, (b, h) = len(blocks), hidden.shape
        inner = nn.functional.silu(nn.functional.linear(hidden, weight, bias)).view(b, k, h)
        return self.lm_head((hidden[:, None] + inner).transpose(0, 1))  # [K, B, V]

    def observe(self, fed, logits, hidden, last) -> None:
        self.hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# ------------------------------------------------------------------------------------------------------ plugin
@dataclass
class Medusa(Plugin):
    """Medusa-1 heads with static-tree verification (lossless: greedy and sampling, any batch size)."""

    name = "medusa"
    family = Family.SPECULATIVE
    conflicts_with = ("family:speculative",)

    heads: str = ""  # folder or Hub repo written by scripts/train_medusa.py
    tree: str = "default"  # 'default' (sparse) or widths per depth, e.g. '3,2,1'

    def __post_init__(self):
        if not self.heads:
            raise OptionError("plugin 'medusa' needs option 'heads': a folder or Hub repo of Medusa heads written by "
                              "scripts/train_medusa.py, e.g. medusa(heads='out/medusa')")
        if self.tree != "default":
            parse_tree(self.tree, 64)  # syntax only; the depth limit is checked against the heads in apply()

    def check(self, model):
        super().check(model)
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"plugin 'medusa' runs decoder-only models; {type(model).__name__} is an "
                                        "encoder-decoder model")

    def apply(self, model, patcher):
        heads, _ = load_heads(self.heads)
        if heads.hidden_size != _hidden_size(model):
            raise UnsupportedModelError(f"plugin 'medusa': heads {self.heads!r} were trained for hidden size "
                                        f"{heads.hidden_size}; this model has {_hidden_size(model)}")
        paths = parse_tree(self.tree, heads.num_heads)
        dtype = _compute_dtype(model)
        heads.to(device=next(model.parameters()).device, dtype=dtype)
        trees: dict = {}  # per device

        def make_drafter(batch, sampler, open_rows):
            device = batch.seq.device
            if heads.blocks[0].weight.device != device:  # the target moved after apply(); follow it
                heads.to(device)
            if device not in trees:
                trees[device] = build_tree(paths, device)
            return MedusaDrafter(heads, trees[device], model.get_output_embeddings(), dtype, device)

        install(model, patcher, self.name, make_drafter, DraftLength(len(paths)))  # k_max: drafts per round

    def card_metadata(self, model):
        return {"speculative": "medusa", "medusa_heads": self.heads, "medusa_tree": self.tree}
