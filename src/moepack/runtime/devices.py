"""Device names: one parser for `load(device=...)` and `moepack convert --device`, so both
refuse the same names for the same reasons in the same words (convert depends on runtime, not
the other way round, so it lives here)."""

from __future__ import annotations

import torch

from moepack.errors import CompatibilityError, UsageError


def check_device(device: str | torch.device, *, only: str, hint: str) -> torch.device:
    """`device` as a torch device that moepack can use here, or a refusal saying what can.

    moepack places tensors on the CPU or on CUDA GPUs only; `only` says so in the caller's
    terms (what it does there) and `hint` is what to do instead, e.g. use the CPU. A name torch
    does not parse or a device type moepack does not use is a `UsageError`; CUDA asked of a torch
    or machine without it (or a GPU index past the visible ones) a `CompatibilityError`.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(
            f"device {device!r} is not a device name: use cpu, cuda or cuda:N", found=str(device)
        ) from None
    name = str(dev)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UsageError(f"device {name!r}: {only}; {hint}", found=name)
    if not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA (GPUs need a CUDA build)"
            if torch.version.cuda is None
            else f"no CUDA GPU is visible to this torch ({torch.__version__}; check "
            "CUDA_VISIBLE_DEVICES and the driver)"
        )
        raise CompatibilityError(f"device {name!r}: {why}; available: cpu; {hint}", found=name)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise CompatibilityError(
            f"device {name!r}: only {count} CUDA device(s) visible "
            f"({', '.join(f'cuda:{i}' for i in range(count))})",
            found=name,
        )
    return dev
