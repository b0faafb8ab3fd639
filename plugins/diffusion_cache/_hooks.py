"""Shared machinery of the diffusion caches: the step clock, per-context state, hook registration, block discovery.

Every cache installs diffusers `ModelHook`s through `HookRegistry` and records each one with
`patcher.add_hook(description, remove)`, so `hf_accel.remove()` and the atomic rollback of `hf_accel.apply()` take
them out again and the model computes exactly what it computed before.

How a cache knows where the denoising loop is, without the pipeline's help
--------------------------------------------------------------------------
A `DenoiserHook` sits on the denoiser itself (the UNet or transformer) and sees every call. It reads the `timestep`
argument (keyword or positional, found from the forward signature) and

* a call with a lower timestep than the previous call of the same stream is the next step of one generation;
* a call whose timestep is not lower (the schedule went back up, or repeated) starts a new generation: the state is
  reset, so nothing leaks from one image to the next;
* a second call at the same timestep is another stream of the same step (classifier-free guidance run as two
  calls), and gets its own state. If the pipeline names its calls with diffusers' `cache_context("cond")` /
  `("uncond")`, that name keys the state too. A pipeline that batches cond and uncond into one call (SD, the digits
  reference) needs nothing: the cache holds the whole batch.

So the caches work in custom denoising loops and without `cache_context`. Known limit: schedulers that evaluate the
model twice at the same timestep on purpose (Heun) read as two streams; their steps are then never skipped
(correct, not faster). `reset_cache(model)` (or diffusers' `HookRegistry.reset_stateful_hooks`) resets explicitly.

torch.compile: the step logic is plain Python on purpose, and lives in the hook on the denoiser. Apply the cache
first, then compile the units that do the work (per block: `for b in model.transformer_blocks: b.compile()`); the
unit hooks only read one boolean, so each compiled block keeps two variants (compute / reuse). Do not wrap the whole
hooked denoiser in torch.compile: the step counter would be traced and recompiled every step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hf_accel.errors import UnsupportedModelError

HOOK_PREFIX = "hf_accel_"


# -- model resolution ---------------------------------------------------------------------------------------------
def denoiser_of(model: Any) -> torch.nn.Module:
    """The module that runs every denoising step: `model` itself, or a pipeline's `transformer` / `unet`."""
    if isinstance(model, torch.nn.Module):
        return model
    for attr in ("transformer", "unet"):
        part = getattr(model, attr, None)
        if isinstance(part, torch.nn.Module):
            return part
    raise UnsupportedModelError(
        f"{type(model).__name__} has no denoiser: expected a diffusers model or a pipeline with `transformer` or `unet`"
    )


def is_unet(module: torch.nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("down_blocks", "up_blocks", "conv_in")) and hasattr(module, "mid_block")


def transformer_blocks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Transformer blocks in execution order, found like diffusers' own caches do (`transformer_blocks`,
    `single_transformer_blocks`, `blocks`, `layers`, ... as direct children that are ModuleLists)."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    out = []
    for name, child in module.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList):
            out += [(f"{name}.{i}", block) for i, block in enumerate(child)]
    return out


