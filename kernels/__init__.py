"""Triton kernels, each next to the plain-torch reference it is tested against (installed as hf_accel.kernels)."""
