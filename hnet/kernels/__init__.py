"""Kernels: Pallas row gather (TPU Mosaic / GPU Triton) with jnp references beside them; blockwise attention
for XLA:CPU (blockwise_attention.py)."""

from hnet.kernels.gather_rows import (
        default_backend,
        gather_rows,
        gather_rows_sharded,
        reference_gather_rows,
)

__all__ = ["default_backend", "gather_rows", "gather_rows_sharded", "reference_gather_rows"]
