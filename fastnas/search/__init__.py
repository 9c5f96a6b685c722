"""The search driver: algorithms (DARTS, GAEA, PC-DARTS, GDAS, RS-WS), the search loop and the
``fastnas search`` command line, on the run machinery of :mod:`fastnas.runs`. See :func:`run_search`."""

from fastnas.search.algorithms import ALGORITHMS, Algorithm, get_algorithm, make_arch_optimizer
from fastnas.search.config import SearchConfig, SearchError
from fastnas.search.loop import run_search

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "get_algorithm",
    "make_arch_optimizer",
    "SearchConfig",
    "SearchError",
    "run_search",
]
