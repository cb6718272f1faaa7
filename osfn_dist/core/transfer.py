"""d-sized tensors between the host and a device with as few synchronisations as possible:
the curvature service works on the host, V and the vectors it meets live on the device."""
from __future__ import annotations

import torch


def to_device(device: torch.device, *vectors: torch.Tensor | None,
              dtype: torch.dtype = torch.float32) -> list[torch.Tensor | None]:
    """Small (d-sized) tensors as contiguous ``dtype`` on ``device``: those elsewhere go over
    in one pinned, non-blocking copy to a GPU (no wait for the device, where a plain ``.to``
    from pageable memory synchronises), those already there as they are."""
    host = [v for v in vectors if v is not None and v.device != device]
    if not host:
        return [None if v is None else v.to(dtype).contiguous() for v in vectors]
    flat = torch.cat([v.detach().reshape(-1).to("cpu", dtype) for v in host])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    out, at = [], 0
    for v in vectors:
        if v is None or v.device == device:
            out.append(None if v is None else v.to(dtype).contiguous())
        else:
            out.append(flat[at: at + v.numel()].view(v.shape))
            at += v.numel()
    return out


def to_host(*values) -> list:
    """Small tensors (and floats) as float64 CPU tensors, those on a device in one copy: one
    host synchronisation for all of them instead of one each. Floats and None pass through."""
    dev = [v for v in values if isinstance(v, torch.Tensor) and v.device.type != "cpu"]
    if not dev:
        return [v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else v for v in values]
    flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in dev]).cpu()
    out, at = [], 0
    for v in values:
        if isinstance(v, torch.Tensor) and v.device.type != "cpu":
            out.append(flat[at: at + v.numel()].view(v.shape))
            at += v.numel()
        else:
            out.append(v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else v)
    return out
