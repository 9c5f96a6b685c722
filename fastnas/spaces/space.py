"""What the run side (``fastnas search``, ``train``, ``rank``) asks of a search space.

Each space module defines one :class:`SearchSpace` (``darts.SPACE``, ``nb201.SPACE``);
:func:`fastnas.spaces.get_space` finds it by name. Nothing outside a space's module needs to know
which space it runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn


class SearchSpace:
    """The interface of a search space (a subclass implements every method).

    Attributes:
        name: the name ``--space`` takes.
        title: how messages name its networks (``"DARTS"``).
        notation: how messages name its architecture strings (``"a DARTS Genotype(...)"``).
        op_names: the candidate ops, the columns of the op weights.
        example_arch: an architecture string of the space (to check settings with).
        min_cells: the fewest cells ``--cells`` may give its networks.
        stems: the stems its supernet has (``"cifar"``; ``"imagenet"`` for 224x224 images).
        size: how many architectures it holds, where they can be counted (None: too many).

    The networks ``fastnas train`` trains for its architectures are the layer above
    (:func:`fastnas.networks.for_space`).
    """

    name: str
    title: str
    notation: str
    op_names: tuple[str, ...]
    example_arch: str
    min_cells: int = 1
    stems: tuple[str, ...] = ("cifar",)
    size: int | None = None

    # ------------------------------------------------------------------ the supernet

    def build_supernet(
        self,
        *,
        channels: int,
        cells: int,
        num_classes: int,
        in_channels: int,
        arch: str,
        sampler: str | None,
        partial_channels: int = 1,
        stem: str = "cifar",
    ) -> nn.Module:
        """The space's supernet (``arch``, ``sampler``: see :class:`fastnas.spaces._arch.ArchMixin`; its
        ``edge_labels()`` name the rows of a cell's op weights; ``stem="imagenet"`` for 224x224 images,
        where the space has such a stem)."""
        raise NotImplementedError

    def random_architectures(self, net: nn.Module, count: int, gen: torch.Generator) -> list[list[Tensor]]:
        """``count`` uniformly random architectures as one-hot tensors shaped like
        ``net.arch_parameters()`` (simplex parametrisation), drawn from ``gen``."""
        return [
            [
                self.random_weights(p.shape[-2], p.shape[-1], p.dtype, gen).reshape(p.shape).to(p.device)
                for p in net.arch_parameters()
            ]
            for _ in range(count)
        ]

    def random_weights(self, rows: int, ops: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
        """One random architecture's one-hot op weights ``[rows, ops]`` of one cell kind."""
        raise NotImplementedError

    def random_candidates(self, net: nn.Module, count: int, gen: torch.Generator) -> list[tuple[str, list[Tensor]]]:
        """``count`` distinct uniformly random architectures as ``(string, one-hot weights)``."""
        out: dict[str, list[Tensor]] = {}
        while len(out) < count:
            for weights in self.random_architectures(net, count - len(out), gen):
                with torch.no_grad():
                    for p, w in zip(net.arch_parameters(), weights):
                        p.copy_(w.to(p.device))
                out.setdefault(net.export(), weights)
        return list(out.items())

    def candidates(
        self, net: nn.Module, count: int, gen: torch.Generator, pool: Sequence[str] | None = None
    ) -> list[tuple[str, list[Tensor]]]:
        """``count`` distinct architectures as ``(string, one-hot weights per arch parameter)``: drawn
        from ``pool`` (strings of the space) when given, else uniformly from the space."""
        if pool is None:
            return self.random_candidates(net, count, gen)
        pick = torch.randperm(len(pool), generator=gen)[:count].tolist()
        return [(pool[i], self.one_hot(net, pool[i])) for i in pick]

    def one_hot(self, net: nn.Module, arch: str) -> list[Tensor]:
        """The one-hot weights per ``net.arch_parameters()`` that restrict ``net`` to ``arch``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ architectures

    def looks_like(self, arch: str) -> bool:
        """Whether ``arch`` is written in this space's notation (it may still be invalid)."""
        raise NotImplementedError

    def parse(self, arch: str) -> Any:
        """The parsed architecture; ValueError (or TypeError) naming what is wrong."""
        raise NotImplementedError

    def chosen_ops(self, arch: str) -> dict[str, dict[str, str]]:
        """The op each edge of ``arch`` keeps, ``{cell kind: {edge label: op}}`` (the labels of the
        supernet's ``edge_labels()``; edges an architecture drops are left out)."""
        raise NotImplementedError
