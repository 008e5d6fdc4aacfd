#!/usr/bin/env python
"""Plan a run before the first step: which TP/PP/DP/SP/recompute/micro-batch layout fits the
GPUs, how much memory each GPU holds, how long a step takes, how many days and GPU-hours.

    python tools/plan.py --model-size 65b --train-tokens 1.4e12 --gpus 2048 --gpu a100-80gb
    python tools/plan.py --model-size 7b --train-tokens 1e12 --gpus 64 --json
    python tools/plan.py --inference --gpu a100-80gb --inference-batch 8 --inference-context 2048

Exits 1 with the reason when no layout fits.
"""
import argparse
import dataclasses
import json
import sys

from megallama.config import _PRESETS, LlamaConfig
from megallama.planning.calibration import CalibrationError, Constant, load_calibration
from megallama.planning.hardware import GPUS, gpu_spec
from megallama.planning.inference import inference_table
from megallama.planning.layout import Workload
from megallama.planning.planner import DEFAULT_RESERVE, MICRO_BATCH_CHOICES, PlanRequest, plan
from megallama.planning.report import format_inference, format_plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model-size", choices=sorted(name for name in _PRESETS if name != "tiny"),
                   help="a preset's shape: the paper's (Table 2), LLaMA-2's or LLaMA-3's (GQA and vocabulary "
                   "included), as pretrain's --model-size")
    g.add_argument("--hf-config", help="take the shape from a Hugging Face LLaMA config.json instead")
    g.add_argument("--num-layers", type=int, help="layers (overrides --model-size)")
    g.add_argument("--hidden-size", type=int, help="model width (overrides --model-size)")
    g.add_argument("--num-attention-heads", type=int, help="attention heads (overrides --model-size)")
    g.add_argument("--ffn-hidden-size", type=int, help="SwiGLU width; default LLaMA's 2/3·4·hidden rounded to 256")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (default: the preset's, else 32000)")
    g = p.add_argument_group("run")
    g.add_argument("--train-tokens", type=float, help="tokens to train on, e.g. 1.4e12")
    g.add_argument("--gpus", type=int, help="GPUs in the job")
    g.add_argument("--global-batch-size", type=int, default=2048, help="sequences per optimizer step")
    g.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence")
    g.add_argument("--fp32", action="store_true", help="fp32 weights and activations instead of bf16")
    g.add_argument("--micro-batch-size", type=int, nargs="+", default=list(MICRO_BATCH_CHOICES),
                   help="micro-batch sizes to consider")
    g.add_argument("--tensor-model-parallel-size", type=int, nargs="+", help="TP sizes to consider (default all)")
    g.add_argument("--pipeline-model-parallel-size", type=int, nargs="+", help="PP sizes to consider (default all)")
    g.add_argument("--overlap-communication", action="store_true",
                   help="model TP collectives hidden behind the matmuls and the weight all-gather behind the "
                   "next forward (the paper's §2.4; this codebase overlaps only the latter: --overlap-param-gather)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="model the distributed optimizer's weight all-gather hidden behind the next forward, "
                   "as pretrain --overlap-param-gather runs it (TP collectives stay exposed)")
    g = p.add_argument_group("GPU (the table's figures; each overridable)")
    g.add_argument("--gpu", choices=sorted(GPUS), default="a100-80gb", help="device type")
    g.add_argument("--gpu-tflops", type=float, help="peak dense bf16 TFLOP/s")
    g.add_argument("--gpu-memory-gb", type=float, help="device memory in GB")
    g.add_argument("--gpu-hbm-gb-s", type=float, help="device memory bandwidth, GB/s")
    g.add_argument("--gpu-nvlink-gb-s", type=float, help="NVLink bandwidth per GPU and direction, GB/s")
    g.add_argument("--gpu-network-gb-s", type=float, help="inter-node network per GPU and direction, GB/s")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (NVLink domain)")
    g.add_argument("--reserve", type=float, default=DEFAULT_RESERVE,
                   help="fraction of device memory kept free for the CUDA context, NCCL and fragmentation")
    g = p.add_argument_group("calibration")
    g.add_argument("--mfu", type=float, help="compute efficiency to assume instead of the bench/results one")
    g.add_argument("--calibration-dir", help="folder of benchmark results (default this checkout's bench/results)")
    g = p.add_argument_group("output")
    g.add_argument("--top", type=int, default=10, help="layouts to list (--json lists all that fit)")
    g.add_argument("--json", action="store_true", help="print the plan as JSON")
    g.add_argument("--inference", action="store_true",
                   help="print the inference cost of each model size instead of a training plan")
    g.add_argument("--inference-batch", type=int, default=1, help="sequences decoded together")
    g.add_argument("--inference-context", type=int, default=2048, help="tokens of context per sequence")
    return p


def model_from_args(args, parser) -> LlamaConfig:
    if args.hf_config:
        from transformers import LlamaConfig as HFLlamaConfig

        try:
            return LlamaConfig.from_hf(HFLlamaConfig.from_json_file(args.hf_config))
        except (OSError, ValueError) as error:
            parser.error(f"--hf-config {args.hf_config}: {error}")
    shape = {name: getattr(args, name) for name in ("num_layers", "hidden_size", "num_attention_heads",
                                                    "ffn_hidden_size") if getattr(args, name) is not None}
    shape.update(max_position_embeddings=args.seq_length)
    if args.vocab_size is not None or not args.model_size:  # LLaMA-3's presets hold 128,256 tokens
        shape.update(vocab_size=args.vocab_size or 32000)
    try:
        if args.model_size:
            # replace, not the preset's fields: its head size, K/V heads and FFN width were derived from
            # its own width and heads and are derived again from the new ones (a stale head size of 128
            # made `--model-size 7b --hidden-size 2048` a 2.3B model instead of 1.8B).
            return dataclasses.replace(LlamaConfig.preset(args.model_size), **shape)
        missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if n not in shape]
        if missing:
            parser.error(f"give --model-size or --{missing[0].replace('_', '-')}")
        return LlamaConfig.from_dict(shape)
    except ValueError as error:
        parser.error(str(error))


