"""Triton kernels, each next to the plain-torch reference it is tested against (installed as hf_accel.kernels).

Quantized linears (weight-only; activations bf16/fp16):
- `w8.py`   int8 per-channel (W8A16) and fp8 e4m3 per-channel: ops `hf_accel::int8_linear`, `hf_accel::fp8_linear`
- `int4.py` int4 group-wise asymmetric (group 32/64/128): op `hf_accel::int4_linear`
- `fp4.py`  MXFP4 / NVFP4 block-scale storage (e2m1 codes), decoded in the kernel: op `hf_accel::fp4_linear`
- `fp8_act.py` fp8 W8A8: per-token dynamic activation scales + `torch._scaled_mm` (prefill), op `hf_accel::fp8_w8a8_linear`
- `sparse24.py` 2:4-sparse weights in compressed storage (values + 2-bit positions) for <= 32 rows: op
  `hf_accel::sparse24_linear` (the prune plugin's decode path; larger inputs use torch's semi-structured tensors)
Decode attention: `decode_attention.py` (quest's selected pages of a bf16 cache) and `kvquant_attention.py`
(kvquant's int8/int4/int2 codes + full-precision ring read in place, op `hf_accel::kvquant_decode_attention`).
Each op runs the Triton kernels on CUDA and the plain-torch reference elsewhere (`_base.py` says which kernel
serves which batch size). Measurements and design notes: NOTES.md.
"""

from . import fp4, fp8_act, int4, tuned, w8
from .fp4 import fp4_dequantize, fp4_linear, quantize_fp4
from .fp8_act import fp8_w8a8_linear, quantize_per_token
from .int4 import int4_dequantize, int4_linear, int4_linear_ref, pack_int4, unpack_int4
from .w8 import fp8_linear, int8_linear, w8_dequantize, w8_linear_ref

for _key, _cfg in tuned.TUNED.items():
    (int4.TUNED if _key[1].startswith("int4") else fp4.TUNED if _key[1] in fp4.FORMATS else w8.TUNED)[_key] = _cfg

__all__ = ["fp4_dequantize", "fp4_linear", "fp8_w8a8_linear", "quantize_fp4", "quantize_per_token", "fp8_linear", "int4_dequantize", "int4_linear", "int4_linear_ref", "int8_linear", "pack_int4",
           "unpack_int4", "w8_dequantize", "w8_linear_ref"]
