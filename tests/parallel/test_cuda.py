"""The CUDA side (skipped without a GPU): RNG states on the CUDA generator, and the model, split
layers and vocab-parallel loss on an NCCL process group, equal to the same model on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from megallama import parallel as mp
from megallama.config import LlamaConfig
from megallama.model import LlamaModel
from tests.distributed_utils import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on_nccl():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    mp.initialize_model_parallel(1)
    mp.model_parallel_manual_seed(3)
    before = torch.cuda.get_rng_state()
    with mp.get_rng_tracker().fork():
        forked = torch.rand(4, device="cuda")
        again = torch.rand(4, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before), "the fork must restore the CUDA generator"
    assert not torch.equal(forked, again)
    assert mp.get_rng_tracker().get_states()[mp.MODEL_PARALLEL_RNG][0] == "cuda"

    config = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                         vocab_size=101, max_position_embeddings=32, sequence_parallel=True)
    torch.manual_seed(0)
    cpu_model = LlamaModel(config)
    gpu_model = LlamaModel(config).cuda()
    gpu_model.load_hf_state_dict(cpu_model.hf_state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 16))
    labels = torch.randint(0, config.vocab_size, (2, 16))
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        model(ids.to(device), labels=labels.to(device)).sum().backward()
    torch.testing.assert_close(gpu_model(ids.cuda()).cpu(), cpu_model(ids), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu_model(ids.cuda(), labels=labels.cuda()).cpu(), cpu_model(ids, labels=labels),
                               rtol=1e-4, atol=1e-5)
    for (name, p_cpu), p_gpu in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-4, atol=1e-5, msg=name)

    logits = torch.randn(8, 101, device="cuda", requires_grad=True)
    target = torch.randint(0, 101, (8,), device="cuda")
    loss = mp.vocab_parallel_cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="none"))
    mp.destroy_model_parallel()
    return True


def test_model_rng_and_loss_on_cuda_with_nccl():
    assert run_distributed(_on_nccl, 1, backend="nccl", timeout=300) == [True]
