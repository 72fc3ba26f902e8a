"""What this CPU offers int8 inference and bf16 training.

ONNX Runtime multiplies unsigned 8-bit activations by signed 8-bit weights. CPUs with a VNNI-class dot product (AVX-512
VNNI, AVX-VNNI, AMX) sum those products in 32 bits; older AVX2 CPUs sum pairs of them in 16 bits, which saturates for
full-range signed weights, so there int8 weights must use 7 bits (``reduce_range``) or be unsigned. Training runs in bf16 autocast only where the
CPU has native bf16 (:func:`has_native_bf16`).
"""

from __future__ import annotations

import functools
from pathlib import Path

#: /proc/cpuinfo flags of a 32-bit int8 dot product
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: /proc/cpuinfo flags of native bf16 arithmetic (without them PyTorch emulates bf16, several times slower than fp32)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags:")
    return frozenset(line.split(":", 1)[1].split())


@functools.lru_cache(maxsize=1)
def has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU sums int8 products in 32 bits (read from ``/proc/cpuinfo``; False where it cannot be read,
    the safe answer: only 7-bit or unsigned int8 weights are then used)."""
    return not cpu_flags(cpuinfo).isdisjoint(VNNI_FLAGS)


@functools.lru_cache(maxsize=1)
def has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX; False where ``/proc/cpuinfo`` cannot be read)."""
    return not cpu_flags(cpuinfo).isdisjoint(BF16_FLAGS)
