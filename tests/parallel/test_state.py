"""Process groups: Megatron's rank order (checked against megatron-core's own rank generator),
working groups, the last pipeline stage, the virtual stage count, and clear errors."""
import warnings

import pytest
import torch
import torch.distributed as dist

from megallama import parallel as mp
from tests.distributed_utils import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]


def _members(group):
    """Global ranks of ``group``, learned through the group itself (so the group must work)."""
    ranks = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ranks, torch.tensor([dist.get_rank()]), group=group)
    return [int(r) for r in ranks]


def _layouts():
    out = {}
    for tp, pp in LAYOUTS:
        mp.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=2 if pp > 1 else None)
        info = {
            "tp": _members(mp.get_tensor_model_parallel_group()),
            "pp": _members(mp.get_pipeline_model_parallel_group()),
            "dp": _members(mp.get_data_parallel_group()),
            "tp_rank": mp.get_tensor_model_parallel_rank(),
            "pp_rank": mp.get_pipeline_model_parallel_rank(),
            "dp_rank": mp.get_data_parallel_rank(),
            "sizes": [mp.get_tensor_model_parallel_world_size(), mp.get_pipeline_model_parallel_world_size(),
                      mp.get_data_parallel_world_size()],
            "src": mp.get_tensor_model_parallel_src_rank(),
            "last_stage": mp.is_pipeline_last_stage(),
            "virtual_size": mp.get_virtual_pipeline_model_parallel_world_size(),
        }
        mp.destroy_model_parallel()
        assert not mp.model_parallel_is_initialized()
        out[f"{tp},{pp}"] = info
    errors = []
    for tp, pp in [(3, 1), (2, 4), (1, 3)]:
        try:
            mp.initialize_model_parallel(tp, pp)
        except ValueError as exc:
            errors.append(str(exc))
    try:
        mp.initialize_model_parallel(1, 1, virtual_pipeline_model_parallel_size=2)
    except ValueError as exc:
        errors.append(str(exc))
    assert not mp.model_parallel_is_initialized()
    return {"layouts": out, "errors": errors}


def test_rank_order_groups_and_stages_match_megatron():
    with warnings.catch_warnings():  # megatron-core warns that Apex and Transformer Engine are absent
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator

    world = 4
    results = run_distributed(_layouts, world)
    for tp, pp in LAYOUTS:
        dp = world // (tp * pp)
        ref = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")

        def group_of(kind, rank):
            return next(g for g in ref.get_ranks(kind) if rank in g)

        for rank, result in enumerate(results):
            info = result["layouts"][f"{tp},{pp}"]
            tp_group, pp_group, dp_group = group_of("tp", rank), group_of("pp", rank), group_of("dp", rank)
            assert info["tp"] == tp_group and info["pp"] == pp_group and info["dp"] == dp_group, (tp, pp, rank)
            assert info["sizes"] == [tp, pp, dp]
            assert info["tp_rank"] == tp_group.index(rank)
            assert info["dp_rank"] == dp_group.index(rank)
            stage = pp_group.index(rank)
            assert info["pp_rank"] == stage
            assert info["src"] == tp_group[0]
            assert info["last_stage"] == (stage == pp - 1)
            assert info["virtual_size"] == (2 if pp > 1 else None)
    messages = results[0]["errors"]
    assert len(messages) == 4
    assert "world size 4" in messages[0] and "(3)" in messages[0] and "= 3" in messages[0]
    assert "world size 4" in messages[1] and "(2)" in messages[1] and "(4)" in messages[1] and "= 8" in messages[1]
    assert "pipeline_model_parallel_size (3)" in messages[2]
    assert "virtual pipeline" in messages[3]


def test_serial_process_sees_one_rank_everywhere():
    assert not dist.is_initialized() and not mp.model_parallel_is_initialized()
    assert mp.get_tensor_model_parallel_world_size() == mp.get_pipeline_model_parallel_world_size() == 1
    assert mp.get_data_parallel_world_size() == 1
    assert mp.get_tensor_model_parallel_rank() == mp.get_pipeline_model_parallel_rank() == 0
    assert mp.get_data_parallel_rank() == 0
    assert mp.get_tensor_model_parallel_group() is None and mp.get_pipeline_model_parallel_group() is None
    assert mp.get_data_parallel_group() is None
    assert mp.is_pipeline_last_stage()
    assert mp.get_virtual_pipeline_model_parallel_world_size() is None
    with pytest.raises(RuntimeError, match="init_process_group"):
        mp.initialize_model_parallel(1, 1)
