"""The search driver: algorithms (DARTS, GAEA, PC-DARTS, GDAS, RS-WS), data, the training loop and
the ``fastnas search`` command line. See :func:`run_search` and :mod:`fastnas.search.cli`."""

from fastnas.search.algorithms import ALGORITHMS, Algorithm, get_algorithm, make_arch_optimizer
from fastnas.search.trainer import SearchConfig, SearchError, run_search

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "get_algorithm",
    "make_arch_optimizer",
    "SearchConfig",
    "SearchError",
    "run_search",
]
