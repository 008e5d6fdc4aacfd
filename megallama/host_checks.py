"""Which value checks may read a tensor on the host.

Reading a CUDA tensor on the host (``bool(t.any())``, ``int(t.min())``) waits until the device has
run everything queued before it, so a check of that kind in the model's forward stalls every
training iteration. The model checks its inputs only where the read is free (host tensors); on a
device the trainer has already checked the host copy of each batch before moving it
(``megallama.training.loop.check_batch``).
"""
import torch


def readable_without_sync(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor`` on the host costs no device synchronisation."""
    return tensor.device.type == "cpu"
