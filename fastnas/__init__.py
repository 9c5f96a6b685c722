"""fastnas: fused kernels, a slim supernet and the GAEA optimizer for weight-sharing NAS."""

from fastnas import backend as _backend
from fastnas.backend import available_backends, get_backend, kernel_choices, set_backend, set_kernels
from fastnas.ops import mixed_sum
from fastnas.patching import patch, unpatch

_backend.load_extension()  # registers the compiled kernels if built; never raises

__version__ = "0.1.0"

__all__ = [
    "mixed_sum",
    "set_backend",
    "get_backend",
    "available_backends",
    "set_kernels",
    "kernel_choices",
    "patch",
    "unpatch",
    "__version__",
]
