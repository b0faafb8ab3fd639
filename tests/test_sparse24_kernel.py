"""2:4 sparse kernels (hf_accel.kernels.sparse24) and the prune plugin's compressed module that uses them.

Kernel cases poison the output (NaN) before the launch, then check that every element was written and that
‖y − ref‖ / ‖ref‖ stays within what bf16 / fp16 allow, ref computed in float64 from the exactly decompressed weight.
On the CPU they run under TRITON_INTERPRET=1, which must be set before the kernels are decorated, so in one child
process (`python tests/test_sparse24_kernel.py` prints the results as JSON), together with the model-level check of
the kernel path (a tiny Llama pruned 2:4 in bf16: compressed module through the interpreted kernel vs the dense
pruned weights, and save / reload). The `gpu` cases run the same on CUDA, plus the 8B shapes, torch.compile and a
CUDA graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# (kernel, dtype, M, N, K, config overrides): odd N (rows past the last block), K not a multiple of the K block
# (masked groups), split-K with a ragged last split, both accumulator shapes, dot with M < 16 (padded rows)
CPU_CASES = [
    # "mma": M = 1 padded to 16 (BN 32 / 2 warps), a full wgmma-shaped tile, odd N with split-K, a masked K tail
    # (224 = 7 meta words, 4 steps of 16 groups), the smallest step (8 groups = one meta word) with 3 splits, 64 rows
    ("mma", "bf16", 1, 64, 256, dict(block_n=32, block_k=64, block_m=16, num_warps=2)),
    ("mma", "bf16", 16, 64, 512, dict(block_n=64, block_k=256, block_m=16, num_warps=4)),
    ("mma", "bf16", 32, 130, 512, dict(block_n=32, block_k=128, block_m=32, split_k=2)),
    ("mma", "fp16", 20, 48, 224, dict(block_n=16, block_k=64, block_m=32)),
    ("mma", "bf16", 3, 40, 96, dict(block_n=16, block_k=32, block_m=16, split_k=3)),
    ("mma", "bf16", 64, 64, 256, {}),
    # "mma_xa" (x the A operand, W^T the B operand): wgmma-sized 64 rows for M = 1, mma.sync sizes, split-K, K tail
    ("mma_xa", "bf16", 1, 64, 256, dict(block_n=64, block_k=128, block_m=64, num_warps=4)),
    ("mma_xa", "bf16", 16, 64, 512, dict(block_n=64, block_k=256, block_m=16, num_warps=4)),
    ("mma_xa", "bf16", 32, 130, 512, dict(block_n=32, block_k=128, block_m=64, split_k=2)),
    ("mma_xa", "fp16", 20, 48, 224, dict(block_n=16, block_k=64, block_m=32)),
    ("xsel", "bf16", 1, 64, 128, dict(block_n=8, block_k=64)),
    ("xsel", "bf16", 3, 37, 136, dict(block_n=8, block_k=32, block_m=4, split_k=2)),
    ("xsel", "fp16", 2, 33, 200, dict(block_n=4, block_k=64, block_m=2, acc3=False)),
    ("xsel", "bf16", 1, 256, 512, dict(block_n=8, block_k=128, split_k=3)),
    ("planes", "bf16", 5, 40, 264, dict(block_n=4, block_k=64, block_m=8, split_k=3)),
    ("planes", "fp16", 3, 24, 128, dict(block_n=8, block_k=128, block_m=4, acc3=False)),
    ("dot", "bf16", 16, 64, 256, dict(block_n=32, block_k=64, block_m=16)),
    ("dot", "bf16", 32, 130, 512, dict(block_n=32, block_k=128, block_m=32, split_k=2)),
    ("dot", "fp16", 20, 48, 200, dict(block_n=16, block_k=64, block_m=16, split_k=2)),
    ("dot", "bf16", 3, 40, 128, dict(block_n=16, block_k=64, block_m=16)),
    # the op with its default dispatch (mma; K % 32 != 0: xsel / planes / dot; dense), with a bias
    ("op", "bf16", 1, 256, 512, {}),
    ("op", "bf16", 3, 128, 256, {}),
    ("op", "bf16", 16, 96, 136, {}),
    ("op", "bf16", 2, 64, 136, {}),
    ("op", "bf16", 32, 256, 512, {}),
    ("op", "fp16", 7, 64, 128, {}),
    ("op", "bf16", 70, 64, 128, {}),
]
TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def case_id(case) -> str:
    kind, dt, m, n, k, cfg = case
    return f"{kind}-{dt}-m{m}-n{n}-k{k}" + "".join(f"-{a}{b}" for a, b in sorted(cfg.items()))


def pruned_24(n: int, k: int, gen: torch.Generator, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [n, k] weight pruned 2:4 by magnitude, and its mask."""
    w = torch.randn(n, k, generator=gen).to(dtype)
    score = w.float().abs().reshape(n, k // 4, 4)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(2, dim=-1).indices, True).reshape(n, k)
    return w * keep, keep


def run_case(case, device: str, seed: int = 0) -> dict:
    from hf_accel.kernels import sparse24 as S
    from hf_accel.kernels._base import LaunchConfig

    kind, dt, m, n, k, over = case
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(seed)
    w, _ = pruned_24(n, k, gen, dtype)
    values, meta = S.compress_24(w)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if kind == "op" or m % 2 else None
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    values, meta, xd = values.to(device), meta.to(device), x.to(device)
    bd = None if bias is None else bias.to(device)
    if kind == "op":
        y = S.sparse24_linear(xd, values, meta, bd)
    else:
        defaults = S._DEFAULTS[kind](m, n, k, 132).as_dict()
        out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
        y = S.sparse24_launch(xd, values, meta, bd, kind, LaunchConfig(**{**defaults, **over}), out=out)
        assert y.data_ptr() == out.data_ptr()
    y = y.cpu().double()
    return {"id": case_id(case), "shape": list(y.shape), "unwritten": int(y.isnan().sum()),
            "rel_err": ((y - ref).norm() / ref.norm()).item()}


def every_position_pair() -> dict:
    """A weight whose groups cycle through all six kept-position pairs (and one group with a single nonzero, one all
    zero) through "mma" and "mma_xa": each pair's masks and shifts in `_expand_24` are exercised on purpose."""
    from hf_accel.kernels import sparse24 as S
    from hf_accel.kernels._base import LaunchConfig

    gen = torch.Generator().manual_seed(8)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    n, k = 16, 128
    w = torch.zeros(n, k)
    for r in range(n):
        for g in range(k // 4):
            for p in pairs[(r * 7 + g) % 6]:
                w[r, 4 * g + p] = torch.randn(1, generator=gen).item()
    w[0, 4:8] = torch.tensor([0.0, 0.0, 3.0, 0.0])
    w[1, 8:12] = 0.0
    w = w.to(torch.bfloat16)
    values, meta = S.compress_24(w)
    x = torch.randn(2, k, generator=gen).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    res = {}
    for kind, bm in (("mma", 16), ("mma_xa", 64)):
        cfg = LaunchConfig(block_n=16, block_k=64, block_m=bm, num_warps=1)
        y = S.sparse24_launch(x, values, meta, None, kind, cfg).double()
        res[kind] = ((y - ref).norm() / ref.norm()).item()
    return res


def mma_split_paths() -> dict:
    """The "mma" kernel's two split-K reductions on one case: in-kernel (the last program of each tile sums the
    partials; the tile counters must be back at zero afterwards, and a second launch must give the same bits) and
    two launches (MMA_FIXUP off)."""
    from hf_accel.kernels import sparse24 as S
    from hf_accel.kernels._base import LaunchConfig

    gen = torch.Generator().manual_seed(7)
    w, _ = pruned_24(72, 512, gen, torch.bfloat16)
    values, meta = S.compress_24(w)
    x = torch.randn(5, 512, generator=gen).to(torch.bfloat16)
    bias = torch.randn(72, generator=gen).to(torch.bfloat16)
    cfg = LaunchConfig(block_n=32, block_k=64, block_m=16, num_warps=2, split_k=4)
    ref = x.double() @ w.double().T + bias.double()
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()
    first = S.sparse24_launch(x, values, meta, bias, "mma", cfg)
    counters = S._TILE_COUNTERS[x.device]
    res = {"fixup_rel_err": err(first), "counters_zero": int(counters.abs().sum()) == 0,
           "repeat_identical": bool(torch.equal(S.sparse24_launch(x, values, meta, bias, "mma", cfg), first))}
    S.MMA_FIXUP = False
    try:
        res["two_launch_rel_err"] = err(S.sparse24_launch(x, values, meta, bias, "mma", cfg))
    finally:
        S.MMA_FIXUP = True
    return res


def bf16_llama():
    """The tiny Llama in bf16 as from_pretrained(dtype=bf16) builds it: parameters bf16, rotary buffers fp32."""
    from conftest import build

    model = build("llama")
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to(torch.bfloat16)
    for name, b in buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, b)
    return model


def model_kernel_path(tmpdir: str) -> dict:
    """Tiny Llama pruned 2:4 (magnitude), bf16: logits through the compressed modules (interpreted kernel for
    inputs of <= kernel_rows rows) against the same model with the dense pruned weights, and after save/reload."""
    from transformers import AutoModelForCausalLM

    import hf_accel
    from hf_accel.kernels import sparse24 as S
    from hf_accel.plugins.pruning.sparse24 import Sparse24Linear
    from conftest import sample_ids

    model = bf16_llama()
    hf_accel.apply(model, "prune(method=magnitude, pattern=2:4, progress=false)")
    twin = bf16_llama()
    names = [name for name, mod in model.named_modules() if isinstance(mod, Sparse24Linear)]
    for name in names:
        twin.get_submodule(name).weight.data.copy_(model.get_submodule(name).dense_weight())
    launches = []
    launch = S.sparse24_launch
    S.sparse24_launch = lambda *a, **kw: launches.append(a[4]) or launch(*a, **kw)
    res = {"sparse_modules": len(names), "rel_err": {}}
    try:
        with torch.no_grad():
            for b, t in ((1, 1), (1, 5), (2, 8)):  # 1, 5 and 16 rows: "mma" (all shapes have K % 32 == 0)
                ids = sample_ids(b, t)
                got, want = model(ids).logits.double(), twin(ids).logits.double()
                res["rel_err"][f"{b}x{t}"] = ((got - want).norm() / want.norm()).item()
            ids = sample_ids(2, 8)
            before = model(ids).logits
            model.save_pretrained(os.path.join(tmpdir, "m"))
            again = AutoModelForCausalLM.from_pretrained(os.path.join(tmpdir, "m"), dtype=torch.bfloat16)
            res["reloaded_sparse_modules"] = sum(isinstance(m, Sparse24Linear) for m in again.modules())
            res["reload_identical"] = bool(torch.equal(again(ids).logits, before))
    finally:
        S.sparse24_launch = launch
    res["kinds"] = sorted(set(launches))
    res["launches"] = len(launches)
    return res


# ---------------------------------------------------------------------------------------------------------------
# CPU: the Triton interpreter, in a child process
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path_factory.mktemp("s24"))], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_interpreted_kernel_matches_reference(interpreted, case):
    got = interpreted["cases"][case_id(case)]
    assert got["unwritten"] == 0, got
    assert got["rel_err"] < TOLERANCE[case[1]], got
    assert got["shape"] == [case[2], case[3]]


