"""Mamba-3 kernels: ``contract`` (what every kernel and caller agree on), ``oracle`` (plain torch,
the ground truth), ``shared`` (torch pieces the oracle and the kernel glue both use), ``triton/``
and ``cute/`` (the fused kernels)."""
