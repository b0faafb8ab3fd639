"""Medusa heads (Medusa-1) with static-tree verification: `accel="medusa(heads=PATH_OR_REPO)"`.

    heads = train_medusa(model, tokenizer, heads=3, steps=200)       # base frozen, reference corpus
    save_heads(heads, "out/medusa", base_model="my/base")           # safetensors + medusa_config.json + README.md
    push_heads("out/medusa", "me/base-medusa")                       # the core's hub helper
    model = AutoModelForCausalLM.from_pretrained(id, accel="medusa(heads='out/medusa')")

Head k (0-based) is one residual block `h + SiLU(W_k h)` followed by the base's frozen lm_head; on the last hidden
state at position i it predicts token i+2+k (the lm_head itself predicts i+1). Each decode round:
1. the root is the target's greedy token (known, not yet in the KV cache); the heads' top-k give the tree nodes
   (a static tree: a list of paths of top-k ranks, Medusa's sparse default or `tree='3,2,1'`, a full tree of those
   widths per depth);
2. ONE target forward runs root + nodes with a 4-D additive mask (everything cached + the node's ancestors and
   itself) and position ids by depth;
3. the longest path whose tokens equal the target's greedy choice at their parent is accepted; the KV of the root
   and the accepted nodes is moved to contiguous slots and the cache cropped (the rest rolls back).
Greedy output is token-identical to the target alone. Batch size 1 only (batch > 1 raises OptionError); sampling
and other modes run transformers' own loop with a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hf_accel.errors import ArtifactError, OptionError, UnsupportedModelError
from hf_accel.plugin import Family, Plugin

from .generate import STATS_ATTR, wrap_generate

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
                 lr: float = 1e-3, stream: torch.Tensor | None = None, progress: bool = False, seed: int = 0):
    """Train `heads` Medusa heads with the base frozen on the reference corpus (`token_stream(tokenizer, 'train')`).

    Returns (MedusaHeads, losses per step). Loss: mean cross-entropy of head k at position i against token i+2+k.
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
    for _ in bar:
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
class Tree:
    paths: tuple  # node i+1 <-> paths[i]; node 0 is the root
    depth: torch.Tensor  # [N] root depth 0
    parent: torch.Tensor  # [N] parent node index (-1 for the root)
    head: torch.Tensor  # [N-1] head index of each non-root node
    rank: torch.Tensor  # [N-1] top-k rank of each non-root node
    visible: torch.Tensor  # [N, N] bool: node j is an ancestor of node i or i itself
    children: list  # children[i] = list of node indices


def build_tree(paths, device="cpu") -> Tree:
    index = {(): 0}
    for i, p in enumerate(paths):
        index[tuple(p)] = i + 1
    n = len(paths) + 1
    parent = [-1] + [index[tuple(p[:-1])] for p in paths]
    visible = torch.eye(n, dtype=torch.bool)
    children = [[] for _ in range(n)]
    for i in range(1, n):
        children[parent[i]].append(i)
        j = parent[i]
        while j >= 0:
            visible[i, j] = True
            j = parent[j]
    return Tree(tuple(paths), torch.tensor([0] + [len(p) for p in paths], device=device),
                torch.tensor(parent, device=device), torch.tensor([len(p) - 1 for p in paths], device=device),
                torch.tensor([p[-1] for p in paths], device=device), visible.to(device), children)


