"""2:4 sparse linear layers: compressed storage (kept values + 2-bit positions), executed on CUDA as torch
semi-structured sparse tensors (cuSPARSELt, else CUTLASS: the sparse tensor cores), plain torch elsewhere.

Storage per (out, in) weight: `weight` (out, in/2) holds the two kept values of every group of four, `weight_meta`
(out, in/8) uint8 packs their positions, 2 bits each: 0.5x the dense bytes plus 1/16 byte per weight. This is what
`save_pretrained` writes and what an artifact loads into (see `Sparse24Linear.skeleton_of`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compress_24(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2), meta (out, in/8) uint8) of a weight whose mask keeps exactly 2 of every 4 columns."""
    out, cols = weight.shape
    if cols % 8:
        raise ValueError(f"2:4 compressed storage needs in_features divisible by 8, got {cols}")
    pos = keep.reshape(out, cols // 4, 4).to(torch.float16).topk(2, dim=-1).indices.sort(dim=-1).values  # (out, g, 2)
    values = weight.reshape(out, cols // 4, 4).gather(-1, pos).reshape(out, cols // 2)
    p = pos.reshape(out, cols // 8, 4).to(torch.uint8)
    meta = p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)
    return values, meta


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) weight, zeros where pruned."""
    out, half = values.shape
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=meta.device)
    pos = ((meta[..., None] >> shifts) & 3).reshape(out, half // 2, 2).long()
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(out, half // 2, 2))
    return dense.reshape(out, half * 2)


def semi_structured_available(device: torch.device) -> str | None:
    """Why 2:4 sparse tensor cores cannot be used on `device`, or None when they can."""
    if device.type != "cuda":
        return "not a CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs compute capability 8.0+ (Ampere or newer)"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    return None


class Sparse24Linear(nn.Module):
    """y = x @ W.T + b with W 2:4 sparse.

    On CUDA (fp16/bf16, capability 8.0+) the first call builds a `to_sparse_semi_structured` copy of W (not saved;
    ~0.56x the dense bytes) and inputs with at least `dense_below` rows run on the sparse tensor cores; smaller
    inputs (decode) use a dense copy built once (`dense_below=0`, the default, means never: the sparse kernel for
    every shape, lowest memory). Anywhere else the weight is decompressed per call and `F.linear` runs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None,
                 dense_below: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.dense_below = in_features, out_features, dense_below
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=dtype, device=device), requires_grad=False)
        self.weight_meta = nn.Parameter(torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device),
                                        requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._sparse = self._dense = None
        self._sparse_error: str | None = None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None, dense_below: int = 0):
        out_f, in_f = weight.shape
        module = cls(in_f, out_f, bias is not None, weight.dtype, weight.device, dense_below)
        values, meta = compress_24(weight, keep)
        module.weight.data.copy_(values)
        module.weight_meta.data.copy_(meta)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def skeleton_of(cls, linear: nn.Module, dense_below: int = 0) -> "Sparse24Linear":
        w = linear.weight
        return cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, dense_below)

    def dense_weight(self) -> torch.Tensor:
        return decompress_24(self.weight, self.weight_meta)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda(): the cached execution copies follow the stored weight
        self._sparse = self._dense = None
        self._sparse_error = None
        return super()._apply(fn, *args, **kwargs)

    def sparse_weight(self):
        """The semi-structured tensor (built on first use), or None with the reason in `_sparse_error`."""
        if self._sparse is None and self._sparse_error is None:
            why = semi_structured_available(self.weight.device)
            if why is None and self.weight.dtype not in (torch.float16, torch.bfloat16):
                why = f"semi-structured kernels take float16/bfloat16 weights, not {self.weight.dtype}"
            if why is None:
                try:
                    from torch.sparse import to_sparse_semi_structured

                    self._sparse = to_sparse_semi_structured(self.dense_weight())
                except Exception as e:  # shape or backend limits: stay on the dense path, say why
                    why = f"{type(e).__name__}: {e}"
            self._sparse_error = why
        return self._sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        sparse = self.sparse_weight() if x.is_cuda else None
        if sparse is not None and rows >= self.dense_below and x.dtype == self.weight.dtype:
            y = F.linear(x.reshape(rows, self.in_features), sparse)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        if x.is_cuda and sparse is not None:  # decode path with a resident dense copy
            if self._dense is None:
                self._dense = self.dense_weight()
            return F.linear(x, self._dense, self.bias)
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"2:4 sparse, dense_below={self.dense_below}")
