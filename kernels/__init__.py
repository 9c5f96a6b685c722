"""Triton kernels of fastnas (installed as ``fastnas.kernels``).

One module per op, holding its ``@triton.jit`` kernels and their launchers, and one of tooling:

* :mod:`fastnas.kernels.mixed_sum` -- the ``triton`` backend of ``torch.ops.fastnas.mixed_sum``.
* :mod:`fastnas.kernels.offline` -- Triton's launch path without a GPU: compiles the kernels for
  a chosen GPU (the tests check every variant's PTX and resources) and measures the host time of
  a call with the launch stubbed.

Nothing is imported here, so ``import fastnas`` never imports Triton; :mod:`fastnas.backend`
imports the op module the first time the ``triton`` backend is used.
"""
