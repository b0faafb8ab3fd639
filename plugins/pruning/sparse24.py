"""2:4 sparse linear layers: compressed storage (kept values + 2-bit positions), executed on CUDA by the Triton 2:4
decode kernels for small inputs (`hf_accel.kernels.sparse24`, op `hf_accel::sparse24_linear`) and as torch
semi-structured sparse tensors (cuSPARSELt, else CUTLASS: the sparse tensor cores) for large ones, plain torch
elsewhere.

Storage per (out, in) weight: `weight` (out, in/2) holds the two kept values of every group of four, `weight_meta`
(out, in/8) uint8 packs their positions, 2 bits each: 0.5x the dense bytes plus 1/16 byte per weight (exact layout:
hf_accel.kernels.sparse24). This is what `save_pretrained` writes and what an artifact loads into (see
`Sparse24Linear.skeleton_of`); no dense copy is kept unless `dense_below` asks for one."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_accel.kernels.sparse24 import (compress_24, decompress_24, kernel_supported, sparse24_linear,  # noqa: F401
                                       sparse24_linear_ref)


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

    On CUDA with x in the weight's dtype (fp16/bf16), inputs of at most `kernel_rows` rows (batch x tokens,
    default 32: decode) run the Triton 2:4 kernel on the stored values and meta (reads 0.5625x the dense bytes).
    Larger inputs: the first call builds a `to_sparse_semi_structured` copy of W (capability 8.0+; not saved,
    ~0.56x the dense bytes) and inputs with at least `dense_below` rows run on the sparse tensor cores; the rows
    in between use a dense copy built once (`dense_below=0`, the default, means never). Anywhere else (CPU, fp32)
    the op's torch reference: the weight decompressed per call, then `F.linear` (under TRITON_INTERPRET=1 on the
    CPU, half-precision inputs of at most `kernel_rows` rows go through the interpreted kernel: tests)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None,
                 dense_below: int = 0, kernel_rows: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.dense_below = in_features, out_features, dense_below
        self.kernel_rows = kernel_rows
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=dtype, device=device), requires_grad=False)
        self.weight_meta = nn.Parameter(torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device),
                                        requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._sparse = self._dense = None
        self._sparse_error: str | None = None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor | None, bias: torch.Tensor | None,
                   dense_below: int = 0, kernel_rows: int = 32):
        """From a pruned dense weight (zeros where `keep` is False; keep=None: the nonzeros must be 2:4)."""
        out_f, in_f = weight.shape
        module = cls(in_f, out_f, bias is not None, weight.dtype, weight.device, dense_below, kernel_rows)
        values, meta = compress_24(weight, keep)
        module.weight.data.copy_(values)
        module.weight_meta.data.copy_(meta)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def skeleton_of(cls, linear: nn.Module, dense_below: int = 0, kernel_rows: int = 32) -> "Sparse24Linear":
        w = linear.weight
        return cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, dense_below,
                   kernel_rows)

    def dense_weight(self) -> torch.Tensor:
        """The dense (out, in) weight, zeros where pruned (built per call: the semi-structured and dense-copy paths
        and `hf_accel.remove`-style conversions use it)."""
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
        if rows <= self.kernel_rows:  # decode: the 2:4 kernel on CUDA (reference on the CPU, fp32, ...)
            return sparse24_linear(x, self.weight, self.weight_meta, self.bias)
        if not x.is_cuda:
            return sparse24_linear_ref(x, self.weight, self.weight_meta, self.bias)
        sparse = self.sparse_weight()
        if sparse is not None and rows >= self.dense_below and x.dtype == self.weight.dtype:
            y = F.linear(x.reshape(rows, self.in_features), sparse)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        if sparse is not None:  # rows below dense_below: a resident dense copy
            if self._dense is None:
                self._dense = self.dense_weight()
            return F.linear(x, self._dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return sparse24_linear(x, self.weight, self.weight_meta, self.bias)  # no semi-structured kernels here

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"2:4 sparse, dense_below={self.dense_below}, kernel_rows={self.kernel_rows}")
