"""Process groups for tensor, pipeline and data parallelism, in Megatron's default rank order.

Global rank = tp_rank + TP * (dp_rank + DP * pp_rank): tensor-parallel ranks are adjacent (one node's
GPUs share the fastest links), data-parallel next, pipeline stages outermost. Call
``initialize_model_parallel`` after ``torch.distributed.init_process_group`` (gloo or NCCL).

Before it is called (a plain single process, no process group) every getter answers as the serial
model needs: size 1, rank 0, group None, the last pipeline stage.

Teardown: ``initialize_model_parallel`` registers ``destroy_model_parallel`` to run at interpreter
exit. Gloo's worker thread drops a finished collective (and with it the tensors it holds, whose
Python objects need the GIL) after the caller has already resumed. When that falls into interpreter
finalisation, the thread asking for the GIL is ended with ``pthread_exit``, whose unwinding through
the collective's ``noexcept`` destructor calls ``std::terminate``: SIGABRT, ``terminate called
without an active exception`` (seen in gdb in ``~AsyncAllgatherWork`` after a sequence-parallel
forward, whose last collectives are all-gathers). Destroying the groups at exit joins those
threads while the interpreter is still whole.
"""
import atexit

import torch
import torch.distributed as dist

_TENSOR_GROUP = None
_PIPELINE_GROUP = None
_DATA_GROUP = None
_EMBEDDING_GROUP = None
_TENSOR_RANKS = None
_PIPELINE_RANKS = None
_DATA_RANKS = None
_VIRTUAL_PIPELINE_WORLD_SIZE = None


class LayoutMismatchError(ValueError):
    """Ranks asked ``initialize_model_parallel`` for different layouts (each parsed its own flags)."""


