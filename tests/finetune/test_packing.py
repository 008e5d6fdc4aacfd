"""Packed rows of isolated examples: the loss and gradients of a packed batch are the sums of the
examples' own, unpacked; prompt targets get no gradient; the CUDA block mask's logic matches."""
import warnings

import numpy as np
import pytest
import torch

from megallama.attention import DocumentLayout, flex_document_attention, per_document_attention
from megallama.config import LlamaConfig
from megallama.data.indexed import IndexedDataset, IndexedDatasetWriter
from megallama.data.sft_dataset import EODResetDataset, PackedSFTDataset, pack_first_fit_decreasing
from megallama.model import LlamaModel

SEQ = 64


def tiny_model(seed=0) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176,
                         vocab_size=320, max_position_embeddings=SEQ)
    model = LlamaModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)  # logits far from uniform, so a leak across examples would show
    return model


def random_examples(rng, lengths):
    """(ids, loss mask) per example: a prompt, then an answer (mask 1) ending the example."""
    out = []
    for n in lengths:
        ids = rng.integers(0, 320, n)
        mask = np.zeros(n, dtype=np.uint8)
        mask[rng.integers(1, n - 1):] = 1
        out.append((ids, mask))
    return out


def write_pair(prefix, examples):
    with IndexedDatasetWriter(prefix + "_text_document", np.uint16) as ids_out, \
            IndexedDatasetWriter(prefix + "_loss_mask_document", np.uint8) as mask_out:
        for ids, mask in examples:
            ids_out.add_document(ids)
            mask_out.add_document(mask)
    return IndexedDataset(prefix + "_text_document"), IndexedDataset(prefix + "_loss_mask_document")


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_loss_and_grads_equal_sum_of_unpacked_examples(tmp_path):
    rng = np.random.default_rng(0)
    examples = random_examples(rng, [20, 9, 33, 14, 5, 40, 12, 25])
    ids, mask = write_pair(str(tmp_path / "sft"), examples)
    dataset = PackedSFTDataset(ids, mask, 0, len(ids), None, SEQ, seed=1, pad_id=0, cache_dir=str(tmp_path))
    rows = [dataset[i] for i in range(len(dataset))]
    packed_docs = sorted(int(d) for i in range(len(dataset)) for d in dataset.examples(i))
    assert packed_docs == list(range(len(examples)))  # every example once, none split
    assert len(dataset) < len(examples)  # several examples do share rows
    batch = {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}

    model = tiny_model()
    per_token = model(batch["tokens"], labels=batch["labels"], position_ids=batch["position_ids"])
    packed = (per_token * batch["loss_mask"]).sum()
    packed.backward()
    packed_grads = grads(model)

    model.zero_grad()
    unpacked = torch.zeros((), dtype=torch.float64)
    for example_ids, example_mask in examples:
        t = torch.as_tensor(example_ids, dtype=torch.int64)
        loss = model(t[None, :-1], labels=t[None, 1:])[0]
        term = (loss * torch.as_tensor(example_mask[1:], dtype=torch.float32)).sum()
        term.backward()
        unpacked += term.double()
    assert float(batch["loss_mask"].sum()) == sum(int(m[1:].sum()) for _, m in examples)
    torch.testing.assert_close(packed.double(), unpacked, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_prompt_tokens_get_no_gradient():
    """Changing the targets of masked (prompt) positions changes neither the loss nor any gradient,
    and the hidden state at a prompt position gets gradient only through later answer tokens."""
    rng = np.random.default_rng(1)
    tokens = torch.as_tensor(rng.integers(0, 320, (1, SEQ)))
    labels = torch.as_tensor(rng.integers(0, 320, (1, SEQ)))
    position_ids = torch.cat([torch.arange(30), torch.arange(34)])[None]
    loss_mask = torch.zeros(1, SEQ)
    loss_mask[0, 20:30] = 1  # the first example's answer; the second example is all prompt
    model = tiny_model()

    def run(lbl):
        model.zero_grad()
        loss = (model(tokens, labels=lbl, position_ids=position_ids) * loss_mask).sum()
        loss.backward()
        return loss.detach(), grads(model)

    loss_a, grads_a = run(labels)
    other = torch.where(loss_mask.bool(), labels, (labels + 7) % 320)
    loss_b, grads_b = run(other)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    # Embedding rows used only by the all-prompt second example get exactly zero gradient.
    only_second = set(tokens[0, 30:].tolist()) - set(tokens[0, :30].tolist())
    emb_grad = grads_a["tok_embeddings.weight"]
    assert only_second and all(float(emb_grad[t].abs().max()) == 0.0 for t in only_second)


def test_cuda_block_mask_matches_per_document_attention_on_cpu():
    """The FlexAttention path (CUDA) built from block-level document ranges: its block mask equals
    FlexAttention's own create_block_mask of the document mask, and its output (eager on CPU)
    equals the per-document SDPA path."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows = [[100, 60, 130, 10, 300], [600], [1, 255, 344]]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    layout = DocumentLayout(position_ids)
    docs = layout.document_ids
    reference = create_block_mask(lambda b, h, q, kv: (docs[b, q] == docs[b, kv]) & (q >= kv),
                                  len(rows), None, 600, 600, device="cpu", BLOCK_SIZE=128)
    ours = layout.block_mask(128)
    assert torch.equal(ours.to_dense(), reference.to_dense())
    q, k, v = (torch.randn(len(rows), 2, 600, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is slow
        flex = flex_document_attention(q, k, v, layout, compiled=False)
    torch.testing.assert_close(flex, per_document_attention(q, k, v, layout), rtol=1e-5, atol=1e-5)


def test_positions_per_row_match_unpacked_rotary():
    """Rotary angles from per-row position ids equal each row's own rotary run separately."""
    model = tiny_model()
    tokens = torch.randint(0, 320, (2, SEQ))
    position_ids = torch.stack([torch.arange(SEQ), torch.cat([torch.arange(10), torch.arange(SEQ - 10)])])
    with torch.no_grad():
        logits = model(tokens, position_ids=position_ids)
        torch.testing.assert_close(logits[0], model(tokens[:1])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1, 10:], model(tokens[1:, 10:])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1, :10], model(tokens[1:, :10])[0], rtol=1e-5, atol=1e-5)


