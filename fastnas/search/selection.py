"""Random architectures for random search with weight sharing (RS-WS), as one-hot architecture weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def random_architectures(space: str, net: nn.Module, count: int, gen: torch.Generator) -> list[list[Tensor]]:
    """``count`` uniformly random architectures of ``space`` as lists of one-hot tensors shaped like
    ``net.arch_parameters()`` (simplex parametrisation, no partial-channel edge weights).

    NAS-Bench-201: one op per edge, ``none`` included (the benchmark's 15,625 cells). DARTS: each
    intermediate node keeps two distinct input edges with one non-``none`` op each, all its other
    edges carry ``none`` (a genotype, read back unchanged by ``net.export()``).
    """
    params = list(net.arch_parameters())
    if space == "nb201":
        from fastnas.spaces.nb201 import PRIMITIVES
    else:
        from fastnas.spaces.darts import PRIMITIVES
    none = PRIMITIVES.index("none")
    archs = []
    for _ in range(count):
        arch = []
        for p in params:
            rows, ops = p.shape[-2], p.shape[-1]
            w = torch.zeros(rows, ops, dtype=p.dtype)
            if space == "nb201":
                w[torch.arange(rows), torch.randint(0, ops, (rows,), generator=gen)] = 1.0
            else:
                real_ops = [k for k in range(ops) if k != none]
                start, n_in = 0, 2
                while start < rows:
                    keep = torch.randperm(n_in, generator=gen)[:2] + start
                    w[start : start + n_in, none] = 1.0
                    for e in keep.tolist():
                        w[e, none] = 0.0
                        w[e, real_ops[int(torch.randint(0, len(real_ops), (1,), generator=gen))]] = 1.0
                    start, n_in = start + n_in, n_in + 1
            arch.append(w.reshape(p.shape).to(p.device))
        archs.append(arch)
    return archs


def space_size(space: str) -> int | None:
    """How many architectures ``space`` holds, where they can be counted (NAS-Bench-201: 15,625)."""
    if space == "nb201":
        from fastnas.spaces.nb201 import PRIMITIVES

        return len(PRIMITIVES) ** 6
    return None  # DARTS: about 10^18 cells per cell type


def random_nb201_archs(count: int, gen: torch.Generator) -> list[str]:
    """``count`` distinct uniformly random NAS-Bench-201 cells (one op per edge, ``none`` included),
    as architecture strings, drawn from ``gen``."""
    from fastnas.spaces.nb201 import PRIMITIVES, format_arch_string

    if not 1 <= count <= len(PRIMITIVES) ** 6:
        raise ValueError(f"count must lie in [1, {len(PRIMITIVES) ** 6}], got {count}")
    seen: dict[str, None] = {}
    while len(seen) < count:
        ops = torch.randint(0, len(PRIMITIVES), (6,), generator=gen).tolist()
        nodes = [[(PRIMITIVES[ops[i * (i - 1) // 2 + j]], j) for j in range(i)] for i in range(1, 4)]
        seen.setdefault(format_arch_string(nodes), None)
    return list(seen)


def nb201_one_hot(arch: str, edge_keys: list[str]) -> Tensor:
    """The one-hot op weights ``[len(edge_keys), 5]`` (rows in ``edge_keys`` order, ``"i<-j"``) of a
    NAS-Bench-201 string: fixes a supernet's ``alphas`` (simplex mode) to that cell."""
    from fastnas.spaces.nb201 import PRIMITIVES, parse_arch_string

    w = torch.zeros(len(edge_keys), len(PRIMITIVES))
    for i, node in enumerate(parse_arch_string(arch), start=1):
        for op, j in node:
            w[edge_keys.index(f"{i}<-{j}"), PRIMITIVES.index(op)] = 1.0
    return w