def test_interpreted_model_through_kernel(interpreted):
    """The compressed modules of a 2:4-pruned tiny Llama run the kernel ("mma" at 1, 5 and 16 rows) and give
    the dense pruned model's logits within bf16 tolerance; the artifact reloads to identical logits."""
    got = interpreted["model"]
    assert got["sparse_modules"] == 14 and got["reloaded_sparse_modules"] == 14, got
    assert got["kinds"] == ["mma"] and got["launches"] >= 3 * 14, got
    assert max(got["rel_err"].values()) < 2e-2, got
    assert got["reload_identical"], got


def test_interpreted_mma_every_position_pair(interpreted):
    assert all(err < 1e-2 for err in interpreted["pairs"].values()), interpreted["pairs"]


def test_interpreted_mma_split_k_both_reductions(interpreted):
    got = interpreted["mma_split"]
    assert got["fixup_rel_err"] < 1e-2 and got["two_launch_rel_err"] < 1e-2, got
    assert got["counters_zero"] and got["repeat_identical"], got


# ---------------------------------------------------------------------------------------------------------------
# CPU, in process: format, refusals, the reference path, the op's registration
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_roundtrip_exact(dtype):
    from hf_accel.kernels.sparse24 import compress_24, decompress_24

    gen = torch.Generator().manual_seed(3)
    w, keep = pruned_24(24, 136, gen, dtype)
    w[0, :8] = 0  # groups with fewer than two nonzeros: stored as kept zeros
    w[1, 4] = 0
    for v, m in (compress_24(w), compress_24(w, keep)):
        assert v.shape == (24, 68) and v.dtype == dtype and m.shape == (24, 17) and m.dtype == torch.uint8
        assert torch.equal(decompress_24(v, m), w)


