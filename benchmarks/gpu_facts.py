"""Machine facts for ``benchmarks/gpu_check.sh``: the card, clocks as read, driver, versions.

The card (name, multiprocessors, memory, L2, compute capability) as torch sees it; the clocks,
driver, power limit and MIG mode as ``nvidia-smi`` reads them (a query only: no setting is changed);
the versions of Python, torch, Triton, nvcc and compute-sanitizer. Written as JSON, with the
architecture to build for in a file of its own.

Run:  python benchmarks/gpu_facts.py --json facts.json --arch-file arch.txt [--dry]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import write_json  # noqa: E402

SMI_FIELDS = (
    "name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
    "power.draw,power.limit,temperature.gpu,mig.mode.current"
)
SMI_FIELDS_BASIC = "name,driver_version,clocks.sm,clocks.mem"


def run_quietly(cmd: list[str], timeout: float = 15) -> str:
    """A command's output, or '' if it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return ""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def smi_query() -> dict:
    """nvidia-smi's reading of the first GPU (clocks as read now), or {} without nvidia-smi. A driver
    that refuses one of the fields gets the basic ones asked alone."""
    for fields in (SMI_FIELDS, SMI_FIELDS_BASIC):
        text = run_quietly(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
        if text:
            values = [v.strip() for v in text.splitlines()[0].split(",")]
            return dict(zip(fields.split(","), values))
    return {}


def tool_version(path: str | None) -> str:
    if not path:
        return "not found"
    lines = [line for line in run_quietly([path, "--version"]).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "not runnable"


def find_tool(name: str) -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (shutil.which(name), os.path.join(cuda_home, "bin", name), f"/usr/local/cuda/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def facts(dry: bool) -> dict:
    import torch

    out = {
        "dry": dry,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cuda_home": os.environ.get("CUDA_HOME", ""),
        "nvcc": tool_version(find_tool("nvcc")),
        "compute_sanitizer": tool_version(find_tool("compute-sanitizer")),
    }
    try:  # the installed version, without the cost of importing it
        out["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        out["triton"] = "not installed"
    if dry:
        out["name"] = f"no GPU (dry run on {platform.machine()} CPU)"
        out["arch"] = "none"
        return out
    props = torch.cuda.get_device_properties(0)
    out.update(
        name=props.name,
        sms=props.multi_processor_count,
        memory_GiB=round(props.total_memory / 2**30, 1),
        l2_MiB=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        capability=f"{props.major}.{props.minor}",
        arch=f"{props.major}.{props.minor}",
        gpus=torch.cuda.device_count(),
        smi=smi_query(),
    )
    return out


def facts_line(f: dict) -> str:
    if f.get("dry"):
        return f"{f.get('name')}; Python {f.get('python')}, torch {f.get('torch')}, triton {f.get('triton')}"
    smi = f.get("smi", {})
    clocks = (
        f"SM clock {smi.get('clocks.sm', '?')} (max {smi.get('clocks.max.sm', '?')}), memory clock "
        f"{smi.get('clocks.mem', '?')} (max {smi.get('clocks.max.mem', '?')}) as read at the start"
        if smi
        else "clocks not read (no nvidia-smi)"
    )
    return (
        f"**{f.get('name')}**: {f.get('sms')} SMs, {f.get('memory_GiB')} GiB, L2 {f.get('l2_MiB')} MiB, "
        f"sm_{str(f.get('capability', '')).replace('.', '')}; driver {smi.get('driver_version', '?')}; {clocks}; "
        f"power limit {smi.get('power.limit', '?')}; MIG {smi.get('mig.mode.current', '?')}.\n"
        f"Python {f.get('python')}, torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), triton {f.get('triton')}, "
        f"nvcc: {f.get('nvcc')}; compute-sanitizer: {f.get('compute_sanitizer')}; {f.get('cpu_count')} CPU cores."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--arch-file", required=True)
    parser.add_argument("--dry", action="store_true", help="no GPU: the versions only")
    args = parser.parse_args(argv)
    f = facts(args.dry)
    write_json(args.json, f)
    Path(args.arch_file).write_text(f["arch"])
    print(facts_line(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
