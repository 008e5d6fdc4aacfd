"""Issue 19's abort-at-exit script, one rank of it: the README's "tensor parallelism in your own
code" as a user writes it (sequence parallelism under TP=4, one forward, exit without destroying
any process group).

``torchrun --nproc-per-node 4 sp_forward_then_exit.py``. ``MEGALLAMA_TEST_NO_TEARDOWN=1``
removes the exit hook ``initialize_model_parallel`` registers (the control: the abort comes back).
"""
import atexit
import os

import torch
import torch.distributed as dist

from megallama.config import LlamaConfig
from megallama.model import LlamaModel
from megallama.parallel import initialize_model_parallel, model_parallel_manual_seed, state

torch.set_num_threads(1)
dist.init_process_group("gloo")
initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
if os.environ.get("MEGALLAMA_TEST_NO_TEARDOWN") == "1":
    atexit.unregister(state.destroy_model_parallel)
model_parallel_manual_seed(1234)
config = LlamaConfig.preset("tiny", sequence_parallel=True)
logits = LlamaModel(config)(input_ids=torch.randint(0, config.vocab_size, (2, 16)))
print(f"rank {dist.get_rank()}: logits {tuple(logits.shape)}")
