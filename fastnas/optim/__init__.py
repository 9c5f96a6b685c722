"""Optimizers for architecture parameters: :class:`GAEA` (exponentiated gradient on the simplex)."""

from fastnas.optim.gaea import GAEA, simplex_normalize

__all__ = ["GAEA", "simplex_normalize"]