# -- per-block argument access ------------------------------------------------------------------------------------
@dataclass
class BlockIO:
    """Where a transformer block takes and returns its hidden states (and the text stream, for dual-stream blocks)."""

    cls: type
    out_hidden: int | None = None  # index in a tuple output; None: the output is the tensor itself
    out_encoder: int | None = None
    _params: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, block: torch.nn.Module) -> "BlockIO":
        from diffusers.hooks._helpers import TransformerBlockRegistry

        try:
            meta = TransformerBlockRegistry.get(type(block))
            hid, enc = meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
        except ValueError:  # unregistered block type: assume it returns the hidden states alone
            hid, enc = None, None
        params = list(inspect.signature(type(block).forward).parameters)[1:]
        return cls(type(block), hid, enc, params)

    def arg(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self._params.index(name) if name in self._params else -1
        return args[i] if 0 <= i < len(args) else None

    def split(self, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, encoder) of a block output."""
        if isinstance(out, tuple):
            hid = out[self.out_hidden if self.out_hidden is not None else 0]
            return hid, (out[self.out_encoder] if self.out_encoder is not None else None)
        return out, None

    def join(self, hidden: torch.Tensor, encoder: torch.Tensor | None, n_out: int | None = None) -> Any:
        """A block output made of `hidden` (and `encoder`): the tensor, or a tuple of `n_out` items like the
        block's own outputs."""
        if self.out_encoder is None and n_out is None:
            return hidden
        n = n_out or max(i for i in (self.out_hidden, self.out_encoder, 0) if i is not None) + 1
        out = [None] * n
        out[self.out_hidden if self.out_hidden is not None else 0] = hidden
        if self.out_encoder is not None:
            out[self.out_encoder] = encoder
        return tuple(out)


# -- state ----------------------------------------------------------------------------------------------------------
def _context_manager_base():
    from diffusers.hooks.hooks import StateManager

    class ContextName(StateManager):
        """Receives diffusers' `cache_context(name)`: `_set_cache_context` sets the context on every StateManager
        attribute of a stateful hook. Only the name is used; the step comes from the timestep."""

        def __init__(self):
            super().__init__(dict)

        @property
        def name(self) -> str | None:
            return None if self._context is None else self._context.name

        def reset(self, *args, **kwargs) -> None:
            self._context = None

    return ContextName


class CacheState:
    """What one stream (cond, uncond, or the whole batch) remembers within one generation."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = -1  # index of the current step in this generation
        self.last_t: float | None = None
        self.shape: tuple | None = None
        self.store: dict[str, Any] = {}  # outputs/residuals kept from the last computed step
        self.replay = False  # this call reuses (set per call by the plugin's policy)
        self.last_full = -1  # step index of the last fully computed call
        self.skipped_in_row = 0
        self.ref: torch.Tensor | None = None  # fbcache: probe signal at the last fully computed step
        self.estimate: Any = None  # fbcache: running (corrected) estimate of the reused part


@dataclass
class Stats:
    """Counters since the plugin was applied (or `reset_stats`)."""

    calls: int = 0
    full: int = 0
    reused: int = 0
    generations: int = 0
    diffs: list = field(default_factory=list)  # fbcache: (step, relative L1) per decision, for calibration


class Controller:
    """The step clock and the states of one applied cache on one denoiser."""

    def __init__(self) -> None:
        self.contexts = _context_manager_base()()
        self.states: dict[tuple, CacheState] = {}
        self._calls: dict[str | None, list] = {}
        self.current: CacheState | None = None
        self.enabled = True  # False: every call computes in full (the calibration's reference run)
        self.stats = Stats()
        self.trace: list | None = None  # calibration: (key, step, t, tensor) of the reused quantity, when a list

    def reset(self) -> None:
        self.states.clear()
        self._calls.clear()
        self.current = None

    def begin(self, t: float | None, shape: tuple) -> CacheState | None:
        """Start one denoiser call at timestep `t`; returns the state of its stream (None: untracked, compute)."""
        self.stats.calls += 1
        if t is None or not self.enabled:
            self.current = None
            return None
        ctx = self.contexts.name
        last = self._calls.get(ctx)
        if last is not None and last[0] == t:
            k, last[1] = last[1], last[1] + 1
        else:
            self._calls[ctx] = [t, 1]
            k = 0
        state = self.states.get((ctx, k))
        if state is None:
            state = self.states[(ctx, k)] = CacheState()
        if state.last_t is None or t >= state.last_t or state.shape != shape:
            state.reset()
            self.stats.generations += 1
        state.step += 1
        state.last_t, state.shape = t, shape
        state.replay = False
        self.current = state
        return state

    def key_of(self, state: CacheState) -> tuple:
        return next(k for k, s in self.states.items() if s is state)


def timestep_value(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    return float(t)


def shape_of(x: Any) -> tuple:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


# -- hooks -------------------------------------------------------------------------------------------------------------
def _model_hook_base():
    from diffusers.hooks.hooks import ModelHook

    return ModelHook


ModelHook = _model_hook_base()


class DenoiserHook(ModelHook):
    """On the denoiser: starts each call on the step clock, then lets the plugin's `policy(state)` decide."""

    _is_stateful = True

    def __init__(self, controller: Controller, policy: Callable[[CacheState], None], params: list[str],
                 veto: tuple[str, ...] = ()):
        super().__init__()
        self.controller = controller
        self.contexts = controller.contexts  # found by diffusers' _set_cache_context
        self.policy = policy
        self._params = params
        self._veto = veto  # kwargs that make a call uncacheable when given (e.g. in-place adapter residuals)

    def _arg(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self._params.index(name) if name in self._params else -1
        return args[i] if 0 <= i < len(args) else None

    def pre_forward(self, module, *args, **kwargs):
        t = timestep_value(self._arg("timestep", args, kwargs))
        if any(kwargs.get(v) is not None for v in self._veto):
            t = None
        x = args[0] if args else (self._arg(self._params[0], args, kwargs) if self._params else None)
        state = self.controller.begin(t, shape_of(x))
        if state is not None:
            self.policy(state)
        return args, kwargs

    def post_forward(self, module, output):
        state = self.controller.current
        if state is not None:
            if state.replay:
                self.controller.stats.reused += 1
                state.skipped_in_row += 1
            else:
                self.controller.stats.full += 1
                state.last_full = state.step
                state.skipped_in_row = 0
        self.controller.current = None
        return output

    def reset_state(self, module):
        self.controller.reset()
        return module


def forward_params(module: torch.nn.Module) -> list[str]:
    return list(inspect.signature(type(module).forward).parameters)[1:]


def register(patcher, module: torch.nn.Module, hook: Any, name: str, what: str) -> None:
    """Register `hook` on `module` under `name` and record its removal with the patcher."""
    from diffusers.hooks.hooks import HookRegistry

    had_registry = hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)

    def remove():
        registry.remove_hook(name, recurse=False)
        if not had_registry and not registry.hooks and getattr(module, "_diffusers_hook", None) is registry:
            del module._diffusers_hook
        if "forward" in module.__dict__ and getattr(module.__dict__["forward"], "__self__", None) is module \
                and module.__dict__["forward"].__func__ is type(module).forward:
            del module.__dict__["forward"]  # the registry leaves the bound method as an instance attribute

    patcher.add_hook(f"{what}: diffusers hook {name!r} on {type(module).__name__}", remove)


def invalidate(root: torch.nn.Module, patcher) -> None:
    """diffusers caches each registry's list of child registries; refresh it now and after removal."""

    def refresh():
        reg = getattr(root, "_diffusers_hook", None)
        if reg is not None and hasattr(reg, "invalidate_child_registries_cache"):
            reg.invalidate_child_registries_cache()
        for _, m in root.named_modules():
            r = getattr(m, "_diffusers_hook", None)
            if r is not None:
                r._child_registries_cache = None

    refresh()
    patcher.add_hook("refresh diffusers' child-registry cache", refresh)


def controller_of(model: Any, plugin_name: str) -> Controller:
    """The controller of cache `plugin_name` applied to `model` (a pipeline or its denoiser)."""
    den = denoiser_of(model)
    reg = getattr(den, "_diffusers_hook", None)
    hook = reg.get_hook(HOOK_PREFIX + plugin_name) if reg is not None else None
    if hook is None:
        raise UnsupportedModelError(f"cache {plugin_name!r} is not applied to {type(model).__name__}")
    return hook.controller


def reset_cache(model: Any) -> None:
    """Forget every cached tensor of every hf_accel cache on `model` (pipeline or denoiser)."""
    den = denoiser_of(model)
    reg = getattr(den, "_diffusers_hook", None)
    for name in list(getattr(reg, "hooks", {})):
        hook = reg.hooks[name]
        if name.startswith(HOOK_PREFIX) and isinstance(hook, DenoiserHook):
            hook.controller.reset()


def cache_stats(model: Any, plugin_name: str) -> Stats:
    return controller_of(model, plugin_name).stats


def map_first(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to the tensor a unit returns (itself, or the first item of a tuple / ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple):
        return (fn(out[0]),) + tuple(out[1:])
    if hasattr(out, "to_tuple"):
        items = out.to_tuple()
        return type(out)(fn(items[0]), *items[1:])
    raise TypeError(f"cannot read a tensor from {type(out).__name__}")


def first_tensor(out: Any) -> torch.Tensor:
    found = []
    map_first(out, lambda x: found.append(x) or x)
    return found[0]


def rel_l1(a: torch.Tensor, ref: torch.Tensor) -> float:
    """mean|a - ref| / mean|ref| (TeaCache's relative L1), one host sync."""
    return float((a.float() - ref.float()).abs().mean() / ref.float().abs().mean().clamp_min(1e-12))


# -- UNet: the DeepCache split into a shallow path (always computed) and a deep branch (reusable) -----------------
@dataclass
class UNetSplit:
    """A UNet's computation as units in execution order, split at skip connection `depth`.

    Down path units produce the skip connections (res samples): conv_in is number 0, then each layer (resnet +
    attention) and each downsampler of every down block. Each up-path layer consumes one, deepest first. With
    `depth = d`, the shallow path is conv_in, down units 1..d and the up-path suffix from the first layer that
    consumes a skip connection <= d. Everything between (the deep branch) can be reused from an earlier step: its
    only way into the shallow path is the output of its last unit, the `boundary` (DeepCache, arXiv:2312.00858).
    """

    deep: list[tuple[str, torch.nn.Module]]
    boundary: str  # name of the deep unit whose output feeds the shallow up path
    probe: tuple[str, torch.nn.Module]  # the last shallow down unit: its output is the deep branch's input
    n_skips: int
    shallow: list[str]


_UNIT_CHILDREN = {"resnets", "attentions", "downsamplers", "upsamplers"}


def _layers(block: torch.nn.Module, prefix: str, samplers: str) -> list[list[tuple[str, torch.nn.Module]]]:
    extra = [n for n, c in block.named_children()
             if n not in _UNIT_CHILDREN and any(True for _ in c.parameters())]
    if extra or not isinstance(getattr(block, "resnets", None), torch.nn.ModuleList):
        raise UnsupportedModelError(
            f"{prefix} ({type(block).__name__}) is not a standard diffusers UNet block (resnets / attentions / "
            f"{samplers}); unexpected parts: {extra or ['no resnets']}"
        )
    attns = getattr(block, "attentions", None) or []
    units = []
    for j, resnet in enumerate(block.resnets):
        unit = [(f"{prefix}.resnets.{j}", resnet)]
        if j < len(attns) and attns[j] is not None:
            unit.append((f"{prefix}.attentions.{j}", attns[j]))
        units.append(unit)
    return units


def split_unet(unet: torch.nn.Module, depth: int) -> UNetSplit:
    if not is_unet(unet):
        raise UnsupportedModelError(f"{type(unet).__name__} is not a UNet (needs down_blocks, mid_block, up_blocks)")
    down: list[list[tuple[str, torch.nn.Module]]] = [[("conv_in", unet.conv_in)]]
    for i, block in enumerate(unet.down_blocks):
        down += _layers(block, f"down_blocks.{i}", "downsamplers")
        if getattr(block, "downsamplers", None):
            down.append([(f"down_blocks.{i}.downsamplers.{k}", m) for k, m in enumerate(block.downsamplers)])
    up: list[tuple[list[tuple[str, torch.nn.Module]], int | None]] = []  # (unit, skip connection it consumes)
    skip = len(down) - 1
    for i, block in enumerate(unet.up_blocks):
        for unit in _layers(block, f"up_blocks.{i}", "upsamplers"):
            up.append((unit, skip))
            skip -= 1
        if getattr(block, "upsamplers", None):
            up.append(([(f"up_blocks.{i}.upsamplers.{k}", m) for k, m in enumerate(block.upsamplers)], None))
    if skip != -1:
        raise UnsupportedModelError(
            f"{type(unet).__name__}: the up blocks consume {len(down) - 1 - skip} skip connections but the down path "
            f"makes {len(down)}; this UNet layout is not supported"
        )
    n = len(down)
    if not 0 <= depth < n:
        raise UnsupportedModelError(f"depth must be in 0..{n - 1} for this UNet ({n} skip connections), got {depth}")
    first_shallow_up = next(i for i, (_, s) in enumerate(up) if s is not None and s <= depth)
    deep_units = down[depth + 1:] + [[("mid_block", unet.mid_block)]] + [u for u, _ in up[:first_shallow_up]]
    deep = [m for unit in deep_units for m in unit]
    shallow = [name for unit in down[:depth + 1] + [u for u, _ in up[first_shallow_up:]] for name, _ in unit]
    return UNetSplit(deep=deep, boundary=deep[-1][0], probe=down[depth][-1], n_skips=n, shallow=shallow)


class ReplayHook(ModelHook):
    """On a deep-branch unit: computes and keeps its output, or, when the call reuses, returns the kept output.
    The boundary unit returns `state.estimate` instead when the plugin maintains a corrected estimate."""

    def __init__(self, controller: Controller, name: str, boundary: bool = False):
        super().__init__()
        self.controller, self.name, self.boundary = controller, name, boundary

    def new_forward(self, module, *args, **kwargs):
        state = self.controller.current
        if state is not None and state.replay:
            if self.boundary and state.estimate is not None:
                return state.estimate
            return state.store[self.name]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if state is not None:
            state.store[self.name] = out
            if self.boundary:
                state.estimate = out
                if self.controller.trace is not None:
                    self.controller.trace.append((self.controller.key_of(state), state.step, state.last_t,
                                                  first_tensor(out).detach()))
        return out
