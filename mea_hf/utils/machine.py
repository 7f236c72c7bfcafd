"""What a benchmark ran on: CPU model and vector instruction sets, cores, threads, load, library versions.

Timings differ several-fold between 2-core machines that look alike (the same banded calib of SmolLM2-135M took 161 s
on one and 477 s on another, README), so every benchmark's JSON records `machine_info()` next to its numbers.
"""

import os
import platform
from pathlib import Path

# The vector extensions that decide float32 matmul speed on x86 (and NEON/SVE on ARM), as /proc/cpuinfo spells them.
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve", "bf16")
# Native bf16 arithmetic: x86 AVX512-BF16 or AMX, ARM's BF16 extension. Without one, bf16 autocast is emulated.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(CPU model name, the `VECTOR_FLAGS` it has) from the text of /proc/cpuinfo (x86 or ARM)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model name") or fields.get("Hardware") or platform.machine()
    return model, [flag for flag in VECTOR_FLAGS if flag in flags]


def read_cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, or None where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def lacks_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when /proc/cpuinfo (or the given text of it) names no native bf16 arithmetic; False when it is unreadable."""
    cpuinfo = cpuinfo if cpuinfo is not None else read_cpuinfo()
    return cpuinfo is not None and not set(parse_cpuinfo(cpuinfo)[1]) & set(NATIVE_BF16_FLAGS)


def machine_info() -> dict:
    """CPU model, vector flags, logical cores, torch threads, 1-minute load average now, torch/transformers versions."""
    import torch
    import transformers

    cpuinfo = read_cpuinfo()
    model, flags = parse_cpuinfo(cpuinfo) if cpuinfo is not None else (platform.processor() or platform.machine(), [])
    return {
        "cpu": model, "vector_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0], "torch": torch.__version__, "transformers": transformers.__version__,
    }  # fmt: skip


def describe_machine(info: dict) -> str:
    """One line for a benchmark's printout, e.g. "AMD EPYC (avx2), 2 cores, 2 torch threads, load 0.12"."""
    flags = f" ({', '.join(info['vector_flags'])})" if info["vector_flags"] else ""
    return (f"{info['cpu']}{flags}, {info['cores']} cores, {info['torch_threads']} torch threads, "
            f"load {info['load_average_1min']:.2f}")  # fmt: skip
