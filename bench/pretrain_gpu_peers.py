"""Pretraining throughput on one device, side by side: megallama vs torchtitan vs megatron-core.

The same LLaMA shape, sequence length, global batch, precision and device for each side, the sides
alternating in one run (each round runs every side once, in a rotated order, each in a process of
its own so that peak memory is its own); tokens/s and TFLOP/s over the second half of each run (the
first half warms up, torch.compile included), MFU against the GPU's datasheet peak, peak memory
(``torch.cuda.max_memory_allocated``; peak resident set size on CPU), medians over rounds.

  megallama      ``torchrun -m megallama.pretrain --mock-data --bf16`` (figures from its log line)
  torchtitan     0.2.2 (the newest release that runs on torch 2.11): its llama3 Transformer built
                 for the same shape (rotary theta 10000, untied head, its default SDPA attention),
                 its ``parallelize_llama`` (per-block torch.compile on CUDA, no activation
                 checkpointing) and, as it does on more ranks, its ``apply_fsdp`` on a one-rank mesh
                 (FSDP2 mixed precision bf16 / fp32 reduce), its cross-entropy loss (summed, over
                 the batch's tokens), fused AdamW, clipping 1.0: its Trainer's step without its data
                 loader (which needs an HF tokenizer and data set)
  megatron-core  GPTModel with the local layer spec (Transformer Engine's only where TE is
                 installed), RMSNorm, SwiGLU, RoPE, no biases, untied head; bf16 autocast over fp32
                 weights, fused AdamW (megatron's own mixed-precision optimizer is not used)

FLOPs are counted alike for all (``megallama.training.flops.estimate_flops``). Peers are imported
from wheels in ``--wheels`` (``make peer-wheels`` fills ``.whl/``), installed with ``pip install
--no-deps --target`` into a scratch folder: nothing is fetched, the machine's own (CUDA) torch is
used. Where a side cannot run, the results say why (its last error line and where it was raised).

With ``--profile-dir`` every side of the last round also records two untimed iterations with
``torch.profiler`` through megallama's ``--use-pytorch-profiler`` code: a table per side of where the
device time goes, to explain a gap.

    python bench/pretrain_gpu_peers.py                        # the GPU shapes (16x2048, 7B cut)
    python bench/pretrain_gpu_peers.py --device cpu --tiny    # the same harness at toy size on CPU
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from benchlib import add_json_flag, ratio_row, write_json
from pretrain import LINE, free_port, model_flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIDES = ("megallama", "torchtitan", "megatron-core")
PEER_MODULES = {"torchtitan": "torchtitan", "megatron-core": "megatron.core"}
PEAK_MEMORY = re.compile(r"peak memory (\S+) GiB")
LLAMA_7B = dict(hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008, vocab_size=32000)
SHAPES = {
    "16x2048": dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632, vocab_size=32000,
                    seq_length=2048, micro_batch_size=4, global_batch_size=16),
    "7b-cut-s2048": dict(LLAMA_7B, seq_length=2048, micro_batch_size=2, global_batch_size=8),
    "7b-cut-s4096": dict(LLAMA_7B, seq_length=4096, micro_batch_size=1, global_batch_size=4),
}
TINY_SHAPES = {"tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                            vocab_size=512, seq_length=64, micro_batch_size=2, global_batch_size=4)}
# Bytes a 7B block costs at its largest (fp32 main weights, bf16 copy, fp32 grads, Adam m and v
# ≈ 18 B a parameter) plus its activations at seq 4096 with headroom: how many blocks fit.
BLOCK_PARAMS_7B = 4 * 4096 ** 2 + 3 * 4096 * 11008
BLOCK_BYTES_7B = 18 * BLOCK_PARAMS_7B + 3 * 2 ** 30


def layers_that_fit(memory_bytes: int) -> int:
    """7B blocks (1 to 32) whose weights, optimizer state and activations fit in 80% of
    ``memory_bytes`` after 4 GiB for the embedding, the head and the workspace."""
    return max(1, min(32, int(0.8 * memory_bytes - 4 * 2 ** 30) // BLOCK_BYTES_7B))


def install_peers(wheel_dir: str, target: str) -> str:
    """``pip install --no-deps --target`` each wheel of ``wheel_dir`` this Python can install
    (the folder may hold builds for several Python versions); '' or what failed."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    names = sorted(w for w in os.listdir(wheel_dir) if w.endswith(".whl")) if os.path.isdir(wheel_dir) else []
    if not names:
        return f"no wheels in {wheel_dir} (run `make peer-wheels` where a package registry is reachable)"
    supported = set(sys_tags())
    failures = []
    for name in names:
        if not supported & set(parse_wheel_filename(name)[3]):
            continue
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                 "--target", target, os.path.join(wheel_dir, name)], capture_output=True, text=True)
        if result.returncode:
            lines = result.stderr.strip().splitlines()
            failures.append(f"{name}: {lines[-1] if lines else 'pip failed'}")
    return "; ".join(failures)


