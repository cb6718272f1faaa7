"""Host synchronisations of a call on a GPU, as torch's CUDA sync debug mode reports them
(one warning per synchronising call: a copy to the host, ``.item()``, a blocking copy from
pageable memory). For the step-time benchmark and the GPU tests."""
from __future__ import annotations

import warnings

import torch


def host_syncs(fn) -> int:
    """Run ``fn()`` once (after the device is idle) and count its synchronising CUDA calls."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
