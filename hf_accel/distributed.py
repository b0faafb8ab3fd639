"""Beyond one GPU: accelerated models under tensor parallelism and `device_map` dispatch.

Two ways to run a model tensor-parallel, both on the model's own plan (`base_model_tp_plan`: q/k/v, gate/up
column-wise, o/down row-wise):

1. transformers' own TP: `from_pretrained(artifact_or_id, tp_plan="auto")` under `torchrun` (transformers >= 5.17;
   its DTensor loading path). Our quantized layers (`Int8Linear`, `Int4Linear`, `Fp8Linear`) declare how each of
   their tensors splits (`TP_DIMS`); `prepare_tp_plan` adds a replicate rule for every tensor that must not split
   under a row-wise plan (the per-output-channel scales of int8/fp8), so that every rank loads exactly its slice of
   an hf_accel artifact. The layers set `_hf_quantized_needs_local_tp`, so transformers runs their forward on the
   local shards (packed int4 words split along K by whole groups: `check_tp` refuses splits that would cut one).
2. hf_accel's local TP, `shard_model(model)`: no DTensor; each rank keeps plain local tensors, a row-wise layer
   all-reduces its output (and adds its bias once). It shards a loaded model (float or quantized, before or after
   `accel=`) or a skeleton on the meta device (then the caller materialises only the local shards: how
   `scripts/bench_tp.py` builds a 70B-shaped model on two GPUs without ever holding it whole).

Heads split across ranks with q/k/v, so KV-cache policies that score per KV head (sink, h2o, snapkv, kvquant) make
the same decision on each rank as the single-process model does on those heads; `local_kv_heads` is what the fast
runtime sizes its cache with. `offload_reason` says why a model dispatched with `device_map` cannot be captured in
CUDA graphs (weights on the CPU or disk move at every forward).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from .errors import UnsupportedModelError

import contextvars

REPLICATE_STYLE = "hf_accel_replicate"
# Set by our from_pretrained wrapper while transformers loads a model tensor-parallel: the TP size (else None).
TP_LOADING: contextvars.ContextVar[int | None] = contextvars.ContextVar("hf_accel_tp_loading", default=None)
COLWISE = ("colwise",)  # output stays sharded on the last dim: the next row-wise layer consumes it
ROWWISE = ("rowwise",)  # input sharded on the last dim, output all-reduced
# dims for a plain nn.Linear: {param: (dim under colwise, dim under rowwise or None = replicated)}
LINEAR_TP_DIMS = {"weight": (0, 1), "bias": (0, None)}


def _generic(name: str) -> str:
    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)


def plan_style(plan: dict[str, str], module_name: str) -> str | None:
    """The style the TP plan gives module `module_name` (layer numbers matched by `*`)."""
    return plan.get(_generic(module_name), plan.get(module_name))


def model_tp_plan(model: nn.Module) -> dict[str, str]:
    """The model's full TP plan, prefixed module names -> style, on any transformers 5.x."""
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None)
    if plan:
        return dict(plan)
    plan = {}
    for prefix, module in model.named_modules():
        base = getattr(getattr(module, "config", None), "base_model_tp_plan", None)
        if base and getattr(module, "base_model", None) is module:
            plan.update({f"{prefix}.{k}" if prefix else k: v for k, v in base.items()})
    return plan


def tp_dims(module: nn.Module) -> dict[str, tuple[int, int | None]] | None:
    """How a linear layer's tensors split: our quantized layers declare `TP_DIMS`; nn.Linear uses LINEAR_TP_DIMS."""
    dims = getattr(type(module), "TP_DIMS", None)
    if dims is not None:
        return dims
    return LINEAR_TP_DIMS if isinstance(module, nn.Linear) else None


def check_tp(module: nn.Module, name: str, style: str, world: int) -> None:
    """Raise UnsupportedModelError if `module` cannot split `world` ways under `style` (say what would work)."""
    kind = "colwise" if style in COLWISE or style.startswith("colwise") else "rowwise"
    dims = tp_dims(module) or {}
    unknown = [p for p, t in module._parameters.items() if t is not None and p not in dims]
    if unknown:
        raise UnsupportedModelError(
            f"{name} ({type(module).__name__}) has tensors with no tensor-parallel rule ({', '.join(unknown)}); "
            f"layers that split declare TP_DIMS for: {', '.join(dims) or 'weight, bias'}"
        )
    sizes = {"colwise": getattr(module, "out_features", None), "rowwise": getattr(module, "in_features", None)}
    size = sizes[kind]
    unit = getattr(module, "tp_unit", lambda k: 1)(kind)
    if size is None or size % (unit * world):
        raise UnsupportedModelError(
            f"{name} ({type(module).__name__}) cannot be split {world} ways {kind}: its "
            f"{'output' if kind == 'colwise' else 'input'} size {size} must be a multiple of {unit} x {world}"
            + (f" (whole int4 groups of {unit} per rank; use a smaller group_size or tp size)" if unit > 1 else "")
        )


