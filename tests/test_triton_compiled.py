"""The Triton kernels as a GPU would run them, proven without one.

Every kernel variant the launchers of ``kernels/mixed_sum.py`` can pick (each K bucket, dtype,
forward and backward form, in the one configuration each uses) is compiled ahead of time for the
A100 (sm_80) and the H100/H200 (sm_90) through Triton's own launch path, with a driver that
compiles and launches nothing (``tools/triton_offline.py``). Then, per compiled kernel:

* no spills: ``cuobjdump -res-usage`` of the cubin reports no stack frame and no local memory;
* full tiles move 16-byte vectors: the PTX holds a 128-bit global load per vector of every input
  of a tile (``ld.global.v4.b32``, ``ld.global.v2.b64`` for float64) and a 128-bit store per
  vector written;
* 64-bit offsets: the tile index is widened (``mul.wide``) before it is multiplied by the tile size;
* no branch per input, one reduction per backward program: branch and barrier counts stay flat
  as the K bucket grows, one atomic (the arrival counter) when ``dL/dw`` is computed;
* loads in flight (K bucket 8, float32 and bfloat16, read from the SASS): at least 4 of a tile's
  16-byte loads are issued before the first of them is used.

The compile runs in two processes (CI has two cores) without ``TRITON_INTERPRET``, once per test
session (about 80 s of CPU time). The launch keys of the direct launch path are checked against
Triton's own specialisation in a third process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="needs the triton package")

from fastnas import backend  # noqa: E402

if backend.unavailable_reason("triton"):
    pytest.skip(f"the triton backend is unavailable: {backend.unavailable_reason('triton')}", allow_module_level=True)

from fastnas.kernels import mixed_sum as tk  # noqa: E402  (only its tables; interpreted or not)
from triton_offline import in_flight_sample, triton_tool  # noqa: E402

try:
    triton_tool("ptxas"), triton_tool("cuobjdump")
except FileNotFoundError as exc:  # pragma: no cover - every Triton wheel with the NVIDIA backend ships them
    pytest.skip(str(exc), allow_module_level=True)

CAPABILITIES = (80, 90)
SHARDS = 2
ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ROOT / "tools" / "triton_offline.py"  # compiles for a GPU without one


def _name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _key(variant: tk.Variant, capability: int) -> tuple:
    return (
        variant.form,
        _name(variant.dtype),
        variant.kb,
        _name(variant.out_dtype),
        variant.has_do,
        variant.has_dw,
        capability,
    )


def _id(variant: tk.Variant) -> str:
    if variant.form == "forward":
        flags = "" if variant.out_dtype == variant.dtype else f"-to-{_name(variant.out_dtype)}"
    else:
        flags = "-" + "+".join(name for name, on in (("do", variant.has_do), ("dw", variant.has_dw)) if on)
    return f"{variant.form}-{_name(variant.dtype)}-KB{variant.kb}{flags}"


def _compiled_env() -> dict:
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, dict]:
    """Facts of every compiled variant, keyed like :func:`_key`."""
    capabilities = [str(c) for c in CAPABILITIES]
    runs = [
        subprocess.Popen(
            [sys.executable, str(OFFLINE), "--compile", str(shard), str(SHARDS), *capabilities],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_compiled_env(),
            cwd=ROOT,
        )
        for shard in range(SHARDS)
    ]
    facts = []
    for run in runs:
        out, err = run.communicate(timeout=1800)
        assert run.returncode == 0, f"compiling the kernel variants failed:\n{err[-4000:]}"
        facts += json.loads(out.strip().splitlines()[-1])
    return {
        (f["form"], f["dtype"], f["kb"], f["out_dtype"], f["has_do"], f["has_dw"], f["capability"]): f for f in facts
    }


def test_every_variant_is_compiled_for_every_capability(compiled):
    expected = {_key(v, c) for v in tk.launch_variants() for c in CAPABILITIES}
    assert set(compiled) == expected


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("variant", tk.launch_variants(), ids=_id)
def test_compiled_variant(variant, capability, compiled):
    facts = compiled[_key(variant, capability)]
    what = f"{_id(variant)} on sm_{capability}"
    assert facts["stack"] == 0 and facts["local"] == 0, f"{what} spills: {facts}"
    rows = facts["rows_per_thread"]
    if variant.form == "forward":
        loads, stores = rows * variant.kb, rows
    else:
        loads = rows * (1 + variant.kb if variant.has_dw else 1)
        stores = rows * variant.kb if variant.has_do else 0
    assert facts["loads_128"] >= loads, f"{what}: {facts['loads_128']} 128-bit loads, a full tile needs {loads}"
    assert facts["stores_128"] >= stores, f"{what}: {facts['stores_128']} 128-bit stores, a full tile needs {stores}"
    assert facts["wide_tile_offset"], f"{what}: the tile offset is not computed in 64 bits"
    assert facts["branches"] <= 8, f"{what}: {facts['branches']} conditional branches (a branch per input?)"
    if variant.form == "backward" and variant.has_dw:
        # the block-wide reduction and the last program's sum: a fixed handful of barriers, not 2 per input and tile
        assert facts["barriers"] <= 16, f"{what}: {facts['barriers']} barriers"
        assert facts["atomics"] == 1, f"{what}: {facts['atomics']} atomics (only the arrival counter is expected)"
    else:
        assert facts["barriers"] <= 1 and facts["atomics"] == 0, f"{what}: {facts}"


def test_barriers_do_not_grow_with_the_bucket(compiled):
    """The old backward reduced each input across the block: 2 barriers per input and tile."""
    for capability in CAPABILITIES:
        for dtype in ("float32", "bfloat16"):
            barriers = {
                kb: compiled[("backward", dtype, kb, None, True, True, capability)]["barriers"] for kb in (1, 16)
            }
            assert barriers[16] - barriers[1] <= 10, barriers


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("variant", [v for v in tk.launch_variants() if in_flight_sample(v)], ids=_id)
def test_loads_are_in_flight_together(variant, capability, compiled):
    facts = compiled[_key(variant, capability)]
    assert facts["loads_in_flight"] >= 4, f"{_id(variant)} on sm_{capability}: {facts['loads_in_flight']} in flight"


def _launch_keys(*flags: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_launch_keys.py"), *flags],
        capture_output=True,
        text=True,
        env=_compiled_env(),
        cwd=ROOT,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_launch_keys_determine_the_compiled_kernel():
    """The direct launch path reuses a compiled kernel for every call with the same launch key: the
    key must hold everything Triton specialises on. Calls with inputs at every 16-byte alignment,
    K within each bucket, partial tiles or none, one program or many, chunked K: the same key
    never meets two different Triton specialisations. Without the alignment bits it would."""
    result = _launch_keys()
    assert result["calls"] > 400 and result["keys"] < result["calls"] - 50, result  # keys met more than once
    assert result["conflicts"] == [], result["conflicts"]
    assert _launch_keys("--without-alignment")["conflicts"], "the check cannot tell a key that misses alignment"
