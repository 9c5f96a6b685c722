"""Triton kernels of fastnas (installed as ``fastnas.kernels``).

One module per op, holding its ``@triton.jit`` kernels and their launchers:

* :mod:`fastnas.kernels.mixed_sum` -- the ``triton`` backend of ``torch.ops.fastnas.mixed_sum``.

Nothing is imported here, so ``import fastnas`` never imports Triton; :mod:`fastnas.backend`
imports the op module the first time the ``triton`` backend is used.
"""
