"""What the kernel modules share: Triton availability (`triton_can_run`), launch configurations, and the dispatch rule.

Every quantized linear goes through one `torch.library.custom_op` per format (`hf_accel::int8_linear`,
`hf_accel::int4_linear`, `hf_accel::fp8_linear`), so torch.compile treats it as one opaque node with a shape-only
fake implementation, and CUDA graphs capture it like any other kernel: a launch allocates its output (from the
graph's pool under capture), picks its configuration from Python integers only, and never asks the device for a
value. Inside the op:

    CUDA, x in bf16/fp16, M rows      M == 1            -> GEMV kernel (CUDA cores, weights streamed once)
                                      2 <= M <= DOT_M   -> tensor-core kernel (W as the MMA's A operand, x^T as B)
                                      M > DOT_M         -> dequantise to x.dtype once, then cuBLAS (prefill)
    anything else (CPU, fp32 x)       plain-torch reference (dequantise, F.linear)

For the shapes measured on the H100 (`tuned.py`, from `scripts/bench_quant.py --tune`) the table names the faster
of the two decode kernels and its block sizes per batch bucket; elsewhere the rule above with the default block
sizes of w8.py / int4.py. Prefill: dequantise + cuBLAS ran at 656-669 TFLOP/s on the 8B MLP shape, a Triton GEMM
at <= 429 (kernels/NOTES.md). DOT_M = 64 is a guess between the measured M = 16 and M = 2048.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:  # triton is optional on the CPU: the references need only torch
    import triton

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

# Largest batch served by the tensor-core decode kernel; above it the prefill path (dequantise + cuBLAS) wins.
DOT_M = int(os.environ.get("HF_ACCEL_QUANT_DOT_M", "64"))
DOT_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes of one launch. For the GEMV kernels `block_m` is 1; `block_k` is in weight elements."""

    block_n: int
    block_k: int
    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 1
    cvt: int | None = None  # w8 kernels: byte -> float conversion (see w8.py); None = the format's default
    split_k: int = 1  # "bgemv" kernels: programs along K (fp32 partials, then one reduce kernel)
    acc3: bool = True  # "bgemv" kernels: keep a [M, N, K] accumulator, reduce once (else reduce every step)

    def as_dict(self) -> dict:
        d = {"block_n": self.block_n, "block_k": self.block_k, "block_m": self.block_m,
             "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.cvt is not None:
            d["cvt"] = self.cvt
        if self.split_k != 1:
            d["split_k"] = self.split_k
        if not self.acc3:
            d["acc3"] = False
        return d


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(x: torch.Tensor) -> bool:
    """Triton is installed and x is where its kernels run: CUDA, or the CPU under TRITON_INTERPRET=1 (tests only).
    Every kernel module falls back to its plain-torch reference elsewhere."""
    return HAS_TRITON and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


def use_triton(x: torch.Tensor) -> bool:
    """Triton for half-precision activations (the kernels' accumulate-in-fp32, round-once contract)."""
    return x.dtype in DOT_DTYPES and triton_can_run(x)


@functools.lru_cache(maxsize=None)
def _fp8_tensor_cores(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_tensor_cores(device: torch.device) -> bool:
    """The CUDA device multiplies fp8 on tensor cores (Ada / Hopper and newer), i.e. `torch._scaled_mm` runs."""
    return _fp8_tensor_cores(device.index or 0)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any number gives the same result
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_key(index: int) -> str:
    name = torch.cuda.get_device_name(index).lower()
    for key in ("h100", "h200", "a100", "l40s", "4090"):
        if key in name:
            return key
    return "other"


SIBLING = {"h200": "h100"}  # same SM (sm_90, 132 SMs, 50 MB L2); only the memory differs


def device_key(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return _device_key(device.index if device.index is not None else torch.cuda.current_device())


def m_bucket(m: int) -> int:
    """Batch sizes that share a tuned configuration: 1, 2, 4, 8, 16, 32, 64."""
    return 1 << max(0, (m - 1).bit_length())


def choose(table: dict, fmt: str, m: int, n: int, k: int, device: torch.device, gemv_default, dot_default,
           gemv_max_m: int = 1) -> tuple[str, LaunchConfig | None]:
    """(kernel, config) for a batch of m rows: the measured choice for (device, format, batch bucket, N, K) when
    the table has one, else the GEMV kernel up to `gemv_max_m` rows, the tensor-core kernel up to DOT_M rows, and
    the prefill path ("dequant": dequantise, then cuBLAS) above."""
    hit = None
    for key in (device_key(device), SIBLING.get(device_key(device))):  # an H200 uses H100 entries until it has its own
        hit = table.get((key, fmt, m_bucket(m), n, k))
        if hit is None and m > DOT_M:  # bucket 0: the measured prefill choice ("dequant" or "dot") for any M > DOT_M
            hit = table.get((key, fmt, 0, n, k))
        if hit is not None:
            break
    if hit is not None:
        hit = dict(hit)
        kind = hit.pop("kernel")
        return kind, (LaunchConfig(**hit) if hit else None)
    if m <= gemv_max_m:
        return "gemv", gemv_default(m, n, k, sm_count(device))
    if m <= DOT_M:
        return "dot", dot_default(m, n, k, sm_count(device))
    return "dequant", None


def bgemv_default(m: int, n: int, sms: int, block_k: int) -> LaunchConfig:
    """Default launch of the "bgemv" kernels (w8, int4, fp4): up to 16 rows of x per program, and split-K doubled
    (at most 8) until the programs cover two waves of the SMs."""
    block_m = max(1, min(16, triton.next_power_of_2(m)))
    block_n = 8 if block_m <= 4 else 4
    split = 1
    while -(-n // block_n) * split < 2 * sms and split < 8:
        split *= 2
    return LaunchConfig(block_n=block_n, block_k=block_k, block_m=block_m, num_warps=4, split_k=split)


def split_plan(k_units: int, step: int, split_k: int) -> tuple[int, int]:
    """(steps per split, splits actually used) so that split_k programs cover k_units in blocks of `step`."""
    steps = -(-k_units // step)
    split_k = max(1, min(split_k, steps))
    per = -(-steps // split_k)
    return per, -(-steps // per)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous [M, K] matrix (a view when it already is one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def dot(a, b, acc, INTERPRET: tl.constexpr):
        """tl.dot, except under TRITON_INTERPRET=1, whose bf16 dot is wrong (triton 3.9: garbage on bf16 operands;
        fp16 and fp32 are right): there the same (already rounded) operands are multiplied in fp32."""
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)
    @triton.jit
    def _splitk_reduce(p_ptr, b_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
        """y[m, n] = sum_s partial[s, m, n] (+ bias[n]), rounded once to y's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)

    def splitk_reduce(partials: torch.Tensor, bias, y: torch.Tensor) -> torch.Tensor:
        """partials fp32 [S, M, N] -> y [M, N] (contiguous)."""
        s, m, n = partials.shape
        block = 1024
        _splitk_reduce[(triton.cdiv(m * n, block),)](partials, bias if bias is not None else partials, y, m * n, n,
                                                      SPLIT=s, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
        return y
else:  # pragma: no cover
    dot = None
    splitk_reduce = None