def test_meta_layout():
    """Value i of a row: group i // 2, position in bits 2·(i % 4) of meta byte i // 4; p0 < p1 per group."""
    from hf_accel.kernels.sparse24 import compress_24

    w = torch.zeros(1, 8)
    w[0, [1, 3, 4, 6]] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # group 0 keeps columns 1, 3; group 1 keeps 0, 2
    v, m = compress_24(w)
    assert v.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert m.tolist() == [[1 | 3 << 2 | 0 << 4 | 2 << 6]]
    w = torch.zeros(1, 8)
    w[0, 2] = 5.0  # one nonzero: the other kept slot is the lowest free position (0), kept as a zero
    v, m = compress_24(w)
    assert v.tolist() == [[0.0, 5.0, 0.0, 0.0]] and m.tolist() == [[0 | 2 << 2 | 0 << 4 | 1 << 6]]


def test_compress_refuses_non_24():
    from hf_accel.kernels.sparse24 import compress_24

    gen = torch.Generator().manual_seed(4)
    with pytest.raises(ValueError, match="not 2:4 sparse.*row 0, columns 0..3"):
        compress_24(torch.randn(4, 16, generator=gen))  # dense
    w, keep = pruned_24(4, 16, gen)
    w2 = w.clone()
    w2[2, 9] = w2[2, 8] = w2[2, 10] = 1.0  # three nonzeros in one group
    with pytest.raises(ValueError, match="1 of 16 groups.*row 2, columns 8..11"):
        compress_24(w2)
    with pytest.raises(ValueError, match="divisible by 8"):
        compress_24(torch.zeros(4, 12))
    with pytest.raises(ValueError, match="2-D"):
        compress_24(torch.zeros(16))
    with pytest.raises(ValueError, match="nonzeros where the 2:4 mask prunes"):
        compress_24(w, ~keep)
    bad = keep.clone()
    bad[0, :4] = True
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        compress_24(w, bad)


