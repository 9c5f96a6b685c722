"""Build fastnas and its compiled extension ``fastnas._C``.

The CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) and the CUDA launch planning with its test ops
(``csrc/cuda/*.cpp``, plain C++) are always built. The CUDA kernels
(``csrc/cuda/*.cu``) are added when a CUDA build of torch and a CUDA toolkit are present, or
forced/skipped with ``FASTNAS_CUDA=1`` / ``FASTNAS_CUDA=0`` (force it on a machine with nvcc and
no GPU). ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0"), ``MAX_JOBS`` caps
parallel compiles, ``FASTNAS_CPU_NATIVE=1`` compiles the CPU kernels for this machine's
instruction set (-march=native) instead of the portable default.

Install (see README):  pip install --no-build-isolation -e .
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(ROOT, "README.md")


def _find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the first toolkit root holding lib64/libcudart.so (nvcc on PATH may
    be a wrapper script, which makes torch guess /usr/local)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if os.path.exists(os.path.join(root, "lib64", "libcudart.so")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            return root
    return None


def _want_cuda(torch_module) -> bool:
    switch = os.environ.get("FASTNAS_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    has_toolkit = os.environ.get("CUDA_HOME") is not None
    has_cuda_torch = torch_module.version.cuda is not None
    if switch in ("1", "true", "yes", "on"):
        if not (has_toolkit and has_cuda_torch):
            sys.exit(
                "FASTNAS_CUDA=1 but "
                + ("torch is a CPU-only build" if not has_cuda_torch else "no CUDA toolkit was found (set CUDA_HOME)")
            )
        return True
    return has_toolkit and has_cuda_torch


def extensions():
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cpu_flags = ["-O3", "-fopenmp", "-fno-math-errno"]  # torch adds its own -std
    if os.environ.get("FASTNAS_CPU_NATIVE") == "1":
        cpu_flags.append("-march=native")
    # csrc/cuda/*.cpp: the CUDA launch planning's test ops, plain C++, built with or without CUDA
    sources = [path for folder in ("csrc", "csrc/cpu", "csrc/cuda") for path in sorted(glob.glob(f"{folder}/*.cpp"))]
    common = dict(name="fastnas._C", include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if _want_cuda(torch):
        print(f"fastnas: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        return [
            CUDAExtension(
                sources=sources + sorted(glob.glob("csrc/cuda/*.cu")),
                extra_compile_args={
                    "cxx": cpu_flags,
                    # no --use_fast_math: it flushes float32 subnormals, and the CPU kernels keep them
                    "nvcc": ["-O3", "-lineinfo"],
                },
                **common,
            )
        ]
    print("fastnas: building CPU kernels only (set FASTNAS_CUDA=1 and CUDA_HOME to add CUDA)")
    return [CppExtension(sources=sources, extra_compile_args={"cxx": cpu_flags}, **common)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="fastnas",
    version="0.1.0",
    description="Fused kernels, a slim supernet and the GAEA optimizer for weight-sharing NAS",
    long_description=open(README).read() if os.path.exists(README) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastnas", "fastnas.*"]) + ["fastnas.kernels"],
    package_dir={"fastnas": "fastnas", "fastnas.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "scikit-learn"],
    # torchvision: the image-folder pipeline (--dataset imagenet), imported for that data set only
    extras_require={
        "imagenet": ["torchvision"],
        "ray": ["ray>=2.9"],
        "test": ["pytest", "pytest-benchmark", "ruff", "torchvision"],
    },
    entry_points={"console_scripts": ["fastnas=fastnas.__main__:main"]},
)