def test_first_fit_decreasing_fills_rows():
    lengths = np.array([60, 5, 30, 30, 4, 64, 1])
    bins = pack_first_fit_decreasing(lengths, 64)
    assert sorted(int(i) for b in bins for i in b) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 64 for b in bins) and len(bins) == 4


def test_long_examples_are_cut_and_counted(tmp_path):
    rng = np.random.default_rng(2)
    ids, mask = write_pair(str(tmp_path / "long"), random_examples(rng, [SEQ + 20, 10, 10]))
    dataset = PackedSFTDataset(ids, mask, 0, 3, 5, SEQ, seed=0, pad_id=0, cache_dir=str(tmp_path))
    assert dataset.truncated == 1 and len(dataset) >= 5
    row = next(dataset[i] for i in range(len(dataset)) if 0 in dataset.examples(i).tolist())
    assert row["position_ids"].tolist() == list(range(SEQ))


def test_eod_reset_matches_megatron_semantics():
    class Plain:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"tokens": np.array([5, 6, 2, 7, 8, 9, 2, 4]), "labels": np.zeros(8, dtype=np.int64)}

    item = EODResetDataset(Plain(), eod=2, reset_documents=True, eod_mask_loss=True)[0]
    assert item["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert item["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 1]
    assert "position_ids" not in EODResetDataset(Plain(), 2, reset_documents=False, eod_mask_loss=True)[0]


def test_sft_data_path_blends_instruction_sets_by_weight(tmp_path):
    from megallama.data.sft_dataset import build_sft_datasets

    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        write_pair(str(tmp_path / name), random_examples(rng, rng.integers(8, 40, 30)))
    train, valid, test = build_sft_datasets(["1", str(tmp_path / "a"), "3", str(tmp_path / "b")], "100,0,0", SEQ,
                                            [40, 0, 0], seed=0, pad_id=0)
    assert valid is None and test is None and len(train) == 40
    ids = [train[i]["dataset_id"] for i in range(40)]
    assert ids.count(0) == 10 and ids.count(1) == 30
    assert set(train[0]) >= {"tokens", "labels", "loss_mask", "position_ids"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_model_equals_per_example_losses():
    """On CUDA the packed forward goes through compiled FlexAttention: same loss and gradients as
    the examples one by one."""
    rng = np.random.default_rng(4)
    examples = random_examples(rng, [20, 9, 33])
    model = tiny_model().cuda()
    tokens = torch.as_tensor(np.concatenate([ids[:-1] for ids, _ in examples]))[None].cuda()
    labels = torch.as_tensor(np.concatenate([ids[1:] for ids, _ in examples]))[None].cuda()
    position_ids = torch.cat([torch.arange(len(ids) - 1) for ids, _ in examples])[None].cuda()
    packed = model(tokens, labels=labels, position_ids=position_ids).sum()
    packed.backward()
    packed_grads = grads(model)
    model.zero_grad()
    unpacked = sum(model(torch.as_tensor(ids[None, :-1]).cuda(), labels=torch.as_tensor(ids[None, 1:]).cuda()).sum()
                   for ids, _ in examples)
    unpacked.backward()
    torch.testing.assert_close(packed, unpacked, rtol=1e-4, atol=1e-3)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-3, atol=1e-4, msg=name)
