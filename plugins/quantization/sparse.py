"""The sparse side of dense-and-sparse layers (SpQR / SqueezeLLM style): a fixed number of exact weights per row.

Stored next to the packed weight as `weight_outlier_index` (int32 [out, k], ascending column indices per row) and
`weight_outlier_value` ([out, k], model dtype: the exact weight minus the dense part's dequantised value there).
y = dense(x) + x S^T. Small batches gather the k inputs each row needs (M * out * k multiply-adds, deterministic);
large batches scatter S into a dense [out, in] matrix and use one matmul.
"""

from __future__ import annotations

import torch
from torch import nn


def init_outliers(module: nn.Module, k: int, dtype: torch.dtype, device=None) -> None:
    module.outliers_per_row = k
    if k:
        frozen = dict(requires_grad=False)
        module.weight_outlier_index = nn.Parameter(
            torch.zeros(module.out_features, k, dtype=torch.int32, device=device), **frozen)
        module.weight_outlier_value = nn.Parameter(torch.zeros(module.out_features, k, dtype=dtype, device=device), **frozen)
    else:
        module.weight_outlier_index = None
        module.weight_outlier_value = None


def sparse_matrix(index: torch.Tensor, value: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(index.shape[0], in_features, dtype=dtype, device=value.device)
    return out.scatter_(1, index.long(), value.to(dtype))


def add_outliers(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """y + x @ S^T for the sparse S given by (index, value)."""
    k_in = x.shape[-1]
    x2 = x.reshape(-1, k_in)
    m, k = x2.shape[0], index.shape[1]
    if m * k * 4 <= k_in:
        part = (x2[:, index.long()].float() * value.float()).sum(-1)  # [M, out]
    else:
        part = x2 @ sparse_matrix(index, value, k_in, x2.dtype).T
    return y + part.to(y.dtype).reshape(y.shape)


def outlier_repr(module: nn.Module) -> str:
    return f", outliers/row={module.outliers_per_row}" if getattr(module, "outliers_per_row", 0) else ""
