"""Text and JSON forms of a plan, and the estimate ``megallama.pretrain`` prints for its own layout."""
from __future__ import annotations

import torch

from megallama.planning.inference import InferenceCost
from megallama.planning.layout import Layout, Workload
from megallama.planning.memory import RankMemory, training_memory
from megallama.planning.planner import DEFAULT_RESERVE, Plan

GB = 1e9


def memory_line(r: RankMemory) -> str:
    unit, scale = ("GB", GB) if r.total >= GB else ("MB", 1e6)
    return (f"{r.total / scale:.1f} {unit} = weights {r.weights / scale:.1f} + grads {r.gradients / scale:.1f} + "
            f"main {r.main_weights / scale:.1f} + Adam {r.optimizer_states / scale:.1f} + activations "
            f"{r.activations / scale:.1f} ({r.inflight_forwards} chunk forwards in flight) + buffers "
            f"{r.working_buffers / scale:.1f}, at the {r.peak_moment}")


def format_plan(p: Plan, top: int) -> str:
    r, w = p.request, p.request.workload
    cal = r.calibration
    lines = [f"{w.model.num_parameters() / 1e9:.1f}B parameters ({w.model.num_layers} layers × {w.model.hidden_size}), "
             f"{r.train_tokens:.3g} tokens, global batch {w.global_batch_size} × {w.seq_length} tokens, "
             f"{r.num_gpus} × {r.gpu.name} ({r.gpu.bf16_tflops:g} TFLOP/s bf16, {r.gpu.memory_gb:g} GB, "
             f"{r.usable_bytes / GB:.1f} GB usable)",
             f"compute at MFU {cal.mfu.value:.1%}: {cal.mfu.source}",
             f"pipeline bubble ×{cal.bubble_1f1b.value:.2f} (1F1B), ×{cal.bubble_interleaved.value:.2f} "
             f"(interleaved): bench/results/pipeline.json",
             "communication " + ("overlapped with compute (--overlap-communication)" if r.overlap_communication
                                 else "exposed but the weight all-gather, as pretrain --overlap-param-gather runs it"
                                 if r.overlap_param_gather else "exposed, as this codebase runs it by default")]
    if not p.fitting:
        return "\n".join(lines + ["", p.explain_no_fit()])
    lines += ["", f"{len(p.fitting)} of {p.considered} layouts fit; the {min(top, len(p.fitting))} fastest:", ""]
    header = f"{'#':>3}  {'layout':<44} {'tok/s/GPU':>9} {'step s':>7} {'days':>6} {'GPU-hours':>11} {'GB/GPU':>7}"
    lines.append(header)
    for i, c in enumerate(p.fitting[:top], 1):
        lines.append(f"{i:>3}  {c.layout.describe():<44} {c.time.tokens_per_s_per_gpu:>9,.0f} {c.time.total:>7.2f} "
                     f"{c.days:>6.1f} {c.gpu_hours:>11,.0f} {c.peak.total / GB:>7.1f}")
    best = p.fitting[0]
    t = best.time
    lines += ["", f"#1 memory per GPU: {memory_line(best.peak)}",
              f"#1 step {t.total:.2f} s = {t.micro_batches} micro-batches × {t.micro_batch * 1e3:.0f} ms "
              f"(compute {t.compute * 1e3:.0f}, memory-bound {t.memory_bound * 1e3:.0f}, TP comm "
              f"{t.tensor_parallel * 1e3:.0f}, p2p {t.pipeline_p2p * 1e3:.1f}) + bubble {t.bubble * 1e3:.0f} ms"
              f" + DP exposed {t.data_parallel_exposed * 1e3:.0f} ms + optimizer {t.optimizer * 1e3:.0f} ms"]
    return "\n".join(lines)


def format_inference(costs: list[InferenceCost], gpu_name: str, batch: int, context: int) -> str:
    lines = [f"Inference on {gpu_name}, batch {batch}, context {context} (bf16; decode bound by HBM bandwidth):",
             "", f"{'size':<5} {'GB weights':>10} {'GB KV':>7} {'GPUs':>5} {'decode tok/s':>13} "
             f"{'GFLOP/token':>12} {'HellaSwag':>10} {'NQ 64-shot':>11}"]
    for c in costs:
        lines.append(f"{c.model_size:<5} {c.weights_gb:>10.1f} {c.kv_cache_gb:>7.1f} {c.gpus:>5} "
                     f"{c.decode_tokens_per_s:>13,.0f} {c.gflops_per_token:>12.1f} "
                     f"{c.hellaswag if c.hellaswag is not None else '-':>10} "
                     f"{c.naturalquestions_64shot if c.naturalquestions_64shot is not None else '-':>11}")
    lines.append("quality: the paper's Table 3 (HellaSwag, zero-shot) and Table 4 (NaturalQuestions, 64-shot)")
    return "\n".join(lines)


def pretrain_workload_and_layout(config) -> tuple[Workload, Layout]:
    """The planner's view of a ``megallama.training.config.PretrainConfig``."""
    m, par, t = config.model, config.parallel, config.training
    v = par.virtual_pipeline_model_parallel_size(m.num_layers) or 1
    layout = Layout(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.data_parallel_size,
                    t.micro_batch_size, v, m.sequence_parallel, m.recompute_granularity or "none",
                    config.optimizer.use_distributed_optimizer)
    return Workload(m, t.seq_length, t.global_batch_size, m.params_dtype == torch.bfloat16,
                    config.optimizer.gradient_accumulation_fusion), layout


def pretrain_memory_estimate(config, device_bytes: float | None,
                             staged_reduce_scatter: bool = False) -> tuple[str, bool]:
    """(one line per pipeline rank: the planner's peak estimate; whether it fits a device of
    ``device_bytes`` less the planner's reserve — None: no limit, a CPU run). ``staged_reduce_scatter``:
    the run's backend copies a reduce-scatter's input (gloo)."""
    workload, layout = pretrain_workload_and_layout(config)
    ranks = training_memory(workload, layout, staged_reduce_scatter)
    lines = [f"planned memory per GPU (tools/plan.py), pipeline rank {r.pipeline_rank}: {memory_line(r)}"
             for r in ranks]
    worst = max(r.total for r in ranks)
    usable = None if device_bytes is None else device_bytes * (1 - DEFAULT_RESERVE)
    fits = usable is None or worst <= usable
    if not fits:
        lines.append(f"layout {layout.describe()} needs {worst / GB:.1f} GB per GPU, more than the "
                     f"{usable / GB:.1f} GB usable of the device's {device_bytes / GB:.1f} GB "
                     f"({DEFAULT_RESERVE:.0%} kept free): pick a layout that fits with `python tools/plan.py`")
    return "\n".join(lines), fits