# ---------------------------------------------------------------------------------------------------------------
# 1. transformers' TP (tp_plan="auto")
# ---------------------------------------------------------------------------------------------------------------
def register_styles() -> None:
    """Register the `hf_accel_replicate` style (every rank keeps the whole tensor) in transformers' TP registry."""
    try:
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer
    except ImportError:  # transformers without the DTensor TP path
        return
    if REPLICATE_STYLE not in ALL_PARALLEL_STYLES:
        ALL_PARALLEL_STYLES.register(REPLICATE_STYLE, TensorParallelLayer())


def tp_size_requested(kwargs: dict) -> int | None:
    """The TP size a from_pretrained call asks for (tp_plan= / tp_size= / distributed_config=), or None."""
    import torch.distributed as dist

    config = kwargs.get("distributed_config")
    size = kwargs.get("tp_size") or getattr(config, "tp_size", None)
    if kwargs.get("tp_plan") is None and not (config is not None and getattr(config, "tp_plan", None)):
        return None if not size or size <= 1 else size
    if not size:
        size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    return size


def prepare_tp_plan(model: nn.Module) -> int:
    """After our layers replaced the linears (before weights load): add a replicate rule for each tensor of theirs
    that must not split under the model's row-wise rules, and refuse splits that cannot work. Returns the number of
    rules added. A no-op for models without a TP plan; harmless when the model is not loaded tensor-parallel."""
    plan = getattr(model, "_tp_plan", None)
    if not plan:
        return 0
    register_styles()
    world = TP_LOADING.get() or 1  # only a tensor-parallel load is checked (torchrun may be data-parallel)
    added = 0
    for name, module in model.named_modules():
        dims = getattr(type(module), "TP_DIMS", None)
        style = plan_style(plan, name) if dims is not None else None
        if style is None:
            continue
        if world > 1 and (style in COLWISE + ROWWISE or style.startswith(("colwise", "rowwise"))):
            check_tp(module, name, style, world)
        if style.startswith("rowwise"):
            for param, (_, row_dim) in dims.items():
                if row_dim is None and param != "bias" and getattr(module, param, None) is not None:
                    plan[f"{_generic(name)}.{param}"] = REPLICATE_STYLE
                    added += 1
    return added


# ---------------------------------------------------------------------------------------------------------------
# 2. hf_accel's local TP
# ---------------------------------------------------------------------------------------------------------------
def _all_reduce(group):
    import torch.distributed as dist

    def hook(module, args, output):
        dist.all_reduce(output, group=group)
        bias = module._hf_accel_tp_bias
        return output if bias is None else output + bias

    return hook


def _make_rowwise(module: nn.Module, bias, group) -> None:
    module._hf_accel_tp_bias = bias
    module.bias = None
    module._hf_accel_tp_hook = module.register_forward_hook(_all_reduce(group))


def shard_module(module: nn.Module, style: str, rank: int, world: int, group=None) -> None:
    """Split one linear layer in place: keep this rank's slice of each tensor (see `tp_dims`); a row-wise layer
    gets a forward hook that all-reduces its partial output and adds its bias once."""
    dims = tp_dims(module)
    col = style in COLWISE
    for pname, (cdim, rdim) in dims.items():
        param = getattr(module, pname, None)
        if param is None:
            continue
        dim = cdim if col else rdim
        if dim is None:
            continue
        size = param.shape[dim] // world
        local = param.data.narrow(dim, rank * size, size)
        local = local.clone() if local.device.type != "meta" else torch.empty_like(local)
        setattr(module, pname, nn.Parameter(local, requires_grad=param.requires_grad))
    if col:
        module.out_features //= world
    else:
        module.in_features //= world
        _make_rowwise(module, module.bias, group)
    module._hf_accel_tp = (style, rank, world, group)


def transfer_tp(old: nn.Module, new: nn.Module) -> None:
    """Called by `Patcher.swap_module`: the module replacing a sharded layer (e.g. its int4 version, quantized
    from the local shard) takes over its tensor-parallel role."""
    info = getattr(old, "_hf_accel_tp", None)
    if info is None:
        return
    new._hf_accel_tp = info
    if info[0] in ROWWISE:
        if getattr(new, "bias", None) is not None:  # built from the float layer, whose bias we had moved
            raise UnsupportedModelError(f"{type(new).__name__} brought its own bias to a row-wise sharded layer")
        _make_rowwise(new, old._hf_accel_tp_bias, info[3])


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def localize(model: nn.Module) -> int:
    """A model loaded with transformers' TP (DTensor parameters, forward hooks): turn its column-/row-wise linear
    layers into hf_accel local-TP layers (plain local tensors; a row-wise layer all-reduces its output and adds its
    bias once), so weight plugins can quantize the local shards and the fast runtime compiles plain tensors.
    Other styles (vocab-parallel embedding, gathered LM head) keep transformers' hooks. Returns the layers changed."""
    plan = model_tp_plan(model)
    n = 0
    for name, module in model.named_modules():
        style = plan_style(plan, name)
        dims = tp_dims(module)
        weight = getattr(module, "weight", None)
        if style not in COLWISE + ROWWISE or dims is None or not _is_dtensor(weight):
            continue
        mesh = weight.device_mesh
        group = mesh.get_group()
        world, rank = mesh.size(), mesh.get_local_rank()
        for pname in list(module._parameters):
            t = module._parameters[pname]
            if t is not None and _is_dtensor(t):
                module._parameters[pname] = nn.Parameter(t.to_local(), requires_grad=t.requires_grad)
        module.__dict__.pop("forward", None)  # transformers' tp_forward
        if style in COLWISE:
            module.out_features = module.weight.shape[0]
        else:
            module.in_features //= world
            _make_rowwise(module, module.bias, group)
        module._hf_accel_tp = (style, rank, world, group)
        n += 1
    if n:
        model._hf_accel_local_tp = True
    return n


