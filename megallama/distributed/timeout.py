"""The timeout given to ``init_process_group``, for waits that must not outlive it.

Subgroups made by ``new_group`` without a timeout get torch's default (30 minutes for gloo), so a
rank waiting on a wedged peer in such a group would hang that long; under gloo, waits on
point-to-point and asynchronous work pass this timeout explicitly instead.
"""
import datetime
from typing import Optional

import torch
import torch.distributed as dist


def default_group_timeout() -> Optional[datetime.timedelta]:
    """The default process group's timeout for explicit waits; None (a plain wait) when it cannot be
    read, and under NCCL: there a wait given a timeout blocks the host until the collective is done
    (torch's ``WorkNCCL::wait``), while a plain one only orders the streams, and NCCL's watchdog
    enforces the process group's timeout by itself."""
    if not dist.is_initialized() or dist.get_backend() == "nccl":
        return None
    try:
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError):
        return None


def wait(work, timeout: Optional[datetime.timedelta]) -> None:
    """``work.wait()`` bounded by ``timeout`` (raises RuntimeError when it expires)."""
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout)
