"""Pruning plugins: `prune` (magnitude / Wanda / SparseGPT, unstructured or N:M, 2:4 executed as semi-structured
sparse tensors on CUDA) and `shrink` (structured: heads / KV groups and MLP channels removed, the config shrinks)."""
