"""Compute kernels. Each op has a plain-PyTorch reference with the same signature; GPU versions
(Triton) are selected at build time and tested against the reference."""