def shard_model(model: nn.Module, rank: int | None = None, world: int | None = None, group=None,
                plan: dict[str, str] | None = None) -> nn.Module:
    """Tensor-parallel in place with plain local tensors, on the model's TP plan (`colwise`/`rowwise` linear rules;
    embeddings, norms and the LM head stay replicated). Checks every layer before changing any."""
    import torch.distributed as dist

    rank = dist.get_rank(group) if rank is None else rank
    world = dist.get_world_size(group) if world is None else world
    plan = model_tp_plan(model) if plan is None else plan
    if not plan:
        raise UnsupportedModelError(f"{type(model).__name__} has no tensor-parallel plan (config.base_model_tp_plan)")
    targets = []
    for name, module in model.named_modules():
        style = plan_style(plan, name)
        if style in COLWISE + ROWWISE and tp_dims(module) is not None:
            check_tp(module, name, style, world)
            targets.append((module, style))
    if not targets:
        raise UnsupportedModelError(f"the TP plan of {type(model).__name__} matches no linear layer")
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for attr in ("num_attention_heads", "num_key_value_heads"):
            n = getattr(text, attr, None)
            if n is not None and n % world:
                raise UnsupportedModelError(f"{attr}={n} does not split across {world} ranks")
    for module, style in targets:
        shard_module(module, style, rank, world, group)
    model._tp_size = world
    model._hf_accel_local_tp = True
    return model


def tp_size(model: nn.Module) -> int:
    return int(getattr(model, "_tp_size", None) or 1)


def local_kv_heads(model: nn.Module, kv_heads: int) -> int:
    """KV heads held by this rank: all of them, or 1/tp of them under tensor parallelism."""
    return kv_heads // tp_size(model)


# ---------------------------------------------------------------------------------------------------------------
# device_map dispatch
# ---------------------------------------------------------------------------------------------------------------
def offload_reason(model: Any) -> str | None:
    """Why a CUDA graph cannot capture this model's forward, if it is dispatched with device_map: weights offloaded
    to the CPU or disk (accelerate streams them in at every forward), or layers on several devices."""
    device_map = getattr(model, "hf_device_map", None) or {}
    places = {str(v) for v in device_map.values()}
    off = sorted(places & {"cpu", "disk"})
    if off and len(places) > 1 or any(hasattr(m, "_hf_hook") and getattr(m._hf_hook, "offload", False)
                                      for m in model.modules()):
        return f"weights are offloaded ({', '.join(off) or 'cpu'}) by device_map and move at every forward"
    gpus = {p for p in places if p not in ("cpu", "disk")}
    if len(gpus) > 1:
        return f"layers are dispatched across {len(gpus)} devices by device_map"
    return None


def offloaded_weights(model: Any) -> list[str]:
    """Parameters that accelerate's device_map offload keeps off the model (on the meta device, streamed from the
    CPU or disk at each forward): a plugin that rewrites weights cannot read them."""
    if not getattr(model, "hf_device_map", None):
        return []
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


def check_weight_rewrite(model: Any, plugin_name: str) -> None:
    off = offloaded_weights(model)
    if off:
        raise UnsupportedModelError(
            f"plugin {plugin_name!r} rewrites weights, but {len(off)} parameters of this model are offloaded by "
            f"device_map (e.g. {off[0]}) and not resident. Apply it to a model loaded without offload, save the "
            "artifact (save_pretrained), and load that with device_map=... and offload_folder=...")


def materialize(model: nn.Module, device, init: Callable[[str, torch.Tensor], None] | None = None) -> nn.Module:
    """Move a (sharded) meta model to `device` with uninitialised storage, then call `init(name, tensor)` on every
    parameter and buffer; rotary embeddings are rebuilt (their buffers are computed, not loaded)."""
    model.to_empty(device=device)
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            fresh = type(module)(config=module.config).to(device)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(module, bname, buf)
    if init is not None:
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                             if "rotary" not in n]:
                init(name, t)
    return model
