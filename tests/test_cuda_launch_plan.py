"""The host decisions of the CUDA backend (``csrc/cuda/launch_plan.h``), tested on CPU.

``torch.ops.fastnas._cuda_launch_plan`` runs the planning code the CUDA launchers run, compiled into every
build of ``fastnas._C``: vector width, tiles, the units of the weight gradient's fixed-order reduction,
the grid for a given multiprocessor count, the aligned or shifted kernel per alignment, and the launches
for K > 128. No GPU needed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from fastnas import backend

EXTENSION_REASON = backend.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(EXTENSION_REASON is not None, reason=str(EXTENSION_REASON))

THREADS = 256  # threads per block, one 16-byte vector each per tile
GROUP = 8  # inputs whose loads are in flight together
MAX_INPUTS_PER_LAUNCH = 128
MAX_UNITS = 65536

# multiprocessor counts: H100 SXM, H200, A100, A100 MIG 3g.20gb and 1g.5gb
MULTIPROCESSORS = [132, 132, 108, 42, 14]
SUPERNET_SHAPES = [(64, 16, 32, 32), (64, 64, 32, 32), (96, 16, 32, 32), (64, 16, 16, 16)]


class Plan(NamedTuple):
    vector_elements: int
    full_vectors: int
    tail: int
    tiles: int
    tiles_per_unit: int
    units: int
    grid: int
    launches: int
    inputs_per_launch: int
    groups_per_tile: int
    shifted_loads: bool
    shifts: list
    partials_stride: int
    partials_bytes: int
    final_sum_warps_per_input: int


def plan(
    numel: int,
    k: int = 8,
    element_size: int = 4,
    weights_grad: bool = True,
    addresses: list | None = None,
    multiprocessors: int = 132,
    blocks_per_multiprocessor: int = 3,
) -> Plan:
    addresses = [0] * k if addresses is None else addresses
    fields = torch.ops.fastnas._cuda_launch_plan(
        numel, k, element_size, weights_grad, addresses, multiprocessors, blocks_per_multiprocessor
    )
    return Plan(*fields)


@pytest.mark.parametrize("element_size, vector", [(2, 8), (4, 4), (8, 2)])
@pytest.mark.parametrize("numel", [1, 7, 8, 1023, 2048, 4099, 64 * 16 * 32 * 32])
def test_vectors_tiles_and_tail(numel, element_size, vector):
    """16-byte vectors, the last one partial when V does not divide numel; a tile is one vector per thread."""
    p = plan(numel, element_size=element_size)
    assert p.vector_elements == vector
    assert p.full_vectors * vector + p.tail == numel and 0 <= p.tail < vector
    assert p.tiles == math.ceil(math.ceil(numel / vector) / THREADS)


def test_no_elements():
    p = plan(0)
    assert p.tiles == 0 and p.units == 0 and p.grid == 1 and p.partials_stride == 0 and p.partials_bytes == 0


@pytest.mark.parametrize("element_size", [2, 4, 8])
@pytest.mark.parametrize("numel", [1, 1023, 3 * 7 * 33, 2 * 3 * 515 * 517, 1 << 26, (1 << 31) + 5])
def test_reduction_units_do_not_depend_on_the_device(numel, element_size):
    """The weight gradient is reduced per unit of tiles, then over units in order: the units are a function of
    numel and the element size alone, so every grid and multiprocessor count (MIG included) and either
    alignment path gives the same bits."""
    plans = [
        plan(numel, element_size=element_size, multiprocessors=m, blocks_per_multiprocessor=b, addresses=a)
        for m in MULTIPROCESSORS
        for b in (1, 2, 3, 8)
        for a in ([0] * 8, [2 * element_size] * 8)
    ]
    p = plans[0]
    assert all((q.tiles, q.tiles_per_unit, q.units) == (p.tiles, p.tiles_per_unit, p.units) for q in plans)
    assert p.units <= MAX_UNITS
    assert p.tiles_per_unit == max(1, math.ceil(p.tiles / MAX_UNITS))
    assert p.units == math.ceil(p.tiles / p.tiles_per_unit)
    assert (p.units - 1) * p.tiles_per_unit < p.tiles  # no empty unit
    # one [K, units] workspace of partial sums in the accumulation dtype, rows padded to 16-byte vectors
    accumulation_size = 8 if element_size == 8 else 4
    assert p.partials_stride >= p.units and (p.partials_stride - p.units) * accumulation_size < 16
    assert p.partials_stride * accumulation_size % 16 == 0
    assert p.partials_bytes == p.partials_stride * 8 * accumulation_size


def test_without_weights_grad_every_tile_is_a_unit():
    p = plan(1 << 30, weights_grad=False)
    assert p.tiles_per_unit == 1 and p.units == p.tiles and p.partials_bytes == 0


@pytest.mark.parametrize("multiprocessors", MULTIPROCESSORS)
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("numel", [100, 5000, 64 * 16 * 32 * 32, 64 * 64 * 32 * 32, 1 << 26])
def test_grid_is_the_resident_blocks_capped_by_the_work(numel, multiprocessors, blocks):
    p = plan(numel, multiprocessors=multiprocessors, blocks_per_multiprocessor=blocks)
    assert p.grid == max(1, min(p.units, multiprocessors * blocks))


@pytest.mark.parametrize("shape", SUPERNET_SHAPES, ids=str)
@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("multiprocessors", MULTIPROCESSORS)
def test_supernet_sizes_keep_enough_bytes_in_flight(shape, element_size, multiprocessors):
    """At supernet sizes the grid keeps the memory busy: a backward with K >= 8 has g and 8 inputs (9 x 16
    bytes) in flight per thread, and the grid must hold at least 25 KiB per multiprocessor of the device
    (an H200's bandwidth x latency, 4.8 TB/s x ~0.7 us over 132 multiprocessors); every multiprocessor gets
    a block whenever there are as many tiles."""
    numel = math.prod(shape)
    p = plan(numel, element_size=element_size, multiprocessors=multiprocessors, blocks_per_multiprocessor=3)
    assert p.grid >= min(p.tiles, multiprocessors)
    bytes_in_flight = p.grid * THREADS * (1 + GROUP) * 16
    assert bytes_in_flight >= multiprocessors * 25 * 1024, f"{bytes_in_flight / 2**20:.1f} MiB in flight"


@pytest.mark.parametrize(
    "element_size, addresses, shifts",
    [
        (4, [0, 16, 4096], [0, 0, 0]),
        (4, [0, 4, 8, 12, 16], [0, 1, 2, 3, 0]),
        (2, [2, 14, 32], [1, 7, 0]),
        (8, [8, 16, 24], [1, 0, 1]),
    ],
)
def test_shift_per_input(element_size, addresses, shifts):
    """Each input's offset from the previous 16-byte boundary, in elements; one unaligned input (or g) picks
    the shifted kernel, whose aligned inputs still take one 16-byte load per vector."""
    p = plan(4096, k=len(addresses), element_size=element_size, addresses=addresses)
    assert p.shifts == shifts
    assert p.shifted_loads == any(shifts)


def test_stacked_slices_are_shifted_when_their_size_is_not_a_multiple_of_16_bytes():
    """``mixed_sum(stacked)`` reads slices stacked[k]: with numel x element size not a multiple of 16 they
    start off the 16-byte grid, and the call takes the shifted kernel instead of falling back to scalars."""
    numel, element_size = 3 * 7 * 33, 2
    addresses = [k * numel * element_size for k in range(5)]
    p = plan(numel, k=5, element_size=element_size, addresses=addresses)
    assert p.shifted_loads and p.shifts == [(a % 16) // element_size for a in addresses]
    aligned = plan(1024, k=5, element_size=element_size, addresses=[k * 1024 * element_size for k in range(5)])
    assert not aligned.shifted_loads


@pytest.mark.parametrize("shift", range(16))
def test_shifted_vector_bytes(shift):
    """The kernels realign a vector of an unaligned tensor from the two aligned 16-byte vectors around it
    (the same code, run on the CPU): the 16 bytes that start `shift` bytes into the 32."""
    data = torch.randint(0, 256, (32,), dtype=torch.uint8, generator=torch.Generator().manual_seed(shift))
    words = [int.from_bytes(bytes(data[i : i + 4].tolist()), "little") for i in range(0, 32, 4)]
    out = torch.ops.fastnas._cuda_shift_bytes(words, shift)
    assert b"".join(w.to_bytes(4, "little") for w in out) == bytes(data[shift : shift + 16].tolist())


@pytest.mark.parametrize(
    "k, launches, per_launch, groups",
    [
        (1, 1, 1, 1),
        (8, 1, 8, 1),
        (32, 1, 32, 4),
        (33, 1, 33, 5),
        (40, 1, 40, 5),
        (112, 1, 112, 14),
        (128, 1, 128, 16),
        (129, 2, 128, 16),
        (300, 3, 128, 16),
    ],
)
def test_inputs_per_launch(k, launches, per_launch, groups):
    """Up to 128 inputs per launch (their pointers travel in the kernel's arguments), loaded 8 at a time:
    NAS-Bench-201 (K <= 15), DARTS (K <= 40) and K = 112 are one launch each, which reads g once."""
    p = plan(64 * 16 * 32 * 32, k=k)
    assert (p.launches, p.inputs_per_launch, p.groups_per_tile) == (launches, per_launch, groups)
    assert p.partials_bytes == p.partials_stride * per_launch * 4


@pytest.mark.parametrize("k, warps", [(1, 8), (2, 4), (3, 2), (4, 2), (5, 1), (8, 1), (40, 1), (112, 1)])
def test_final_sum_warps_per_input(k, warps):
    """The last block's 8 warps share the rows of unit sums when K < 8, so that few inputs still keep the
    whole block reading (the order of that sum is a function of K and the number of units)."""
    assert plan(64 * 16 * 32 * 32, k=k).final_sum_warps_per_input == warps


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(numel=10, element_size=3), "element_size"),
        (dict(numel=10, element_size=4, addresses=[2] * 8), "multiples of element_size"),
        (dict(numel=-1), "numel"),
        (dict(numel=10, multiprocessors=0), "multiprocessors"),
    ],
)
def test_bad_plan_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(**kwargs)


def test_grid_cap_setting():
    """``_cuda_settings(max_grid)`` caps every CUDA launch's grid (tests of grid independence); 0 lifts it."""
    assert torch.ops.fastnas._cuda_settings() == 0
    try:
        assert torch.ops.fastnas._cuda_settings(7) == 7
        assert torch.ops.fastnas._cuda_settings() == 7
    finally:
        assert torch.ops.fastnas._cuda_settings(0) == 0
    with pytest.raises(ValueError, match="max_grid"):
        torch.ops.fastnas._cuda_settings(-1)
