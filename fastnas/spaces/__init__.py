"""Slim supernets of weight-sharing NAS search spaces.

* :mod:`fastnas.spaces.darts` — the DARTS space (8 ops, cells of 4 nodes / 14 edges, normal and
  reduction cells), with PC-DARTS partial channels;
* :mod:`fastnas.spaces.nb201` — the NAS-Bench-201 space (5 ops, cells of 4 nodes / 6 edges).

Each node of a cell is one :func:`fastnas.mixed_sum` over its incoming (edge, op) pairs; ``none`` is
never computed. Both ``Network`` classes share one interface (``arch_parameters()``,
``weight_parameters()``, ``arch_weights()``, ``arch_simplex_segments(p)``, ``export()``, the
``arch`` / ``sampler`` modes, ``tau`` and ``generator``, ``sample_architecture()`` and
``forward(x, sample=None)``, ``compute_all_ops``, ``eval_arch`` and ``compile_cells()``; see
:class:`fastnas.spaces._arch.ArchMixin`).
"""

from fastnas.spaces import darts, nb201

__all__ = ["darts", "nb201"]