def error_reason(error: BaseException, package: str = "") -> str:
    """The error, where it was raised and the last frame in ``package`` that led there."""
    def where(frame):
        path = frame.filename
        for root in sorted(sys.path, key=len, reverse=True):  # shortest readable name
            if root and path.startswith(root + os.sep):
                path = os.path.relpath(path, root)
                break
        return f"{path}:{frame.lineno}"

    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    text = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {text[0] if text else ''}"
    if frames:
        reason += f" (raised at {where(frames[-1])}"
        ours = [f for f in frames if package and f"{os.sep}{package}{os.sep}" in f.filename]
        if ours and ours[-1] is not frames[-1]:
            reason += f", from {where(ours[-1])}"
        reason += ")"
    return reason


def mock_batches(m: dict, steps: int, device: torch.device) -> list:
    """Random token ids and next-token labels, ``micro_batch_size`` sequences at a time, all made and
    on the device before timing starts: a peer's step then never waits on a host-to-device copy
    (megallama's own loader pins and copies without blocking)."""
    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(steps * (m["global_batch_size"] // m["micro_batch_size"])):
        seq = torch.randint(0, m["vocab_size"], (m["micro_batch_size"], m["seq_length"] + 1), generator=g).to(device)
        batches.append((seq[:, :-1], seq[:, 1:]))
    return batches


def profiled_range(iters: int) -> tuple[int, int]:
    """The two iterations (0-based, end excluded) a profiled run records: the last two of the
    untimed first half, so the timed half is the same as an unprofiled run's."""
    return max(0, iters // 2 - 2), iters // 2


def profiler_for(iters: int, device: torch.device, profile_dir: str | None):
    """A :class:`~megallama.training.profiling.IterationProfiler` writing into ``profile_dir``
    (megallama's own ``--use-pytorch-profiler`` code, so that every side's table is made alike)."""
    from megallama.training.config import TrainingArgs
    from megallama.training.profiling import IterationProfiler

    start, end = profiled_range(iters)
    settings = TrainingArgs(profile=profile_dir is not None, use_pytorch_profiler=True,
                            profile_step_start=start, profile_step_end=end)
    return IterationProfiler(settings, profile_dir, 0, device)


def timed_loop(m: dict, iters: int, device: torch.device, step_fn, profile_dir: str | None = None) -> dict:
    """Run ``step_fn(micro_batches)`` ``iters`` times; tokens/s over the second half, timed as one
    window (synchronised at its two ends only, as megallama's log line times its interval), last
    loss; with ``profile_dir``, a profile of :func:`profiled_range` written there."""
    from megallama.training.logger import peak_memory_bytes

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    accumulation = m["global_batch_size"] // m["micro_batch_size"]
    batches = iter(mock_batches(m, iters, device))
    profiler = profiler_for(iters, device, profile_dir)
    timed_from = iters // 2
    loss, start = None, None
    try:
        for i in range(iters):
            if i == timed_from:
                synchronize()
                start = time.perf_counter()
            profiler.before(i)
            loss = step_fn([next(batches) for _ in range(accumulation)])
            if profiler.ends_after(i + 1):
                profiler.close()
        synchronize()
    finally:
        profiler.close()  # a step that raised: a profiler left running crashes the interpreter's exit
    per_iteration = (time.perf_counter() - start) / (iters - timed_from)
    return {"tokens_per_s": m["global_batch_size"] * m["seq_length"] / per_iteration,
            "peak_memory_bytes": peak_memory_bytes(device), "loss": float(loss)}


def indexed(device: torch.device) -> torch.device:
    """``device`` with its index: a bare ``cuda`` is the current CUDA device (``torch.cuda.set_device``
    and the peers' code want an index; a side's worker indexes its device once, for all of it)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def init_single_process_group(device: torch.device) -> None:
    """A one-process group (the peers' parallel state needs one), unless the caller made it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def stand_in_for_hf_datasets() -> None:
    """torchtitan 0.2 imports Hugging Face ``datasets`` when its model modules load (for its data
    loader, which this benchmark does not use); where ``datasets`` is not installed (the GPU
    machine), an empty stand-in that raises if called lets them load."""
    import importlib.util
    import types

    try:
        if importlib.util.find_spec("datasets") is not None:
            return
    except (ImportError, ValueError):  # a broken install: the stand-in too
        pass

    def missing(*args, **kwargs):
        raise ImportError("datasets is not installed (torchtitan's data loader is not used here)")

    datasets, distributed = types.ModuleType("datasets"), types.ModuleType("datasets.distributed")
    datasets.__path__, datasets.Dataset, datasets.load_dataset = [], type("Dataset", (), {}), missing
    datasets.distributed, distributed.split_dataset_by_node = distributed, missing
    sys.modules.update({"datasets": datasets, "datasets.distributed": distributed})


def torchtitan_side(m: dict, iters: int, device: torch.device, compile_model: bool,
                    profile_dir: str | None = None) -> dict:
    stand_in_for_hf_datasets()
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs, parallelize_llama
    from torchtitan.models.llama3.infra.parallelize import apply_fsdp

    init_single_process_group(device)
    h, ffn = m["hidden_size"], m["ffn_hidden_size"]
    # Its FeedForward makes 2/3 of 4h, times ffn_dim_multiplier, rounded up to multiple_of: this
    # pair gives exactly ffn_hidden_size. Its default SDPA attention, full heads (no GQA).
    args = TransformerModelArgs(dim=h, n_layers=m["num_layers"], n_heads=m["num_attention_heads"],
                                vocab_size=m["vocab_size"], multiple_of=ffn,
                                ffn_dim_multiplier=ffn / int(2 * 4 * h / 3), rope_theta=10000.0,
                                max_seq_len=m["seq_length"])
    with torch.device("meta"):
        model = Transformer(args)
    assert model.layers["0"].feed_forward.w1.out_features == ffn
    job = JobConfig()
    job.job.dump_folder = tempfile.gettempdir()
    job.training.local_batch_size, job.training.seq_len = m["micro_batch_size"], m["seq_length"]
    job.training.mixed_precision_param = "bfloat16" if device.type == "cuda" else "float32"
    job.activation_checkpoint.mode = "none"
    job.compile.enable = compile_model  # its default components: the blocks and the loss
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    model = parallelize_llama(model, dims, job)  # per-block compile; one rank: no FSDP here
    # What its parallelize applies on more ranks, on a one-rank mesh: FSDP2 mixed precision (bf16
    # parameters, fp32 reduction), so that one GPU trains as each rank of its multi-GPU runs does.
    apply_fsdp(model, init_device_mesh(device.type, (1,), mesh_dim_names=("fsdp",)),
               param_dtype=TORCH_DTYPE_MAP[job.training.mixed_precision_param],
               reduce_dtype=TORCH_DTYPE_MAP[job.training.mixed_precision_reduce], pp_enabled=False,
               reshard_after_forward_policy=job.parallelism.fsdp_reshard_after_forward)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    loss_fn = build_cross_entropy_loss(job)  # summed over tokens; its Trainer divides by the batch's
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=device.type == "cuda")
    tokens = m["global_batch_size"] * m["seq_length"]
    train_context = dist_utils.get_train_context(False)  # as its Trainer wraps each step

    def step(micro_batches):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for ids, labels in micro_batches:
            with train_context():
                loss = loss_fn(model(ids), labels) / tokens
                loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return total

    return timed_loop(m, iters, device, step, profile_dir)


def megatron_core_side(m: dict, iters: int, device: torch.device, profile_dir: str | None = None) -> dict:
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    init_single_process_group(device)
    parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        ffn_hidden_size=m["ffn_hidden_size"], normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=device.type != "cuda")
    try:  # Transformer Engine's fused layers where it is installed, else the local (plain torch) spec
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        import transformer_engine  # noqa: F401
        spec, spec_name = get_gpt_layer_with_transformer_engine_spec(), "transformer_engine"
    except ImportError:
        spec, spec_name = get_gpt_layer_local_spec(normalization="RMSNorm"), "local"
    model = GPTModel(config, spec, vocab_size=m["vocab_size"],
                     max_sequence_length=m["seq_length"], position_embedding_type="rope", rotary_base=10000,
                     share_embeddings_and_output_weights=False).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    positions = torch.arange(m["seq_length"], device=device).expand(m["micro_batch_size"], -1)
    accumulation = m["global_batch_size"] // m["micro_batch_size"]

    def step(micro_batches):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for ids, labels in micro_batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                per_token = model(ids, positions, None, labels=labels)
            loss = per_token.float().mean() / accumulation
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return total

    return dict(timed_loop(m, iters, device, step, profile_dir), layer_spec=spec_name)


def megallama_side(m: dict, iters: int, device: torch.device, threads: int, profile_dir: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "megallama.pretrain", *model_flags(m, iters)]
    if profile_dir:
        start, end = profiled_range(iters)
        command += ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(start),
                    "--profile-step-end", str(end), "--tensorboard-dir", profile_dir]
    if device.type == "cuda":
        command.append("--bf16")
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        return {"error": f"megallama.pretrain exited {result.returncode}: {lines[-1] if lines else ''}"}
    tokens = float(LINE.findall(result.stdout)[-1][0])
    return {"tokens_per_s": tokens, "peak_memory_bytes": float(PEAK_MEMORY.findall(result.stdout)[-1]) * 2 ** 30}


def run_side(side: str, m: dict, args, peer_path: str, profile_dir: str | None = None) -> dict:
    """One run of ``side`` in a fresh process: its figures, or ``{"error": why}``; with
    ``profile_dir``, its profile there too."""
    if side == "megallama":
        return megallama_side(m, args.iters, torch.device(args.device), args.threads, profile_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(p for p in (peer_path, ROOT, os.environ.get("PYTHONPATH")) if p))
    spec = json.dumps({"side": side, "shape": m, "iters": args.iters, "device": args.device,
                       "compile": args.compile, "profile_dir": profile_dir})
    result = subprocess.run([sys.executable, __file__, "--side-worker", spec], env=env, capture_output=True,
                            text=True, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    if result.returncode or not lines:
        tail = result.stderr.strip().splitlines()
        return {"error": f"{side} worker exited {result.returncode}: {tail[-1] if tail else 'no output'}"}
    return json.loads(lines[-1])


def side_worker(spec: dict) -> dict:
    device = indexed(torch.device(spec["device"]))
    module = PEER_MODULES[spec["side"]]
    package = module.split(".")[0]
    try:
        __import__(module)
    except Exception as error:  # what the results file reports as "cannot run"
        return {"error": f"import {module}: {error_reason(error, package)}"}
    version = importlib.metadata.version(spec["side"])
    try:
        if spec["side"] == "torchtitan":
            result = torchtitan_side(spec["shape"], spec["iters"], device, spec["compile"], spec["profile_dir"])
        else:
            result = megatron_core_side(spec["shape"], spec["iters"], device, spec["profile_dir"])
    except Exception as error:
        return {"error": f"{spec['side']} {version}: {error_reason(error, package)}"}
    return dict(result, version=version)


def flops_per_token(m: dict) -> float:
    from megallama.training.flops import estimate_flops

    return estimate_flops(num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                          ffn_hidden_size=m["ffn_hidden_size"], seq_length=m["seq_length"],
                          vocab_size=m["vocab_size"]) / m["seq_length"]


def summarise(m: dict, runs: dict, peak_tflops: float | None) -> dict:
    """Medians per side; a side with no successful run keeps its first error as the reason."""
    out = {}
    for side, samples in runs.items():
        ok = [s for s in samples if "error" not in s]
        if not ok:
            out[side] = {"ran": False, "why": samples[0]["error"] if samples else "not run"}
            continue
        tokens = statistics.median(s["tokens_per_s"] for s in ok)
        tflops = tokens * flops_per_token(m) / 1e12
        out[side] = {"ran": True, "tokens_per_s": tokens, "tflops": tflops,
                     "mfu": tflops / peak_tflops if peak_tflops else None,
                     "peak_memory_gib": statistics.median(s["peak_memory_bytes"] for s in ok) / 2 ** 30,
                     "runs": len(ok), "failed_runs": len(samples) - len(ok)}
        out[side].update({key: ok[-1][key] for key in ("loss", "version", "layer_spec") if key in ok[-1]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Where every side trains (default: the GPU when there is one).")
    parser.add_argument("--tiny", action="store_true", help="A toy shape (2 layers, width 64) to test the harness.")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES),
                        help="Shapes to run (default all; the 7B cuts keep the blocks that fit).")
    parser.add_argument("--layers-7b", type=int, default=None,
                        help="Blocks in the 7B cut (default: as many as fit in 80%% of the GPU's memory).")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="Sides to run.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds; medians are reported.")
    parser.add_argument("--iters", type=int, default=10, help="Iterations per run (the second half is timed).")
    parser.add_argument("--threads", type=int, default=2, help="Threads per process (matters on CPU).")
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                        help="Folder of the peers' wheels (`make peer-wheels`), installed for this run ahead of any "
                             "installed copy.")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile torchtitan's blocks, as its trainer does (default: on CUDA only).")
    parser.add_argument("--profile-dir", default=None,
                        help="Profile each side in the last round (two iterations at the end of the untimed first "
                             "half, with torch.profiler): DIR/SHAPE.SIDE/ gets megallama's --use-pytorch-profiler "
                             "files, a trace and a table of the operators by their own device time.")
    parser.add_argument("--side-worker", help=argparse.SUPPRESS)
    add_json_flag(parser)
    args = parser.parse_args()
    if args.side_worker:
        print(json.dumps(side_worker(json.loads(args.side_worker))))
        return
    device = torch.device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    shapes = TINY_SHAPES if args.tiny else {name: dict(SHAPES[name]) for name in args.shapes}
    for m in shapes.values():
        if "num_layers" not in m:
            m["num_layers"] = args.layers_7b or (
                layers_that_fit(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else 2)
    peak = None
    device_name = "CPU"
    if device.type == "cuda":
        from megallama.training.flops import detect_peak_tflops

        device_name = torch.cuda.get_device_name(device)
        peak = detect_peak_tflops(torch.bfloat16, device)
    with tempfile.TemporaryDirectory(prefix="peers_") as peer_path:
        install_error = install_peers(args.wheels, peer_path)
        results = {}
        for shape, m in shapes.items():
            runs = {side: [] for side in args.sides}
            for r in range(args.rounds):
                order = args.sides[r % len(args.sides):] + args.sides[:r % len(args.sides)]
                for side in order:
                    profile_dir = (os.path.join(os.path.abspath(args.profile_dir), f"{shape}.{side}")
                                   if args.profile_dir and r == args.rounds - 1 else None)
                    runs[side].append(run_side(side, m, args, peer_path, profile_dir))
                print(f"{shape}: round {r + 1}/{args.rounds} done", flush=True)
            results[shape] = {"model": m, "sides": summarise(m, runs, peak)}
    rows = []
    print(f"\n{device_name}, {'bf16' if device.type == 'cuda' else 'fp32'}"
          f"{f', datasheet peak {peak} TFLOP/s' if peak else ''}")
    for shape, result in results.items():
        print(f"\n{shape}: {result['model']}")
        print(f"{'side':15s} {'tokens/s':>10s} {'TFLOP/s':>9s} {'MFU':>7s} {'peak GiB':>9s}")
        sides = result["sides"]
        for side, s in sides.items():
            if not s["ran"]:
                print(f"{side:15s} cannot run: {s['why']}")
                continue
            mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] else "n/a"
            print(f"{side:15s} {s['tokens_per_s']:10.1f} {s['tflops']:9.4g} {mfu:>7s} {s['peak_memory_gib']:9.3f}")
        ours = sides.get("megallama", {})
        for peer in ("torchtitan", "megatron-core"):
            if ours.get("ran") and sides.get(peer, {}).get("ran"):
                ratio = ours["tokens_per_s"] / sides[peer]["tokens_per_s"]
                memory = ours["peak_memory_gib"] / sides[peer]["peak_memory_gib"]
                print(f"megallama / {peer}: {ratio:.2f}x tokens/s, {memory:.2f}x peak memory")
                label = f"pretrain {shape}, 1 {'GPU bf16' if device.type == 'cuda' else 'CPU fp32'}"
                rows.append(ratio_row(label, "tokens/s", peer, ratio, "≥ 1.1×" if peer == "torchtitan" else ""))
                rows.append(ratio_row(label, "peak memory", peer, memory))
    write_json(args.json, rows, {"device": device_name, "torch": torch.__version__,
                                 "date": datetime.date.today().isoformat(), "peer_install": install_error or "ok",
                                 "command": " ".join(["python", *sys.argv]), "shapes": results})


if __name__ == "__main__":
    main()
