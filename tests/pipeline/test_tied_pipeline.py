"""Tied input/output embeddings under pipeline parallelism, as Megatron shares them: the last stage
holds a copy of the embedding as its head, the first and last stage sum the two gradients, so
training equals the serial tied model's and the copies stay bitwise equal. Checkpoints store the
embedding once: a pipelined tied run resumes serially and the other way round, and exports to HF's
tied layout."""
import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megallama.checkpoint import convert_checkpoint, open_checkpoint
from megallama.checkpoint import storage as ckpt
from megallama.model import LlamaModel
from megallama.parallel import state
from megallama.pipeline.stages import stage_spec
from megallama.planning.layout import Layout, Workload
from megallama.planning.memory import rank_parameters
from megallama.training.arguments import parse_args
from megallama.training.loop import Trainer, shutdown
from tests.distributed_utils import run_distributed
from tests.pipeline import harness as H

STEPS = 3
# (tp, pp, virtual, micro_batch, distributed optimizer), 4 ranks each
LAYOUTS = [
    (1, 2, None, 2, True),  # PP 2 × DP 2, 1F1B, distributed optimizer
    (2, 2, 2, 1, False),    # TP 2 × PP 2, interleaved: the embedding in chunk 0, the head in the last
]

ITERS = 6
TIED = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--seq-length", "16", "--vocab-size", "64", "--lr", "1e-3", "--lr-warmup-iters", "2",
        "--lr-decay-iters", str(ITERS), "--mock-data", "--global-batch-size", "8", "--micro-batch-size", "2",
        "--log-interval", "1", "--eval-iters", "0"]


def _harness_layouts():
    cfg = H.config(tie_word_embeddings=True)
    return {"overlap": [H.parallel_run(cfg, *layout, STEPS) for layout in LAYOUTS],
            # the interleaved layout with synchronous exchanges: bit-identical to the overlapped one
            "synchronous": H.parallel_run(cfg, *LAYOUTS[1], STEPS, overlap_p2p_comm=False)}


@pytest.fixture(scope="module")
def layouts():
    return run_distributed(_harness_layouts, 4, timeout=300)


def test_tied_pipeline_layouts_equal_serial_and_keep_the_copies_equal(layouts):
    serial = H.serial_run(H.config(tie_word_embeddings=True), STEPS)
    assert serial[1][0] > H.OPT["clip_grad"], "clipping must be active for the norm to matter"
    H.check_identical([r["overlap"][1] for r in layouts], [r["synchronous"] for r in layouts])
    for i, layout in enumerate(LAYOUTS):
        results = [r["overlap"][i] for r in layouts]
        H.check_against_serial(results, serial)
        firsts = {(r["tp_rank"], r["dp_rank"]): r for r in results if "tok_embeddings.weight" in r["params"]}
        lasts = [r for r in results if "output.weight" in r["params"]]
        assert len(firsts) == len(lasts) == len(results) // 2, layout
        for last in lasts:
            first = firsts[last["tp_rank"], last["dp_rank"]]
            assert torch.equal(last["params"]["output.weight"], first["params"]["tok_embeddings.weight"]), layout


def _stages(config):
    specs = [stage_spec(config, 2, rank) for rank in range(2)]
    return [LlamaModel(config, pre_process=s.pre_process, post_process=s.post_process, layer_ids=s.layer_ids)
            for s in specs]


def test_the_last_stage_copy_starts_as_the_embedding():
    config = H.config(tie_word_embeddings=True)
    serial = LlamaModel(config)
    serial.initialize_layout_free(7)
    first, last = _stages(config)
    for stage in (first, last):
        stage.initialize_layout_free(7)
    assert torch.equal(last.output.weight, serial.tok_embeddings.weight)
    assert torch.equal(first.tok_embeddings.weight, serial.tok_embeddings.weight)
    assert first.tok_embeddings.weight.shared and last.output.weight.shared
    assert not hasattr(serial.output.weight, "shared")  # one tensor: nothing to sum
    with torch.no_grad():
        last.output.weight.zero_()
    last.load_hf_state_dict(serial.hf_state_dict(), strict=False)
    assert torch.equal(last.output.weight, serial.tok_embeddings.weight)


def test_stages_hold_what_the_memory_plan_counts():
    config = H.config(tie_word_embeddings=True)
    counts = [sum(p.numel() for p in stage.parameters()) for stage in _stages(config)]
    assert counts == [rank_parameters(Workload(config), Layout(pp=2), rank) for rank in range(2)]
    embedding = config.vocab_size * config.hidden_size
    assert sum(counts) == config.num_parameters() + embedding  # the last stage's copy


