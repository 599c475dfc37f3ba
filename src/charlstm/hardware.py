"""Choosing the device, the number type and the thread count the run will use.

``auto`` precision picks bf16 autocast where the hardware has native bf16 arithmetic (CUDA GPUs with
bf16 support, CPUs with AVX-512-BF16 or AMX) and fp32 elsewhere, since emulated bf16 is slower than
fp32. The loss is always computed in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

from charlstm.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX-512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(name: str, device: torch.device) -> str:
    if name == "fp32":
        return "fp32"
    has_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if name == "bf16":
        if not has_bf16:
            raise UserError(
                f"--precision bf16 was asked for but this {device.type.upper()} has no native bf16 "
                "units; use --precision fp32 or auto"
            )
        return "bf16"
    if name == "auto":
        return "bf16" if has_bf16 else "fp32"
    raise UserError(f"precision must be auto, fp32 or bf16, got {name!r}")


def autocast(device: torch.device, precision: str):
    """A context that runs matrix products in bf16 when asked, and does nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (all available cores by default); returns the count."""
    n = threads or available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), as calibration keys its speeds and model cards say
    where a base trained; what the platform reports where there is no /proc."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
