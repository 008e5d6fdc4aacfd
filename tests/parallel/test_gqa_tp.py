"""Grouped-query attention under tensor parallelism equals the serial model, also when TP exceeds
the number of key/value heads (each rank then holds one whole key/value head, the same one as its
neighbours: Megatron's replication). Same initial weights, logits, losses and full gradients (the
replicas' gradients summed), and the same tokens from KV-cache decoding."""
import dataclasses

import torch

from megallama import parallel as mp
from megallama.config import LlamaConfig
from megallama.inference.generation import generate, prepare_for_inference
from megallama.model import LlamaModel
from tests.distributed_utils import run_distributed

CONFIG = LlamaConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=37,
                     max_position_embeddings=16)


def _run(model, ids, labels):
    logits = model(ids)
    loss = model(ids, labels=labels)
    loss.sum().backward()
    grads = {name: mp.gather_like(p, p.grad) for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _decode(model):
    """Greedy KV-cache decoding of two prompts of different lengths (left padding)."""
    return generate(prepare_for_inference(model), [[3, 14, 15, 9], [26, 5]], max_new_tokens=5)


def _compare():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=gen)
    labels = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=gen)
    checked = []
    for groups in (1, 2, 4):
        config = dataclasses.replace(CONFIG, num_query_groups=groups)
        torch.manual_seed(0)
        serial = LlamaModel(config)
        ref_logits, ref_loss, ref_grads = _run(serial, ids, labels)
        ref_tokens = _decode(serial)
        for tp in (4, 2):
            for sp in (False, True):
                mp.initialize_model_parallel(tp)
                torch.manual_seed(0)
                model = LlamaModel(dataclasses.replace(config, sequence_parallel=sp))
                logits, loss, grads = _run(model, ids, labels)
                what = f"groups={groups} TP={tp} SP={sp}"
                torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6, msg=what)
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=what)
                for name, grad in grads.items():
                    torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=f"{what} {name}")
                if not sp:  # decoding runs without sequence parallelism
                    assert _decode(model) == ref_tokens, what
                mp.destroy_model_parallel()
                checked.append(what)
    return checked


def test_gqa_under_tensor_parallelism_equals_serial_with_1_2_4_kv_heads():
    results = run_distributed(_compare, 4, timeout=300)
    assert len(results[0]) == 12
