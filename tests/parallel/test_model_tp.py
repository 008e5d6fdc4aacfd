"""The LLaMA model under tensor (and sequence) parallelism equals the serial model: same initial
weights for the same seed, same logits and per-token loss, same gradient for every parameter."""
import dataclasses

import pytest
import torch

from megallama import parallel as mp
from megallama.config import LlamaConfig
from megallama.model import LlamaModel
from tests.distributed_utils import run_distributed

RTOL, ATOL = 1e-5, 1e-6
# 37: a vocabulary that TP=2 and TP=4 must pad; ffn 48 and 4 heads split evenly over 4 ranks.
CONFIG = LlamaConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                     vocab_size=37, max_position_embeddings=16)


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=gen)
    labels = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=gen)
    labels[0, 0], labels[1, 3] = CONFIG.vocab_size - 1, -100
    return ids, labels, torch.rand(2, 8, generator=gen)


def _run(model, ids, labels, loss_weights):
    logits = model(ids)
    loss = model(ids, labels=labels)
    (loss * loss_weights).sum().backward()
    grads = {name: mp.gather_like(p, p.grad) for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _compare_with_serial():
    ids, labels, loss_weights = _batch()
    torch.manual_seed(0)
    serial = LlamaModel(CONFIG)  # model parallelism not initialised yet: the serial model
    serial_weights = serial.hf_state_dict()
    ref_logits, ref_loss, ref_grads = _run(serial, ids, labels, loss_weights)
    checked = []
    for tp in (4, 2, 1):
        for sp, recompute in ((False, None), (True, None), (True, "full")):
            if recompute and tp != 2:
                continue
            what = f"TP={tp} SP={sp} recompute={recompute}"
            mp.initialize_model_parallel(tp)
            config = dataclasses.replace(CONFIG, sequence_parallel=sp, recompute_granularity=recompute)
            torch.manual_seed(0)
            model = LlamaModel(config)
            if tp > 1:
                assert model.layers["0"].attention.wqkv.weight.shape == (3 * 32 // tp, 32)
                assert model.output.weight.shape == (-(-37 // tp), 32)
            weights = model.hf_state_dict()
            assert weights.keys() == serial_weights.keys()
            for name in weights:
                assert torch.equal(weights[name], serial_weights[name]), f"{what}: initial {name} differs"
            logits, loss, grads = _run(model, ids, labels, loss_weights)
            close(logits, ref_logits, what + " logits")
            close(loss, ref_loss, what + " per-token loss")
            for name in ref_grads:
                close(grads[name], ref_grads[name], f"{what} gradient of {name}")

            torch.manual_seed(1)  # different weights, then the serial ones loaded from HF names
            other = LlamaModel(config)
            other.load_hf_state_dict(serial_weights)
            for name, tensor in other.hf_state_dict().items():
                assert torch.equal(tensor, serial_weights[name]), f"{what}: {name} after load_hf_state_dict"
            mp.destroy_model_parallel()
            checked.append(what)

    mp.initialize_model_parallel(4)
    errors = []
    for bad in (dict(num_attention_heads=6, hidden_size=48),
                dict(ffn_hidden_size=50)):
        try:
            LlamaModel(dataclasses.replace(CONFIG, **bad))
        except ValueError as exc:
            errors.append(str(exc))
    mp.destroy_model_parallel()
    return {"checked": checked, "errors": errors}


def test_tensor_and_sequence_parallel_model_equals_serial():
    results = run_distributed(_compare_with_serial, 4, timeout=240)
    assert len(results[0]["checked"]) == 7
    assert results[0]["errors"] == [
        "num_attention_heads (6) is not divisible by tensor_model_parallel_size (4)",
        "ffn_hidden_size (50) is not divisible by tensor_model_parallel_size (4)",
    ]


def test_serial_model_ignores_sequence_parallel_flag():
    ids, labels, _ = _batch()
    torch.manual_seed(0)
    plain = LlamaModel(CONFIG)
    torch.manual_seed(0)
    flagged = LlamaModel(dataclasses.replace(CONFIG, sequence_parallel=True))
    close(flagged(ids), plain(ids), "logits")
    close(flagged(ids, labels=labels), plain(ids, labels=labels), "loss")
    with pytest.raises(ValueError, match=r"labels \(2, 7\) must match input_ids \(2, 8\)"):
        plain(ids, labels=labels[:, :7])