# -------------------------------------------------------------------------------------------------------- loop
def _mask(visible_tree: torch.Tensor, past: int, dtype, device) -> torch.Tensor:
    n = visible_tree.shape[0]
    visible = torch.cat([torch.ones(n, past, dtype=torch.bool, device=device), visible_tree], dim=1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def _compute_dtype(model):
    dtype = model.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else model.dtype


@torch.no_grad()
def medusa_generate(model, heads: MedusaHeads, tree: Tree, input_ids, max_new_tokens: int, eos_ids=None,
                    stats: dict | None = None, streamer=None) -> torch.Tensor:
    """Greedy Medusa decoding at batch size 1 (no padding); returns prompt + new tokens."""
    from transformers import DynamicCache

    from hf_accel.compat import cache_kwarg

    device = input_ids.device
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    dtype = _compute_dtype(model)
    if tree.depth.device != device:
        tree = build_tree(tree.paths, device)
    cache = DynamicCache(config=model.config)
    ck = cache_kwarg(model)
    t = input_ids.shape[1]
    hidden = decoder(input_ids=input_ids, **{ck: cache}, use_cache=True).last_hidden_state[:, -1]  # [1, H]
    root = lm_head(hidden).float().argmax(-1)  # [1]
    out = [int(root)]
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(root.cpu())
    eos = set() if eos_ids is None else {int(e) for e in eos_ids.flatten().tolist()}
    steps, accepted_total = 0, 0
    past = t
    while len(out) < max_new_tokens and out[-1] not in eos:
        head_logits = heads(hidden.to(dtype), lm_head)[:, 0].float()  # [K, V]
        maxrank = int(tree.rank.max()) + 1
        top = head_logits.topk(maxrank, dim=-1).indices  # [K, R]
        nodes = top[tree.head, tree.rank]  # [N-1]
        tokens = torch.cat([root, nodes])[None]  # [1, N]
        positions = (past + tree.depth)[None]
        mask = _mask(tree.visible, past, dtype, device)
        h = decoder(input_ids=tokens, attention_mask=mask, position_ids=positions, **{ck: cache},
                    use_cache=True).last_hidden_state[0]  # [N, H]
        greedy = lm_head(h).float().argmax(-1).tolist()  # [N]
        toks = tokens[0].tolist()
        path, node = [0], 0
        while True:
            nxt = next((c for c in tree.children[node] if toks[c] == greedy[node]), None)
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        # KV write-back: root + accepted nodes to contiguous slots past .. past+len(path)-1, drop the rest
        idx = torch.tensor(path, device=device) + past
        keep = past + len(path)
        for layer in cache.layers:
            for name in ("keys", "values"):
                buf = getattr(layer, name)
                setattr(layer, name, torch.cat([buf[:, :, :past], buf[:, :, idx]], dim=2))
        past = keep
        new = [toks[i] for i in path[1:]] + [greedy[node]]
        steps += 1
        accepted_total += len(path) - 1
        for tok in new:
            if len(out) >= max_new_tokens or out[-1] in eos:
                break
            out.append(tok)
            if streamer is not None:
                streamer.put(torch.tensor([tok]))
        root = torch.tensor([greedy[node]], device=device)
        hidden = h[node][None]
    if streamer is not None:
        streamer.end()
    if stats is not None:
        stats.update(steps=steps, accepted=accepted_total, mean_accepted=accepted_total / max(steps, 1),
                     tokens_per_step=(accepted_total + steps) / max(steps, 1), tree_nodes=len(tree.paths))
    return torch.cat([input_ids, torch.tensor([out], dtype=input_ids.dtype, device=device)], dim=1)


# ------------------------------------------------------------------------------------------------------ plugin
@dataclass
class Medusa(Plugin):
    """Medusa-1 heads with static-tree verification (greedy, lossless, batch size 1)."""

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
        heads, config = load_heads(self.heads)
        if heads.hidden_size != _hidden_size(model):
            raise UnsupportedModelError(f"plugin 'medusa': heads {self.heads!r} were trained for hidden size "
                                        f"{heads.hidden_size}; this model has {_hidden_size(model)}")
        tree = build_tree(parse_tree(self.tree, heads.num_heads))
        device = next(model.parameters()).device
        heads.to(device=device, dtype=_compute_dtype(model))
        stats: dict = {}

        def decode(model, input_ids, attention_mask, *, max_new_tokens, eos_ids, streamer, **_):
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                input_ids = input_ids[:, attention_mask[0].bool()]  # batch size 1: padding is just dropped
            if heads.blocks[0].weight.device != input_ids.device:
                heads.to(input_ids.device)
            return medusa_generate(model, heads, tree, input_ids, max_new_tokens, eos_ids, stats, streamer)

        patcher.set_attr(model, STATS_ATTR, stats)
        patcher.set_attr(model, "generate", wrap_generate(model.generate, self.name, decode, stats, batch_one=True,
                                                          greedy_only=True))

    def card_metadata(self, model):
        return {"speculative": "medusa", "medusa_heads": self.heads, "medusa_tree": self.tree}
