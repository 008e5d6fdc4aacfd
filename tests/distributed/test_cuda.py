"""DDP buckets and both optimizers on a CUDA device (one NCCL rank): same result as on CPU.

Skipped without a GPU (the project's CI is CPU-only); run on a GPU machine to check that nothing in
the data-parallel and optimizer path assumes CPU tensors (fused AdamW step counters, norms,
token counts, all-gathers).
"""
import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megallama.checkpoint.sharded import OPTIMIZER_MOMENTS, install_optimizer_state, optimizer_step_count
from megallama.distributed import DistributedDataParallel, OptimizerConfig, build_optimizer, finalize_model_grads
from megallama.parallel import state
from megallama.pipeline import ActivationShape, get_forward_backward_func

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPT = dict(lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.05)


def _toy(device, dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 4)).to(device=device, dtype=dtype)


def _data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _forward_step(data_iterator, chunk, input_tensor):
    x, y = next(data_iterator)
    out = chunk(x.to(chunk.grad_buffer.device, next(chunk.parameters()).dtype))
    return out, lambda o: (((o.float() - y.to(o.device)) ** 2).sum(), y.numel())


def _saved(chunk, opt):
    """What a checkpoint keeps of a run: (model state, optimizer buffers as the sharded checkpoint
    loads them, optimizer step)."""
    buffers = {}
    for index, e in enumerate(opt.entries):
        buffers[(index, "main_param")] = e.main.detach().reshape(-1).cpu().clone()
        for what in OPTIMIZER_MOMENTS:
            buffers[(index, what)] = opt.optimizer.state[e.main][what].reshape(-1).cpu().clone()
    return ({k: v.clone() for k, v in chunk.module.state_dict().items()}, buffers,
            optimizer_step_count(opt))


def _train(device, dtype, distributed_opt, steps=3, resume=None, first_step=0):
    chunk = DistributedDataParallel(_toy(device, dtype), use_distributed_optimizer=distributed_opt,
                                    bucket_size=1000)
    opt = build_optimizer(OptimizerConfig(use_distributed_optimizer=distributed_opt, **OPT), [chunk])
    if resume is not None:
        module_state, buffers, step = resume
        chunk.module.load_state_dict(module_state)
        install_optimizer_state(opt, buffers, step, missing=set())
    norms = []
    for step in range(first_step, first_step + steps):
        x, y = _data(step)
        opt.zero_grad()
        losses = get_forward_backward_func(1, None)(_forward_step, iter([(x[:4], y[:4]), (x[4:], y[4:])]),
                                                    [chunk], 2, ActivationShape(1, 4, 16, dtype))
        finalize_model_grads([chunk], losses)
        applied, norm = opt.step()
        assert applied
        norms.append(float(norm))
    return chunk, opt, norms


@pytest.fixture()
def nccl_rank(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    torch.cuda.set_device(0)
    state.initialize_model_parallel(1, 1)
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    state.destroy_model_parallel()
    dist.destroy_process_group()


def test_cuda_matches_cpu_and_bf16_keeps_fp32_main_params(nccl_rank):
    cpu = _toy("cpu", torch.float32)
    ref = torch.optim.AdamW([{"params": [p for p in cpu.parameters() if p.dim() >= 2]},
                             {"params": [p for p in cpu.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=OPT["lr"], betas=(OPT["adam_beta1"], OPT["adam_beta2"]),
                            eps=OPT["adam_eps"], weight_decay=OPT["weight_decay"])
    ref_norms = []
    for step in range(3):
        x, y = _data(step)
        ref.zero_grad()
        ((cpu(x) - y) ** 2).mean().backward()
        ref_norms.append(float(nn.utils.clip_grad_norm_(cpu.parameters(), OPT["clip_grad"])))
        ref.step()
    assert ref_norms[0] > OPT["clip_grad"]
    for distributed_opt in (False, True):
        chunk, _, norms = _train("cuda", torch.float32, distributed_opt)
        assert norms == pytest.approx(ref_norms, rel=1e-4)
        for (name, p), q in zip(chunk.module.named_parameters(), cpu.parameters()):
            torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-4, atol=1e-6, msg=name)

    for distributed_opt in (False, True):
        chunk, opt, _ = _train("cuda", torch.bfloat16, distributed_opt)
        for e in opt.entries:
            assert e.main.dtype == torch.float32 and e.param.dtype == torch.bfloat16
            assert torch.equal(e.main.detach().reshape(-1).to(torch.bfloat16),
                               e.param.detach().reshape(-1)[e.lo:e.hi]), e.name
        # Resuming from what a checkpoint keeps (into a fresh model) continues the run exactly.
        resumed, _, _ = _train("cuda", torch.bfloat16, distributed_opt, steps=1, resume=_saved(chunk, opt),
                               first_step=3)
        straight, _, _ = _train("cuda", torch.bfloat16, distributed_opt, steps=4)
        for p, q in zip(resumed.module.parameters(), straight.module.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