def _check_same_layout(sizes: dict) -> None:
    """Every rank was given the same sizes: ranks asking for different groups would wait in
    ``new_group`` until the timeout, naming nothing. One all-gather on the world group."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    mine = torch.tensor(list(sizes.values()), dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    others = [r for r, theirs in enumerate(table) if not torch.equal(theirs, mine)]
    if others:
        raise LayoutMismatchError(
            "the ranks were launched with different parallel layouts: "
            + ", ".join(f"{name} ({value})" for name, value in sizes.items())
            + f" on this rank, other sizes on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}; "
            "give every rank the same flags")


def initialize_model_parallel(
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None,
    timeout=None,
):
    """Build this process's TP, PP and DP groups.

    The data-parallel size is what is left: world_size / (TP x PP). Every rank must call this
    with the same arguments (``new_group`` is collective); sizes that differ between ranks raise
    ``LayoutMismatchError`` on every rank. ``timeout`` (a timedelta) bounds every
    collective of the new groups; pass the one given to ``init_process_group``, since groups
    otherwise get torch's default (30 minutes) and a failed peer would hang them that long.
    """
    global _TENSOR_GROUP, _PIPELINE_GROUP, _DATA_GROUP, _EMBEDDING_GROUP
    global _TENSOR_RANKS, _PIPELINE_RANKS, _DATA_RANKS
    global _VIRTUAL_PIPELINE_WORLD_SIZE
    if not dist.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel needs torch.distributed.init_process_group to be called first"
        )
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialised; call destroy_model_parallel first")
    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    world_size = dist.get_world_size()
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor ({tp}) and pipeline ({pp}) model parallel sizes must be at least 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) = {tp * pp}"
        )
    if virtual_pipeline_model_parallel_size is not None:
        vp = int(virtual_pipeline_model_parallel_size)
        if vp < 1:
            raise ValueError(f"virtual_pipeline_model_parallel_size must be at least 1, got {vp}")
        if vp > 1 and pp < 2:
            raise ValueError(
                f"virtual pipeline stages ({vp}) need pipeline_model_parallel_size > 1, got {pp}"
            )
    _check_same_layout({"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                        "virtual stages per pipeline rank": virtual_pipeline_model_parallel_size or 1})
    dp = world_size // (tp * pp)
    rank = dist.get_rank()

    def global_rank(tp_rank, dp_rank, pp_rank):
        return tp_rank + tp * (dp_rank + dp * pp_rank)

    # new_group is collective over the whole world: every rank creates every group, in one order.
    for p in range(pp):
        for d in range(dp):
            ranks = [global_rank(t, d, p) for t in range(tp)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                _TENSOR_GROUP, _TENSOR_RANKS = group, ranks
    for p in range(pp):
        for t in range(tp):
            ranks = [global_rank(t, d, p) for d in range(dp)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                _DATA_GROUP, _DATA_RANKS = group, ranks
    for d in range(dp):
        for t in range(tp):
            ranks = [global_rank(t, d, p) for p in range(pp)]
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                _PIPELINE_GROUP, _PIPELINE_RANKS = group, ranks
    if pp > 1:  # the first and last stage, which hold the two copies of a tied embedding
        for d in range(dp):
            for t in range(tp):
                ranks = [global_rank(t, d, 0), global_rank(t, d, pp - 1)]
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    _EMBEDDING_GROUP = group
    if virtual_pipeline_model_parallel_size is not None:
        _VIRTUAL_PIPELINE_WORLD_SIZE = int(virtual_pipeline_model_parallel_size)
    atexit.unregister(destroy_model_parallel)  # once, however often the groups are rebuilt
    atexit.register(destroy_model_parallel)


def destroy_model_parallel():
    """Forget the groups (the process group itself stays; destroy it with torch.distributed)."""
    global _TENSOR_GROUP, _PIPELINE_GROUP, _DATA_GROUP, _EMBEDDING_GROUP
    global _TENSOR_RANKS, _PIPELINE_RANKS, _DATA_RANKS
    global _VIRTUAL_PIPELINE_WORLD_SIZE
    for group in {_TENSOR_GROUP, _PIPELINE_GROUP, _DATA_GROUP, _EMBEDDING_GROUP} - {None}:
        if dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except ValueError:  # destroyed already, with a world group since replaced
                pass
    _TENSOR_GROUP = _PIPELINE_GROUP = _DATA_GROUP = _EMBEDDING_GROUP = None
    _TENSOR_RANKS = _PIPELINE_RANKS = _DATA_RANKS = None
    _VIRTUAL_PIPELINE_WORLD_SIZE = None


def model_parallel_is_initialized():
    return _TENSOR_GROUP is not None


def _rank_in(ranks):
    return 0 if ranks is None else ranks.index(dist.get_rank())


def _size_of(ranks):
    return 1 if ranks is None else len(ranks)


# Tensor model parallel.
def get_tensor_model_parallel_group():
    return _TENSOR_GROUP


def get_tensor_model_parallel_world_size():
    return _size_of(_TENSOR_RANKS)


def get_tensor_model_parallel_rank():
    return _rank_in(_TENSOR_RANKS)


def get_tensor_model_parallel_src_rank():
    """Global rank of tensor-parallel rank 0 in this rank's group (the one that broadcasts data)."""
    return 0 if _TENSOR_RANKS is None else _TENSOR_RANKS[0]


# Pipeline model parallel.
def get_pipeline_model_parallel_group():
    return _PIPELINE_GROUP


def get_pipeline_model_parallel_world_size():
    return _size_of(_PIPELINE_RANKS)


def get_pipeline_model_parallel_rank():
    return _rank_in(_PIPELINE_RANKS)


def get_virtual_pipeline_model_parallel_world_size():
    """Model chunks per pipeline rank for the interleaved schedule; None when not interleaved."""
    return _VIRTUAL_PIPELINE_WORLD_SIZE


def is_pipeline_last_stage():
    """True on the stage that holds the final norm, head and loss (in its last chunk when interleaved)."""
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_embedding_group():
    """The first and last pipeline stage of this rank's (TP rank, DP rank), which sum the gradients
    of a tied embedding's two copies (Megatron's); None without pipeline parallelism or on a
    middle stage."""
    return _EMBEDDING_GROUP


# Data parallel.
def get_data_parallel_group():
    return _DATA_GROUP


def get_data_parallel_world_size():
    return _size_of(_DATA_RANKS)


def get_data_parallel_rank():
    return _rank_in(_DATA_RANKS)
