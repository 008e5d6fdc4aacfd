"""Process setup shared by the inference tools: under torchrun, every process is a tensor-parallel
rank of one model (the checkpoint is resharded on load, whatever layout saved it)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_tensor_parallel_from_env() -> torch.device:
    """The device to run on; under torchrun (WORLD_SIZE > 1) also the process group (NCCL on GPUs,
    gloo on CPU) and TP groups spanning all processes."""
    from megallama import parallel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        parallel.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    return device


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown() -> None:
    if dist.is_initialized():
        from megallama import parallel

        parallel.destroy_model_parallel()
        dist.destroy_process_group()
