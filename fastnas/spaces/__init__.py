"""Slim supernets of weight-sharing NAS search spaces.

* :mod:`fastnas.spaces.darts` — the DARTS space (8 ops, cells of 4 nodes / 14 edges, normal and
  reduction cells), with PC-DARTS partial channels;
* :mod:`fastnas.spaces.nb201` — the NAS-Bench-201 space (5 ops, cells of 4 nodes / 6 edges).

Each space is a description of its cell (:class:`fastnas.spaces.engine.CellDAG`) plus its modules in
the reference layout; one executor, :mod:`fastnas.spaces.engine`, runs every cell: each node is one
:func:`fastnas.mixed_sum` over its incoming (edge, op) pairs, ``none`` never computed. Both
``Network`` classes share one interface (``arch_parameters()``, ``weight_parameters()``,
``arch_weights()``, ``arch_simplex_segments(p)``, ``export()``, ``edge_labels()``, the ``arch`` /
``sampler`` modes, ``tau`` and ``generator``, ``sample_architecture()`` and ``forward(x,
sample=None)``, ``compute_all_ops``, ``eval_arch`` and ``compile_cells()``; see
:class:`fastnas.spaces._arch.ArchMixin`). What the run side needs of a space is its
:class:`~fastnas.spaces.space.SearchSpace`: :func:`get_space`.
"""

from fastnas.spaces import darts, nb201
from fastnas.spaces.space import SearchSpace

_SPACES: dict[str, SearchSpace] = {s.name: s for s in (nb201.SPACE, darts.SPACE)}


def space_names() -> tuple[str, ...]:
    """The registered spaces' names, the default (``nb201``) first."""
    return tuple(_SPACES)


def get_space(name: str) -> SearchSpace:
    """The :class:`SearchSpace` called ``name``; ValueError naming the known ones otherwise."""
    space = _SPACES.get(name)
    if space is None:
        raise ValueError(f"space must be one of {', '.join(_SPACES)}, got {name!r}")
    return space


def space_of(arch: str) -> SearchSpace:
    """The space whose notation ``arch`` is written in (the default space when none claims it)."""
    return next((s for s in _SPACES.values() if s.looks_like(arch)), next(iter(_SPACES.values())))


__all__ = ["darts", "nb201", "SearchSpace", "get_space", "space_names", "space_of"]
