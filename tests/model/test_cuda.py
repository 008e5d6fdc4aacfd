"""The model on a CUDA device equals the CPU model (skipped without a GPU; CI is CPU-only)."""
import pytest
import torch

from megallama.config import LlamaConfig
from megallama.model import LlamaModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(dtype):
    config = LlamaConfig(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=352,
                         vocab_size=1000, max_position_embeddings=128)
    torch.manual_seed(0)
    cpu = LlamaModel(config)
    gpu = LlamaModel(config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return config, cpu, gpu.to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 5e-2)])
def test_cuda_loss_and_gradients_match_cpu(dtype, tol):
    config, cpu, gpu = _pair(dtype)
    ids = torch.randint(0, config.vocab_size, (2, 96))
    labels = torch.roll(ids, -1, 1)
    cpu_loss = cpu(ids, labels=labels)
    gpu_loss = gpu(ids.cuda(), labels=labels.cuda())
    assert gpu_loss.dtype == torch.float32
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=tol, atol=tol)
    cpu_loss.mean().backward()
    gpu_loss.mean().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        scale = p.grad.abs().max().item()
        err = (q.grad.float().cpu() - p.grad).abs().max().item()
        assert err <= 10 * tol * scale + 1e-6, (name, err, scale)
    logits = gpu(ids.cuda())
    assert logits.shape == (2, 96, config.vocab_size) and torch.isfinite(logits.float()).all()
