"""`python examples/demo.py --quick`: the whole recipe runs and each stage's output makes sense,
checked from the files themselves (reports, JSONL, .idx, TensorBoard events, the HF folder)."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))

import demo  # noqa: E402  (examples/demo.py)

SOURCES = ("commoncrawl", "c4", "github")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "summary.json", encoding="utf-8") as f:
        return out, proc.stdout, json.load(f)


def test_every_stage_announced_and_summary_printed(run):
    out, stdout, summary = run
    for i in range(1, demo.STAGES + 1):
        assert f"[{i}/{demo.STAGES}]" in stdout
    tail = stdout[stdout.index("Summary"):]
    assert str(out / "hf") in tail and str(out / "loss_curve.png") in tail
    assert f"{summary['training']['final_loss']:.3f}" in tail


def test_cleaning_kept_and_dropped_by_reason(run):
    out, _, summary = run
    for source in SOURCES:
        with open(out / "cleaned" / f"{source}.report.json", encoding="utf-8") as f:
            report = json.load(f)
        kept = sum(1 for path in glob.glob(str(out / "cleaned" / source / "*.jsonl"))
                   for _ in open(path, encoding="utf-8"))
        assert kept == report["output_docs"] == summary["clean"][source]["kept"] > 0
        assert report["input_docs"] == summary["raw"][source]["documents"]
        assert report["output_docs"] + sum(report["dropped"].values()) == report["input_docs"]
    # the filters the demo is meant to show
    assert summary["clean"]["commoncrawl"]["dropped"].get("language", 0) > 0
    assert summary["clean"]["github"]["dropped"].get("license", 0) > 0
    rejected = [json.loads(line) for path in glob.glob(str(out / "rejected" / "commoncrawl" / "*.jsonl"))
                for line in open(path, encoding="utf-8")]
    assert any(r["meta"].get("lang") not in (None, "en") for r in rejected)


def test_tokens_counted_from_the_indexed_files(run):
    from megallama.data.indexed import IndexedDataset

    out, _, summary = run
    for source in SOURCES:
        assert summary["tokens"][source] == IndexedDataset(str(out / "data" / f"{source}_text_document")).num_tokens > 0


def test_training_loss_fell_and_was_logged(run):
    out, stdout, summary = run
    scalars = demo.read_scalars(str(out / "tensorboard"))
    loss = scalars["lm loss"]
    iters = summary["settings"]["train_iters"]
    assert loss[-1][0] == iters and len(loss) == iters // summary["settings"]["log_interval"]
    assert loss[-1][1] < loss[0][1] - 0.3, loss
    assert summary["training"]["final_loss"] == pytest.approx(loss[-1][1])
    assert summary["training"]["tokens_per_second"] > 0
    assert "tokens/s" in stdout and "TP=2 PP=2" in stdout
    with open(out / "checkpoints" / "latest_checkpointed_iteration.txt") as f:
        assert int(f.read()) == iters
    with open(out / "loss_curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_hf_export_loads_and_learned_the_corpus(run):
    import torch
    from transformers import AutoModelForCausalLM

    from megallama.tokenizer import SentencePieceTokenizer

    out, _, summary = run
    model = AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()
    settings = summary["settings"]
    shape = (model.config.num_hidden_layers, model.config.hidden_size)
    assert shape == (settings["num_layers"], settings["hidden_size"])
    tokenizer = SentencePieceTokenizer(str(out / "tokenizer" / "demo.model"))
    with open(sorted(glob.glob(str(out / "cleaned" / "commoncrawl" / "*.jsonl")))[0], encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    ids = torch.tensor([tokenizer.encode(text)[:settings["seq_length"]]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # well below a uniform guess over the vocabulary: the trained weights, not an initialisation
    assert math.isfinite(loss) and loss < math.log(settings["vocab_size"]) - 0.5


def test_generations_printed(run):
    out, stdout, summary = run
    with open(out / summary["generations"], encoding="utf-8") as f:
        printed = f.read()
    for prompt in demo.PROMPTS:
        assert prompt in printed and prompt in stdout
    assert len(printed) > sum(len(p) for p in demo.PROMPTS) + 10


def test_finetune_stage_trains_on_answers_and_chats_before_and_after(run):
    out, stdout, summary = run
    from megallama.data.indexed import IndexedDataset

    iters = demo.Settings.quick().finetune_iters
    f = summary["finetune"]
    assert f["iterations"] == iters and math.isfinite(f["final_loss"])
    assert (out / "finetuned" / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    mask = IndexedDataset(str(out / "sft" / "reference_qa_loss_mask_document"))
    assert mask.num_documents == summary["instructions"]["examples"] > 0
    assert 0 < mask.num_tokens and 0 < sum(int(mask[i].sum()) for i in range(len(mask))) < mask.num_tokens
    assert stdout.count(f"user> {demo.CHAT_PROMPT}\nassistant> ") == 2  # asked before and after finetuning
    assert f"after>  {summary['finetune']['after']}" in stdout[stdout.index("Summary"):]
