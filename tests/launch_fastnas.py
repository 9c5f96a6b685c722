"""``python tests/launch_fastnas.py <command> ...``: ``python -m fastnas`` for subprocess tests (torchrun),
with the stand-in of ``fastnas.networks`` where that package is missing."""

import importlib.util
import os
import sys

if importlib.util.find_spec("fastnas.networks") is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from stand_in_networks import module

    import fastnas

    sys.modules["fastnas.networks"] = module
    fastnas.networks = module

from fastnas.__main__ import main  # noqa: E402

sys.exit(main())
