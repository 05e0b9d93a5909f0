"""Where a model runs and in which float type: one place that reads `--device` / `--dtype`
and `KEDIT_DEVICE` / `KEDIT_DTYPE`, checks them, and turns them into torch objects.

Devices: `cpu`, `cuda` (the current CUDA device), `cuda:N`, `mps`. Dtypes: `float32`,
`bfloat16`, `float16`. A device this machine does not have, or a name kedit does not know,
is a `DeviceError`: one line for the CLI (no traceback), naming what is missing.

Only the model's weights and activations take the dtype. Editors keep their numerics:
key statistics and the closed-form solves run in float64, MEMIT's target vectors are
float32 tensors, and each update is rounded to the weight's dtype once, when it is added
(`kedit_core/weights.py`), so what the ledger stores replays bit for bit. On a bfloat16
model part of a small update is lost to that rounding (the served weights are what the
ledger replays, exactly); the per-batch update gate, which reads each batch's change off
the weights, is refused there.
"""
from __future__ import annotations

import os
import re

import torch

from kedit_core.errors import KeditError

DEVICE_ENV = "KEDIT_DEVICE"
DTYPE_ENV = "KEDIT_DTYPE"
DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "float32"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = f"Device to load the model on: cpu, cuda, cuda:N or mps (default: ${DEVICE_ENV}, else cpu)."
DTYPE_HELP = f"Model weights' type: float32, bfloat16 or float16 (default: ${DTYPE_ENV}, else float32)."

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


class DeviceError(KeditError):
    """A device or dtype that is unknown or not present on this machine."""


def device_name(value: str | torch.device | None = None) -> str:
    """The device asked for, as text: `value`, else $KEDIT_DEVICE, else cpu (not checked)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        value = os.environ.get(DEVICE_ENV, "").strip() or DEFAULT_DEVICE
    return str(value).strip().lower()


def dtype_name(value: str | torch.dtype | None = None) -> str:
    """The dtype asked for, as text: `value`, else $KEDIT_DTYPE, else float32 (not checked)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        value = os.environ.get(DTYPE_ENV, "").strip() or DEFAULT_DTYPE
    return str(value).strip().lower().removeprefix("torch.")


def check_names(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> tuple[str, str]:
    """(device, dtype) as text, refusing unknown names (not whether the device is present):
    what settings check up front, on a machine that may not be the one that runs them."""
    dev, dt = device_name(device), dtype_name(dtype)
    m = _DEVICE_RE.match(dev)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"unknown device {dev!r}: use cpu, cuda, cuda:N or mps (--device or ${DEVICE_ENV})")
    if dt not in DTYPES:
        raise DeviceError(f"unknown dtype {dt!r}: use {', '.join(DTYPES)} (--dtype or ${DTYPE_ENV})")
    return dev, dt


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device asked for, refused unless this machine has it."""
    dev, _ = check_names(device, None)
    kind, index = _DEVICE_RE.match(dev).groups()  # type: ignore[union-attr]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {dev!r} asked for, but torch {torch.__version__} sees no CUDA GPU on this "
                              f"machine (use --device cpu, or set {DEVICE_ENV}=cpu)")
        n = torch.cuda.device_count()
        if index is not None and int(index) >= n:
            raise DeviceError(f"device {dev!r} asked for, but this machine has {n} CUDA GPU(s): cuda:0"
                              + (f" to cuda:{n - 1}" if n > 1 else ""))
        return torch.device(dev)
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device 'mps' asked for, but torch {torch.__version__} has no Apple MPS device here "
                              "(use --device cpu)")
    return torch.device(kind)


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype asked for, checked against the device it will run on."""
    _, dt = check_names(None, dtype)
    dev = torch.device(device) if device is not None else resolve_device(None)
    if dt == "float16" and dev.type == "cpu":
        # Refused rather than allowed: float16 on CPU has no speed or memory gain over
        # bfloat16 (same size; CPUs have no fast float16 matmul), and its narrow range
        # (max 65504) overflows in activations that bfloat16 holds, so a CPU float16 run
        # would only be a slower, less robust bfloat16 run.
        raise DeviceError("dtype float16 is not supported on cpu: use bfloat16 (same size, wider range) or "
                          "float32, or run float16 on a GPU (--device cuda)")
    return DTYPES[dt]


def resolve(device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for loading a model: names from the arguments, else the environment,
    else cpu/float32; refused in one line when unknown or not on this machine."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def autocast_bf16(device: torch.device, model_dtype: torch.dtype, wanted: bool) -> bool:
    """Whether an editor's optional bfloat16 speed-up (MEMIT's `targets.bf16`: its target steps with
    the weights held in bfloat16; the key-statistics sampling's autocast) should be on: only
    for a float32 model. A bfloat16 model already runs in bfloat16, and casting a float16
    model's weights or activations to bfloat16 would mix the two half types."""
    return bool(wanted) and model_dtype == torch.float32 and device.type in ("cpu", "cuda")
