"""Facts about the machine a benchmark ran on: CPU, cores, ISA extensions, OS and library versions.

Latency means little without them: INT8 speed-ups depend on VNNI/AMX (x86) or the dot-product
extension (Arm), and a number from a 2-core VM is not one from a phone. Read from
``/proc/cpuinfo`` on Linux and ``sysctl`` on macOS; a fact that cannot be read is ``None``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from edgekd.versions import library_versions

#: ISA extensions that decide which kernels a runtime can use (name as Linux reports it)
ISA_FLAGS: tuple[str, ...] = (
    # x86: FP32 SIMD width, then INT8 dot products (VNNI) and matrix tiles (AMX)
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    # Arm: NEON, dot product (INT8), FP16 arithmetic, INT8 matrix multiply, BF16, SVE
    "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2",
)

#: macOS (Apple silicon) sysctl names for the same Arm features
_MACOS_FEATURES = {"asimddp": "hw.optional.arm.FEAT_DotProd", "i8mm": "hw.optional.arm.FEAT_I8MM",
                   "bf16": "hw.optional.arm.FEAT_BF16", "asimdhp": "hw.optional.arm.FEAT_FP16"}

#: packages whose versions change the numbers
def _cpuinfo() -> tuple[str | None, set[str], int | None]:
    """(model name, flags, physical cores) from /proc/cpuinfo (Linux on x86 and Arm)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None, set(), None
    model: str | None = None
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    physical_id = "0"
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model", "Hardware", "cpu model") and model is None and value:
            model = value
        elif key in ("flags", "Features"):  # x86 says "flags", Arm says "Features"
            flags.update(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    if model is None:  # Arm kernels often omit the model name: use the implementer/part codes
        model = platform.processor() or None
    return model, flags, len(cores) or None


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _macos() -> tuple[str | None, set[str], int | None]:
    model = _sysctl("machdep.cpu.brand_string")
    flags = {"asimd"} if platform.machine() == "arm64" else set()
    flags |= {flag for flag, key in _MACOS_FEATURES.items() if _sysctl(key) == "1"}
    x86 = (_sysctl("machdep.cpu.features") or "") + " " + (_sysctl("machdep.cpu.leaf7_features") or "")
    flags |= {f.lower().replace(".", "_") for f in x86.split()}
    physical = _sysctl("hw.physicalcpu")
    return model, flags, int(physical) if physical and physical.isdigit() else None


def _torch_cpu_capability() -> str | None:
    """The SIMD level PyTorch's CPU kernels dispatch to (e.g. "AVX2", "AVX512", "DEFAULT")."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError, RuntimeError):
        return None


def machine_facts() -> dict[str, Any]:
    """JSON-able facts: ``cpu_model``, core counts, ``isa`` (each of ``ISA_FLAGS``: true/false), OS, versions."""
    if platform.system() == "Darwin":
        model, flags, physical = _macos()
    else:
        model, flags, physical = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS
        usable = os.cpu_count()
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        # the cores this process may run on (a container or taskset may allow fewer)
        "usable_cores": usable,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "torch_cpu_capability": _torch_cpu_capability(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def isa_summary(facts: dict[str, Any]) -> str:
    """The present ISA extensions as one short line (``avx2 fma avx512f avx512_vnni``)."""
    present = [flag for flag, on in (facts.get("isa") or {}).items() if on]
    return " ".join(present) or "none of the tracked extensions"


def describe_machine(facts: dict[str, Any]) -> str:
    """One line naming the machine, e.g. for a report header."""
    cores = facts.get("usable_cores") or facts.get("logical_cores")
    return (f"{facts.get('cpu_model') or 'unknown CPU'} ({facts.get('arch')}), {cores} usable cores, "
            f"ISA: {isa_summary(facts)}; {facts.get('os')}")