def test_op_cpu_is_the_reference(monkeypatch):
    """Without TRITON_INTERPRET the op is the torch reference (exactly), for half and fp32 inputs; opcheck passes."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from hf_accel.kernels.sparse24 import decompress_24, sparse24_linear, sparse24_linear_ref

    gen = torch.Generator().manual_seed(5)
    w, _ = pruned_24(40, 64, gen, torch.bfloat16)
    from hf_accel.kernels.sparse24 import compress_24

    v, m = compress_24(w)
    b = torch.randn(40, generator=gen).to(torch.bfloat16)
    for x in (torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16), torch.randn(5, 64, generator=gen)):
        y = sparse24_linear(x, v, m, b)
        assert y.shape == (*x.shape[:-1], 40) and y.dtype == x.dtype
        assert torch.equal(y, sparse24_linear_ref(x, v, m, b))
        assert torch.equal(y, F.linear(x, decompress_24(v, m).to(x.dtype), b.to(x.dtype)))
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.hf_accel.sparse24_linear.default, (x, v.float(), m, b.float()))
    sparse24_linear(x, v.float(), m, None).sum().backward()
    torch.testing.assert_close(x.grad, decompress_24(v, m).float().sum(0).expand(3, 64))


def test_module_state_is_compressed_and_matches_dense_fp32(tmp_path):
    """A tiny Llama pruned 2:4: every pruned linear keeps only values + meta (0.5625x the bf16 bytes, no dense
    copy), gives the dense pruned model's logits in fp32 and saves / reloads to identical logits."""
    from transformers import AutoModelForCausalLM

    import hf_accel
    from hf_accel.plugins.pruning.sparse24 import Sparse24Linear
    from conftest import build, sample_ids

    model = build("llama")
    dense_params = sum(p.numel() for p in model.parameters())
    hf_accel.apply(model, "prune(method=magnitude, pattern=2:4, progress=false)")
    twin = build("llama")
    mods = {n: m for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}
    assert len(mods) == 14
    for name, mod in mods.items():
        assert set(dict(mod.named_parameters())) == {"weight", "weight_meta"} and not list(mod.buffers())
        assert mod.weight.shape == (mod.out_features, mod.in_features // 2)
        assert mod.weight_meta.shape == (mod.out_features, mod.in_features // 8)
        dense = mod.dense_weight()
        assert ((dense.reshape(dense.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
        twin.get_submodule(name).weight.data.copy_(dense)
    pruned = sum(m.in_features * m.out_features for m in mods.values())
    stored = sum(m.weight.numel() * 2 + m.weight_meta.numel() for m in mods.values())  # as bf16 values
    assert stored == pruned * 2 * 0.5625
    assert sum(p.numel() for p in model.parameters()) < dense_params
    ids = sample_ids(2, 12)
    with torch.no_grad():
        got, want = model(ids).logits, twin(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        model.save_pretrained(tmp_path / "m")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        assert sum(isinstance(m, Sparse24Linear) for m in again.modules()) == 14
        assert torch.equal(again(ids).logits, got)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_kernel_rows_option():
    import hf_accel
    from hf_accel.errors import OptionError
    from hf_accel.plugins.pruning.sparse24 import Sparse24Linear
    from conftest import build

    model = build("llama")
    hf_accel.apply(model, "prune(method=magnitude, pattern=2:4, kernel_rows=8, progress=false)")
    assert {m.kernel_rows for m in model.modules() if isinstance(m, Sparse24Linear)} == {8}
    with pytest.raises(OptionError, match="kernel_rows"):
        hf_accel.apply(build("llama"), "prune(method=magnitude, pattern=2:4, kernel_rows=-1, progress=false)")


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------
GPU_CASES = [(kind, "bf16", m, n, k, {}) for kind, m in (("xsel", 1), ("xsel", 4), ("planes", 8), ("dot", 16),
                                                        ("dot", 32)) for n, k in ((1024, 4096), (4096, 14336))]
GPU_CASES += [("mma", "bf16", m, n, k, over) for m in (1, 5, 16, 32) for n, k in ((1024, 4096), (4096, 14336))
              for over in ({}, dict(block_n=64, num_warps=4, split_k=4), dict(block_n=128, num_warps=8, block_k=128))]
GPU_CASES += [("mma_xa", "bf16", m, n, k, over) for m in (1, 16, 32) for n, k in ((1024, 4096), (4096, 14336))
              for over in (dict(block_m=64, block_n=64, block_k=128, num_warps=4, split_k=2),
                           dict(block_n=128, block_k=128, num_warps=8))]
GPU_CASES += [("op", "bf16", m, 14336, 4096, {}) for m in (1, 2, 16, 32, 64, 300)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CPU_CASES + GPU_CASES, ids=case_id)
def test_gpu_kernel_matches_reference(case):
    for seed in (0, 1):  # fresh data twice: a race shows as an error that moves
        got = run_case(case, "cuda", seed)
        assert got["unwritten"] == 0, got
        assert got["rel_err"] < TOLERANCE[case[1]], got


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_op_compiles_and_captures():
    """Under torch.compile(fullgraph, dynamic) the op is opaque (no graph break); a CUDA graph replays it; the
    module takes the kernel for <= 32 rows and the semi-structured tensor above."""
    from hf_accel.kernels.sparse24 import compress_24, sparse24_linear
    from hf_accel.plugins.pruning.sparse24 import Sparse24Linear

    gen = torch.Generator().manual_seed(6)
    w, keep = pruned_24(512, 1024, gen, torch.bfloat16)
    v, m = (t.cuda() for t in compress_24(w))
    f = lambda x: sparse24_linear(x, v, m, None)
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for rows in (1, 3, 16, 100):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
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
    lin = Sparse24Linear.from_dense(w.cuda(), keep.cuda(), None)
    for rows in (1, 32):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(lin(x), f(x))
    assert lin._sparse is None  # the semi-structured copy is built only for > kernel_rows rows
    lin(torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16))
    assert lin._sparse is not None, lin._sparse_error


if __name__ == "__main__":  # the child process of `interpreted`: TRITON_INTERPRET=1 is already set
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    results = {c["id"]: c for c in (run_case(case, "cpu") for case in CPU_CASES)}
    tmp = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    print(json.dumps({"cases": results, "model": model_kernel_path(tmp), "mma_split": mma_split_paths(),
                      "pairs": every_position_pair()}))
