"""The run machinery shared by the commands ``fastnas search``, ``train`` and ``rank``.

| module | what |
|---|---|
| :mod:`~fastnas.runs.config` | :class:`RunError`, argument checks, the output directory, ``config.json`` |
| :mod:`~fastnas.runs.checkpoint` | atomic writes, RNG states, checkpoint files |
| :mod:`~fastnas.runs.distributed` | ``torchrun`` / DistributedDataParallel set-up, the device |
| :mod:`~fastnas.runs.data` | the data sets (in memory) and their seeded batches |
| :mod:`~fastnas.runs.engine` | the epoch loop: batches, steps, evaluation, history, resume |
| :mod:`~fastnas.runs.tables` | NAS-Bench-201 accuracy tables (CSV, ``nas_201_api``, ``nats_bench``) |
| :mod:`~fastnas.runs.plots` | the PNGs of a run |
| :mod:`~fastnas.runs.folder` | a run's folder: its owner (a lock), its kind, the resume rules |
| :mod:`~fastnas.runs.sweep` | many independent runs, in this process or as Ray tasks (``--workers``) |
| :mod:`~fastnas.runs.cli` | command lines: one-line errors, shared flags, ``--resume`` from ``config.json`` |
"""

from fastnas.runs.config import RunError

__all__ = ["RunError"]