def _train(*flags, world_size: int = 1) -> dict:
    """{"losses": this run's losses, "norms": {iteration: logged grad norm}} (last pipeline stage)."""
    config = parse_args([*TIED, *flags], env={"WORLD_SIZE": str(world_size)}, check_files=False)
    lines = []
    try:
        losses = Trainer(config, print_fn=lines.append).train()
    finally:
        if world_size == 1:
            shutdown()
        else:  # the process group is the test harness's
            state.destroy_model_parallel()
    norms = {int(line.split()[1].split("/")[0]): float(line.split("grad norm ")[1].split()[0])
             for line in lines if line.startswith("iteration")}
    return {"losses": losses, "norms": norms}


def _pipelined_runs(save: str, serial_checkpoint: str) -> dict:
    pp2 = ("--pipeline-model-parallel-size", "2")
    return {
        # PP 2 × DP 2 with ZeRO: the copy's optimizer state is sharded too, and not saved
        "run": _train("--train-iters", str(ITERS), *pp2, "--use-distributed-optimizer", "--save", save,
                      "--save-interval", "3", world_size=4),
        "resumed": _train("--train-iters", str(ITERS), *pp2, "--tensor-model-parallel-size", "2",
                          "--load", serial_checkpoint, world_size=4),
        # interleaved: the embedding in chunk 0 of the first stage, the head in the last chunk of the last
        "finetuned": _train("--train-iters", "2", *pp2, "--num-layers-per-virtual-pipeline-stage", "1",
                            "--finetune", "--load", serial_checkpoint, world_size=4),
        "rank": dist.get_rank(),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the spawned ranks: two threads on a busy 2-core machine spin
    try:
        root = tmp_path_factory.mktemp("tied")
        serial_checkpoint, save = str(root / "serial"), str(root / "pp2")
        out = {"serial": _train("--train-iters", str(ITERS)),
               "serial_first_half": _train("--train-iters", "3", "--save", serial_checkpoint),
               "serial_finetuned": _train("--train-iters", "2", "--finetune", "--load", serial_checkpoint)}
        ranks = run_distributed(_pipelined_runs, 4, save, serial_checkpoint, timeout=300)
        out["pipelined"] = next(r for r in ranks if r["rank"] == 3)  # the last rank, of the last stage, logs
        out["pp2_to_serial"] = _train("--train-iters", str(ITERS), "--load", save, "--ckpt-step", "3")
        out["save"], out["root"] = save, root
        return out
    finally:
        torch.set_num_threads(before)


def test_pipelined_tied_run_equals_serial(runs):
    serial, pipelined = runs["serial"], runs["pipelined"]["run"]
    torch.testing.assert_close(torch.tensor(pipelined["losses"]), torch.tensor(serial["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert sorted(pipelined["norms"]) == list(range(1, ITERS + 1))
    torch.testing.assert_close(torch.tensor(list(pipelined["norms"].values())),
                               torch.tensor(list(serial["norms"].values())), rtol=1e-5, atol=0)


def test_checkpoints_resume_across_pipeline_layouts(runs):
    second_half = torch.tensor(runs["serial"]["losses"][3:])
    for resumed in (runs["pp2_to_serial"], runs["pipelined"]["resumed"]):
        assert len(resumed["losses"]) == ITERS - 3
        torch.testing.assert_close(torch.tensor(resumed["losses"]), second_half, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(runs["pipelined"]["finetuned"]["losses"]),
                               torch.tensor(runs["serial_finetuned"]["losses"]), rtol=1e-5, atol=1e-6)


def test_pipelined_tied_checkpoint_stores_the_embedding_once_and_exports_tied(runs):
    _, _, metadata = ckpt.latest_checkpoint(runs["save"])
    assert "optimizer.tok_embeddings.weight.exp_avg" in metadata["pieces"]
    assert "output" not in {key.split(".")[1] for key in metadata["pieces"]}  # model.X, optimizer.X.what
    hf = str(runs["root"] / "hf")
    convert_checkpoint(runs["save"], hf, "hf", progress=False)
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is True
    tensors = load_file(os.path.join(hf, "model.safetensors"))
    assert "lm_head.weight" not in tensors
    torch.testing.assert_close(tensors["model.embed_tokens.weight"],
                               open_checkpoint(runs["save"]).load("tok_embeddings.weight"), rtol=0, atol=0)
