"""Launch configurations measured on the H100 by `scripts/bench_quant.py --tune` (the fastest of a sweep per shape).

Keys: (device, format, batch bucket, N, K) -> {"kernel": "gemv" | "dot", LaunchConfig fields}. Batch buckets are
1, 2, 4, 8, 16, ... (`_base.m_bucket`); shapes and buckets not listed use the heuristics in w8.py / int4.py, and
batches above `_base.DOT_M` the prefill path. Source: benchmarks/results/bench_quant.json ("tuned"), measured
2026-11-24 on one H100 80GB HBM3 (torch 2.11, triton 3.6) for the Llama-3-8B linear shapes. Regenerate by running
the script on the device and pasting its "tuned" list here.
"""

TUNED = {
    ('h100', 'fp8', 1, 1024, 4096): {'kernel': 'gemv', 'block_n': 4, 'block_k': 2048, 'block_m': 1, 'num_warps': 8, 'num_stages': 1, 'cvt': 0},
    ('h100', 'fp8', 4, 1024, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 0},
    ('h100', 'fp8', 16, 1024, 4096): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'fp8', 1, 4096, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 0},
    ('h100', 'fp8', 4, 4096, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 512, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 0},
    ('h100', 'fp8', 16, 4096, 4096): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'fp8', 1, 4096, 14336): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 0},
    ('h100', 'fp8', 4, 4096, 14336): {'kernel': 'gemv', 'block_n': 16, 'block_k': 512, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 0},
    ('h100', 'fp8', 16, 4096, 14336): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'fp8', 1, 14336, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 256, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 0},
    ('h100', 'fp8', 4, 14336, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'fp8', 16, 14336, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 1, 1024, 4096): {'kernel': 'gemv', 'block_n': 2, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 4, 1024, 4096): {'kernel': 'gemv', 'block_n': 4, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 16, 1024, 4096): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g128', 1, 4096, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 4, 4096, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 16, 4096, 4096): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g128', 1, 4096, 14336): {'kernel': 'gemv', 'block_n': 8, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 4, 4096, 14336): {'kernel': 'gemv', 'block_n': 16, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 16, 4096, 14336): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g128', 1, 14336, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 4, 14336, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 16, 14336, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 1, 128256, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 4, 128256, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g128', 16, 128256, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 1, 1024, 4096): {'kernel': 'gemv', 'block_n': 4, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 4, 1024, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 16, 1024, 4096): {'kernel': 'dot', 'block_n': 16, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g32', 1, 4096, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 4, 4096, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 16, 4096, 4096): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g32', 1, 4096, 14336): {'kernel': 'gemv', 'block_n': 8, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 4, 4096, 14336): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 16, 4096, 14336): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g32', 1, 14336, 4096): {'kernel': 'gemv', 'block_n': 4, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 4, 14336, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g32', 16, 14336, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 1, 1024, 4096): {'kernel': 'gemv', 'block_n': 2, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 4, 1024, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 16, 1024, 4096): {'kernel': 'dot', 'block_n': 16, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g64', 1, 4096, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 4, 4096, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 16, 4096, 4096): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g64', 1, 4096, 14336): {'kernel': 'gemv', 'block_n': 8, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 4, 4096, 14336): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 16, 4096, 14336): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int4g64', 1, 14336, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 2048, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 4, 14336, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int4g64', 16, 14336, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int8', 1, 1024, 4096): {'kernel': 'gemv', 'block_n': 4, 'block_k': 2048, 'block_m': 1, 'num_warps': 8, 'num_stages': 1, 'cvt': 1},
    ('h100', 'int8', 4, 1024, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 1},
    ('h100', 'int8', 16, 1024, 4096): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int8', 1, 4096, 4096): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 1},
    ('h100', 'int8', 4, 4096, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 512, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 1},
    ('h100', 'int8', 16, 4096, 4096): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int8', 1, 4096, 14336): {'kernel': 'gemv', 'block_n': 8, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 1},
    ('h100', 'int8', 4, 4096, 14336): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int8', 16, 4096, 14336): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int8', 1, 14336, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 256, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 1},
    ('h100', 'int8', 4, 14336, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int8', 16, 14336, 4096): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},
    ('h100', 'int8', 1, 128256, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 256, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'cvt': 1},
    ('h100', 'int8', 4, 128256, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
    ('h100', 'int8', 16, 128256, 4096): {'kernel': 'dot', 'block_n': 64, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 1},
}

# H200 (2026-12-01, benchmarks/results/bench_quant.json, `python scripts/bench_quant.py --budget-s 536`): only the
# shapes where the sweep beat the H100 entry / default that an H200 otherwise uses by >= 5% (one measurement
# each; the comment gives both times). Everything else falls back to the H100 table above (_base.SIBLING).
TUNED.update({
    ('h200', 'int8', 4, 4096, 4096): {'kernel': 'bgemv', 'block_n': 8, 'block_k': 256, 'block_m': 4, 'num_warps': 4, 'num_stages': 1},  # 16.54 vs 19.96 us
    ('h200', 'int8', 4, 4096, 14336): {'kernel': 'bgemv', 'block_n': 8, 'block_k': 256, 'block_m': 4, 'num_warps': 4, 'num_stages': 1},  # 47.60 vs 59.40 us
    ('h200', 'mxfp4', 1, 4096, 4096): {'kernel': 'bgemv', 'block_n': 4, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},  # 13.71 vs 15.58 us
    ('h200', 'mxfp4', 1, 14336, 4096): {'kernel': 'bgemv', 'block_n': 4, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},  # 39.60 vs 41.84 us
    ('h200', 'mxfp4', 1, 4096, 14336): {'kernel': 'bgemv', 'block_n': 8, 'block_k': 512, 'block_m': 1, 'num_warps': 4, 'num_stages': 1, 'split_k': 4},  # 41.68 vs 48.67 us
    ('h200', 'fp8', 4, 4096, 4096): {'kernel': 'gemv', 'block_n': 16, 'block_k': 512, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},  # 15.28 vs 16.64 us
    ('h200', 'fp8', 16, 4096, 4096): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},  # 13.16 vs 15.35 us
    ('h200', 'fp8', 16, 14336, 4096): {'kernel': 'dot', 'block_n': 32, 'block_k': 128, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},  # 24.23 vs 29.97 us
    ('h200', 'fp8', 4, 4096, 14336): {'kernel': 'bgemv', 'block_n': 8, 'block_k': 256, 'block_m': 4, 'num_warps': 4, 'num_stages': 1},  # 47.59 vs 52.60 us
    ('h200', 'fp8', 16, 4096, 14336): {'kernel': 'dot', 'block_n': 16, 'block_k': 256, 'block_m': 16, 'num_warps': 4, 'num_stages': 3},  # 38.28 vs 48.75 us
    ('h200', 'nvfp4', 1, 4096, 4096): {'kernel': 'bgemv', 'block_n': 4, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},  # 13.95 vs 15.98 us
    ('h200', 'nvfp4', 1, 14336, 4096): {'kernel': 'bgemv', 'block_n': 4, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},  # 40.20 vs 43.44 us
    ('h200', 'nvfp4', 1, 4096, 14336): {'kernel': 'bgemv', 'block_n': 4, 'block_k': 1024, 'block_m': 1, 'num_warps': 4, 'num_stages': 1},  # 42.96 vs 49.84 us
})
