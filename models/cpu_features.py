"""Does this CPU run bf16 natively? (decides bf16 autocast vs fp32 on CPU)

``torch.autocast("cpu", dtype=torch.bfloat16)`` is fast only where the CPU has bf16
instructions (AVX512-BF16 or AMX-BF16, e.g. Intel Sapphire Rapids: ResNet50 training
2.7x fp32). Elsewhere PyTorch emulates bf16: on an AMD EPYC (Zen 3, AVX2 only) ResNet50
training ran at 0.5 img/s with autocast against 11 img/s in fp32 (2 threads, 112 px).
``torch.backends.cpu.get_cpu_capability()`` only says "AVX2"/"AVX512", not whether bf16
is native, so the kernel's CPU flags decide. ``FACELAB_CPU_BF16=0/1`` overrides.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_native_bf16() -> bool:
    """True when bf16 autocast on this CPU runs on bf16 hardware, not emulated."""
    override = os.environ.get("FACELAB_CPU_BF16")
    if override in ("0", "1"):
        return override == "1"
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def cpu_precision() -> str:
    """"bf16" or "fp32": what CPU training/inference should use here."""
    return "bf16" if cpu_native_bf16() else "fp32"
