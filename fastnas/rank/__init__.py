"""``fastnas rank``: how well a weight-sharing supernet ranks architectures (rank disorder), on the run
machinery of :mod:`fastnas.runs`: a supernet trained by :mod:`fastnas.search`, ground truth from a
NAS-Bench-201 table or from standalone training by :mod:`fastnas.train`."""

from fastnas.rank.config import RankConfig
from fastnas.rank.run import run_rank

__all__ = ["RankConfig", "run_rank"]
