"""Networks of one architecture, trained from scratch after a search, and their costs.

* :class:`NetworkCIFAR` (:mod:`fastnas.networks.darts`) — DARTS's evaluation network for a genotype
  (stem, cells, reductions at 1/3 and 2/3 of the depth, auxiliary head, drop path); a drop-in for
  DARTS's ``NetworkCIFAR``;
* :class:`NetworkImageNet` — the same for ImageNet's 224x224 images (three stride-2 stem
  convolutions, DARTS's ImageNet auxiliary head); a drop-in for DARTS's ``NetworkImageNet``;
* :class:`TinyNetwork` (:mod:`fastnas.networks.nb201`) — NAS-Bench-201's network for an architecture
  string; a drop-in for xautodl's ``TinyNetwork``;
* :func:`count_parameters`, :func:`count_macs` — parameters and multiply-adds as the papers report them;
* :func:`for_space` — what ``fastnas train`` builds for a search space's architectures.
"""

from fastnas.networks import darts, nb201
from fastnas.networks.common import TrainedNetworks, count_macs, count_parameters
from fastnas.networks.darts import GENOTYPES, AuxiliaryHeadCIFAR, AuxiliaryHeadImageNet, NetworkCIFAR, NetworkImageNet
from fastnas.networks.nb201 import InferCell, TinyNetwork

_BY_SPACE: dict[str, TrainedNetworks] = {t.space: t for t in (darts.TRAINED, nb201.TRAINED)}


def for_space(name: str) -> TrainedNetworks:
    """The trained networks of the search space ``name``; ValueError naming the spaces that have them."""
    if name not in _BY_SPACE:
        raise ValueError(f"name: no trained networks for the space {name!r}; spaces with them: {', '.join(_BY_SPACE)}")
    return _BY_SPACE[name]


__all__ = [
    "for_space",
    "TrainedNetworks",
    "darts",
    "nb201",
    "NetworkCIFAR",
    "NetworkImageNet",
    "AuxiliaryHeadCIFAR",
    "AuxiliaryHeadImageNet",
    "GENOTYPES",
    "TinyNetwork",
    "InferCell",
    "count_parameters",
    "count_macs",
]