def check_positive(args, parser) -> None:
    """Sizes and counts below 1 would divide by zero deep in the model or plan negative days."""
    for flag in ("--train-tokens", "--vocab-size", "--global-batch-size", "--seq-length", "--micro-batch-size",
                 "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--top", "--inference-batch",
                 "--inference-context"):
        value = getattr(args, flag[2:].replace("-", "_"))
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v <= 0:
                parser.error(f"{flag} must be positive, got {v:g}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_positive(args, parser)
    try:
        gpu = gpu_spec(args.gpu, bf16_tflops=args.gpu_tflops, memory_gb=args.gpu_memory_gb, hbm_gb_s=args.gpu_hbm_gb_s,
                       nvlink_gb_s=args.gpu_nvlink_gb_s, network_gb_s=args.gpu_network_gb_s,
                       gpus_per_node=args.gpus_per_node)
    except ValueError as error:
        parser.error(str(error))
    if not 0 <= args.reserve < 1:
        parser.error(f"--reserve must be in [0, 1), got {args.reserve}")
    if args.inference:
        try:
            costs = inference_table(gpu, args.inference_batch, args.inference_context, args.reserve)
        except ValueError as error:
            print(f"plan.py: {error}", file=sys.stderr)
            return 1
        print(json.dumps([c.to_dict() for c in costs], indent=2) if args.json
              else format_inference(costs, gpu.name, args.inference_batch, args.inference_context))
        return 0
    if args.train_tokens is None or args.gpus is None:
        parser.error("a training plan needs --train-tokens and --gpus (or give --inference)")
    model = model_from_args(args, parser)
    try:
        calibration = load_calibration(args.calibration_dir)
    except CalibrationError as error:
        print(f"plan.py: {error}", file=sys.stderr)
        return 1
    if args.mfu is not None:
        if not 0 < args.mfu <= 1:
            parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
        calibration.mfu = Constant(args.mfu, "--mfu (given on the command line)")
    request = PlanRequest(Workload(model, args.seq_length, args.global_batch_size, not args.fp32), gpu, args.gpus,
                          args.train_tokens, calibration, args.reserve, args.overlap_communication,
                          tuple(args.tensor_model_parallel_size or ()) or None,
                          tuple(args.pipeline_model_parallel_size or ()) or None, tuple(args.micro_batch_size),
                          overlap_param_gather=args.overlap_param_gather)
    try:
        result = plan(request)
    except ValueError as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps({"calibration": calibration.to_dict(), "gpu": vars(gpu), "gpus": args.gpus,
                          "train_tokens": args.train_tokens, "fitting": [c.to_dict() for c in result.fitting],
                          "considered": result.considered,
                          "nothing_fits": None if result.fitting else result.explain_no_fit()}, indent=2))
    else:
        print(format_plan(result, args.top))
    return 0 if result.fitting else 1


if __name__ == "__main__":
    sys.exit(main())
