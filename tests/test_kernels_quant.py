"""Quantized-linear kernels (hf_accel.kernels) against their plain-torch references.

Every case draws fresh random quantized weights and activations, poisons the output (NaN) before the launch,
then checks that every element was written and that ‖y − ref‖ / ‖ref‖ stays within what bf16 allows, ref being
computed in float64 from the exactly dequantised weights. The same cases run
- on the CPU under TRITON_INTERPRET=1 (what CI runs): the interpreter must be on before the kernels are decorated,
  so it runs in a child process (`python tests/test_kernels_quant.py` prints the results as JSON);
- on CUDA (`gpu` mark) in this process, plus larger shapes and every batch size the dispatcher serves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# (kernel, fmt, M, N, K, config overrides) -- odd sizes on purpose: N not a multiple of the row block, K not a
# multiple of the K block (w8) or of the group (int4: zero-padded weights, masked x)
CPU_CASES = [
    ("gemv", "int8", 1, 37, 200, dict(block_n=8, block_k=64, num_warps=1, cvt=0)),
    ("gemv", "int8", 2, 37, 200, dict(block_n=8, block_k=64, num_warps=1, cvt=1)),
    ("gemv", "fp8", 1, 33, 96, dict(block_n=4, block_k=32, num_warps=1, cvt=0)),
    ("gemv", "fp8", 1, 33, 96, dict(block_n=4, block_k=32, num_warps=1, cvt=1)),
    ("dot", "int8", 3, 21, 70, dict(block_n=16, block_k=32, block_m=16, num_warps=1)),
    ("dot", "fp8", 5, 40, 64, dict(block_n=16, block_k=32, block_m=16, num_warps=1, cvt=1)),
    ("dequant", "int8", 0, 19, 77, {}),
    ("dequant", "fp8", 0, 19, 77, {}),
    ("gemv", "int4g32", 1, 24, 160, dict(block_n=8, block_k=64, num_warps=1)),
    ("gemv", "int4g32", 3, 17, 200, dict(block_n=4, block_k=128, num_warps=1)),
    ("gemv", "int4g64", 2, 9, 256, dict(block_n=8, block_k=64, num_warps=1)),
    ("gemv", "int4g128", 1, 20, 300, dict(block_n=4, block_k=256, num_warps=1)),
    ("dot", "int4g32", 3, 18, 200, dict(block_n=16, block_k=128, block_m=16, num_warps=1)),
    ("dot", "int4g128", 2, 17, 384, dict(block_n=16, block_k=128, block_m=16, num_warps=1)),
    ("dequant", "int4g64", 0, 10, 200, {}),
    # v3 batched GEMV (block_m rows of x per program, split-K partials + reduce, both accumulator shapes)
    ("bgemv", "int8", 1, 37, 200, dict(block_n=8, block_k=64, block_m=1, num_warps=1)),
    ("bgemv", "int8", 3, 37, 200, dict(block_n=8, block_k=64, block_m=4, num_warps=1, split_k=2)),
    ("bgemv", "fp8", 5, 33, 96, dict(block_n=4, block_k=32, block_m=8, num_warps=1, acc3=False, split_k=3)),
    ("bgemv", "int4g32", 1, 24, 160, dict(block_n=8, block_k=64, block_m=1, num_warps=1)),
    ("bgemv", "int4g128", 3, 20, 300, dict(block_n=4, block_k=128, block_m=4, num_warps=1, split_k=2)),
    ("bgemv", "int4g64", 6, 9, 256, dict(block_n=8, block_k=64, block_m=8, num_warps=1, acc3=False, split_k=4)),
    ("op", "int8", 1, 24, 64, {}),
    ("op", "int4g128", 1, 24, 128, {}),
    ("op", "int4g32", 4, 12, 96, {}),
    ("op", "fp8", 3, 12, 64, {}),
]
GPU_CASES = [
    ("gemv", "int8", 1, 4096, 4096, {}), ("gemv", "fp8", 1, 1000, 14336, {}), ("gemv", "int8", 1, 333, 999, {}),
    ("dot", "int8", 16, 1024, 4096, {}), ("dot", "fp8", 7, 1000, 1000, {}),
    ("gemv", "int4g128", 1, 4096, 14336, {}), ("gemv", "int4g64", 1, 1000, 4096, {}), ("gemv", "int4g32", 1, 333, 999, {}),
    ("gemv", "int4g128", 4, 1024, 4096, dict(block_n=8, block_k=2048)),
    ("gemv", "int4g32", 3, 1000, 1000, dict(block_n=4, block_k=1024, num_warps=4)),
    ("dot", "int4g128", 16, 1024, 4096, {}), ("dot", "int4g64", 9, 999, 1000, {}),
    ("dequant", "int4g128", 0, 1000, 1000, {}), ("dequant", "fp8", 0, 1000, 1000, {}),
    ("bgemv", "int4g128", 1, 4096, 14336, dict(block_n=8, block_k=512, block_m=1, split_k=4)),
    ("bgemv", "int4g64", 16, 1000, 4096, dict(block_n=4, block_k=512, block_m=16, acc3=False)),
    ("bgemv", "int8", 4, 1024, 4096, dict(block_n=8, block_k=256, block_m=4, split_k=2)),
    ("bgemv", "fp8", 16, 999, 1000, dict(block_n=4, block_k=256, block_m=16, acc3=False, split_k=3)),
] + [("op", fmt, m, 1024, 4096, {}) for fmt in ("int8", "fp8", "int4g128", "int4g32") for m in (1, 2, 3, 16, 33, 100)]

# bf16 output: one rounding (2^-9 relative per element, ~2e-3 in norm); dot kernels also round W to bf16
TOLERANCE = {"gemv": 6e-3, "bgemv": 6e-3, "op": 1e-2, "dot": 1e-2, "dequant": 5e-3}


def case_id(case) -> str:
    kernel, fmt, m, n, k, cfg = case
    extra = ",".join(f"{a}={b}" for a, b in cfg.items())
    return f"{kernel}-{fmt}-m{m}-n{n}-k{k}" + (f"-{extra}" if extra else "")


def make_weights(fmt: str, n: int, k: int, device: str, gen: torch.Generator):
    """Random quantized weights of `fmt` and their exact float64 dequantisation."""
    from hf_accel.kernels import int4 as K4
    from hf_accel.kernels import w8 as K8

    if fmt == "int8":
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        s = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
        dense = K8.w8_dequantize(w, s, torch.float64)
        return (w.to(device), s.to(device)), dense
    if fmt == "fp8":
        w = (torch.randn(n, k, generator=gen) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to(torch.bfloat16)
        dense = K8.w8_dequantize(w, s, torch.float64)
        return (w.to(device), s.to(device)), dense
    g = int(fmt[5:])
    kp = K4.padded_k(k, g)
    q = torch.randint(0, 16, (n, kp), generator=gen)
    qw = K4.pack_int4(q, g)
    s = (torch.rand(n, kp // g, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    z = (torch.rand(n, kp // g, generator=gen) * 15).to(torch.bfloat16)
    dense = K4.int4_dequantize(qw, s, z, g, k, torch.float64)
    return (qw.to(device), s.to(device), z.to(device)), dense


def run_case(case, device: str, seed: int = 0) -> dict:
    """Run one kernel launch on fresh random data; return its relative error and unwritten-element count."""
    import hf_accel.kernels as K
    from hf_accel.kernels import int4 as K4
    from hf_accel.kernels import w8 as K8
    from hf_accel.kernels._base import LaunchConfig

    kernel, fmt, m, n, k, overrides = case
    gen = torch.Generator().manual_seed(seed)
    parts, dense = make_weights(fmt, n, k, device, gen)
    bias = (torch.randn(n, generator=gen).to(torch.bfloat16).to(device)
            if kernel in ("gemv", "bgemv", "dot", "op") and n % 2 else None)
    cfg = None
    if overrides:
        base = dict(block_n=16, block_k=128, block_m=1, num_warps=4, num_stages=1)
        cfg = LaunchConfig(**{**base, **overrides})
    if kernel == "dequant":
        out = (K8.w8_dequant(*parts, torch.bfloat16, fmt) if fmt in ("int8", "fp8")
               else K4.int4_dequant(*parts, int(fmt[5:]), k, torch.bfloat16))
        ref = dense
    else:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        ref = x.double() @ dense.T + (bias.cpu().double() if bias is not None else 0)
        x = x.to(device)
        poison = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
        if fmt in ("int8", "fp8"):
            if kernel == "op":
                out = (K.int8_linear if fmt == "int8" else K.fp8_linear)(x, *parts, bias)
            else:
                launch = {"gemv": K8.w8_gemv, "bgemv": K8.w8_bgemv, "dot": K8.w8_dot}[kernel]
                out = launch(x, *parts, bias, fmt, cfg, out=poison)
        else:
            g = int(fmt[5:])
            if kernel == "op":
                out = K.int4_linear(x, *parts, bias, g, k)
            else:
                launch = {"gemv": K4.int4_gemv, "bgemv": K4.int4_bgemv, "dot": K4.int4_dot}[kernel]
                out = launch(x, *parts, bias, g, cfg, out=poison)
    out = out.cpu()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    return {"id": case_id(case), "rel_err": err if err == err else float("inf"), "unwritten": int(out.isnan().sum()),
            "shape": list(out.shape)}


def layout_control(device: str) -> float:
    """The int4 kernel against a reference that unpacks the *natural* nibble order (k = 8 * word + nibble) instead
    of the packed one: the check must see the difference, or it could not catch a layout bug."""
    from hf_accel.kernels import int4 as K4

    gen = torch.Generator().manual_seed(3)
    (qw, s, z), _ = make_weights("int4g32", 16, 128, device, gen)
    x = torch.randn(1, 128, generator=gen).to(torch.bfloat16)
    y = K4.int4_gemv(x.to(device), qw, s, z, None, 32).cpu().double()  # layout: k = 32g + 4i + j
    words = qw.cpu().to(torch.int64)
    natural = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(16, 128).double()
    wrong = (natural.reshape(16, 4, 32) - z.cpu().double()[..., None]) * s.cpu().double()[..., None]
    ref = x.double() @ wrong.reshape(16, 128).T
    return ((y - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# CPU: the Triton interpreter, in a child process
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_interpreted_kernel_matches_reference(interpreted, case):
    got = interpreted["cases"][case_id(case)]
    assert got["unwritten"] == 0, got
    assert got["rel_err"] < TOLERANCE[case[0]], got
    kernel, _, m, n, k, _ = case
    assert got["shape"] == ([n, k] if kernel == "dequant" else [m, n])


def test_interpreted_check_detects_a_wrong_layout(interpreted):
    assert interpreted["layout_control"] > 0.5, interpreted["layout_control"]


def test_references_agree_with_the_formats():
    """The CPU path of each op is its reference: dequantise then F.linear (bf16 weights: ~2^-9 per weight)."""
    import hf_accel.kernels as K

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, generator=gen).to(torch.bfloat16)
    for fmt in ("int8", "fp8", "int4g64"):
        parts, dense = make_weights(fmt, 24, 200, "cpu", gen)
        ref = x.double() @ dense.T
        y = (K.int4_linear(x, *parts, None, 64, 200) if fmt.startswith("int4")
             else (K.int8_linear if fmt == "int8" else K.fp8_linear)(x, *parts, None))
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2, fmt


def test_pack_roundtrip_and_layout():
    from hf_accel.kernels import pack_int4, unpack_int4

    q = torch.randint(0, 16, (5, 256))
    packed = pack_int4(q, 64)
    assert packed.dtype == torch.int32 and packed.shape == (5, 32)
    assert torch.equal(unpack_int4(packed, 64), q.to(torch.uint8))
    # nibble i of word j of group g holds k = g * G + i * (G / 8) + j
    word = packed[2, 8 + 3].item() & 0xFFFFFFFF  # group 1, word 3
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [q[2, 64 + 8 * i + 3].item() for i in range(8)]
    with pytest.raises(ValueError, match="multiple of group_size"):
        pack_int4(q[:, :100], 64)


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", CPU_CASES + GPU_CASES, ids=case_id)
def test_gpu_kernel_matches_reference(case):
    for seed in (0, 1):  # fresh data twice: a race shows as an error that moves
        got = run_case(case, "cuda", seed)
        assert got["unwritten"] == 0, got
        assert got["rel_err"] < TOLERANCE[case[0]], got


@pytest.mark.gpu
def test_gpu_check_detects_a_wrong_layout():
    assert layout_control("cuda") > 0.5


@pytest.mark.gpu
def test_gpu_ops_compile_and_capture():
    """Under torch.compile(fullgraph, dynamic) the ops are opaque and need no graph break; a CUDA graph replays them."""
    import hf_accel.kernels as K

    gen = torch.Generator().manual_seed(2)
    (qw, s, z), _ = make_weights("int4g128", 512, 1024, "cuda", gen)
    (w8, s8), _ = make_weights("int8", 512, 512, "cuda", gen)

    def f(x):
        return K.int8_linear(K.int4_linear(x, qw, s, z, None, 128, 1024), w8, s8, None)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (1, 3, 16, 100):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), f(x))
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    f(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = f(x)
    x.copy_(torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(y, f(x))


if __name__ == "__main__":  # the child process of `interpreted`: TRITON_INTERPRET=1 is already set
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    results = {c["id"]: c for c in (run_case(case, "cpu") for case in CPU_CASES)}
    print(json.dumps({"cases": results, "layout_control": layout_control("cpu")}))
