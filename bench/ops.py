"""Fused ops (megallama.ops) against their plain-torch reference forms, forward + backward.

Each op runs through autograd both ways: ours (the C++ kernels behind autograd Functions) and the
plain-torch form of megallama.ops.reference differentiated by autograd. The two sides alternate
within one run and each reports its median step time; the figure is the ratio reference / ours
(>1: ours is faster). Also printed: the activation bytes each side's autograd graph saves.
Last, the loss's fused cross-entropy unit gradient (a raw in-place kernel, no autograd) on a chunk
of logits against its plain-torch form.

    python bench/ops.py              # the model bench's shapes and a 7B-sized layer, 2 threads
"""
import argparse
import statistics
import time

import torch

from benchlib import add_json_flag, ratio_row, write_json
from megallama import ops

# name -> (tokens as batch x seq, hidden, ffn, heads, head_dim)
SHAPES = {
    "small": ((4, 256), 256, 688, 4, 64),      # bench/train_step.py's config
    "7b-layer": ((1, 256), 4096, 11008, 32, 128),
}


def _rms_case(batch_seq, hidden, ffn, heads, head_dim, dtype):
    x = torch.randn(*batch_seq, hidden, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype).requires_grad_()
    g = torch.randn(*batch_seq, hidden, dtype=dtype)

    def run(fn):
        x.grad = w.grad = None
        fn(x, w, 1e-6).backward(g)

    return (lambda: run(ops.rms_norm), lambda: run(ops.rms_norm_ref),
            lambda: ops.rms_norm(x, w, 1e-6), lambda: ops.rms_norm_ref(x, w, 1e-6))


def _swiglu_case(batch_seq, hidden, ffn, heads, head_dim, dtype):
    # The model's packed w1/w3 matmul output: a = ab[..., :ffn], b = ab[..., ffn:]
    ab = torch.randn(*batch_seq, 2 * ffn, dtype=dtype, requires_grad=True)
    g = torch.randn(*batch_seq, ffn, dtype=dtype)

    def ref(t):
        return ops.swiglu_ref(t[..., :ffn], t[..., ffn:])

    def run(fn):
        ab.grad = None
        fn(ab).backward(g)

    return (lambda: run(ops.swiglu_packed), lambda: run(ref),
            lambda: ops.swiglu_packed(ab), lambda: ref(ab))


def _rope_case(batch_seq, hidden, ffn, heads, head_dim, dtype):
    # q and k as views of the model's packed qkv projection output
    b, s = batch_seq
    qkv = torch.randn(b, s, 3 * heads * head_dim, dtype=dtype, requires_grad=True)
    cos, sin = ops.rope_cos_sin(s, head_dim)
    gq = torch.randn(b, s, heads, head_dim, dtype=dtype)
    gk = torch.randn(b, s, heads, head_dim, dtype=dtype)

    def split(t):
        q, k, _ = t.view(b, s, 3, heads, head_dim).unbind(2)
        return q, k

    def ours():
        return ops.apply_rotary(*split(qkv), cos, sin)

    def ref():
        q, k = split(qkv)
        return ops.rope_ref(q, cos, sin), ops.rope_ref(k, cos, sin)

    def run(fn):
        qkv.grad = None
        torch.autograd.backward(list(fn()), [gq, gk])

    return lambda: run(ours), lambda: run(ref), ours, ref


CASES = {"rms_norm": _rms_case, "swiglu": _swiglu_case, "rotary": _rope_case}

# (tokens, vocabulary): a chunk of the loss's logits at LLaMA's vocabulary
CROSS_ENTROPY_SHAPE = (2048, 32000)


def _cross_entropy_case(dtype):
    # Both sides rewrite the same logits over and over: after the first call they hold gradients
    # in [-1, 1], which cost the same to process as fresh logits.
    tokens, vocab = CROSS_ENTROPY_SHAPE
    logits = (3 * torch.randn(tokens, vocab)).to(dtype)
    target = torch.randint(0, vocab, (tokens,))
    target[::50] = -100
    return (lambda: ops.cross_entropy_unit_grad_(logits, target, -100),
            lambda: ops.cross_entropy_unit_grad_ref(logits, target, -100))


def saved_bytes(forward):
    """Bytes of the distinct tensors the autograd graph of ``forward()`` saves."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def time_pair(ours, ref, rounds, reps):
    """Median seconds per call of each side, the two alternating round by round."""
    for fn in (ours, ref):  # warm-up: allocator, thread pool
        fn()
    times = {"ours": [], "ref": []}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("ref", ref)):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - start) / reps)
    return statistics.median(times["ours"]), statistics.median(times["ref"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of activations and weights (default float32)")
    parser.add_argument("--rounds", type=int, default=15,
                        help="alternating rounds per op; each side's median round is reported")
    parser.add_argument("--reps", type=int, default=5, help="fwd+bwd calls per round")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES),
                        help="shape sets to run (default all)")
    add_json_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"threads={args.threads} dtype={args.dtype}; fwd+bwd per call; ratio = reference / ours")
    print(f"{'shape':<9} {'op':<9} {'ours ms':>9} {'ref ms':>9} {'speedup':>8} "
          f"{'saved MB ours':>14} {'ref':>7}")
    rows, details = [], {}
    for shape_name in args.shapes:
        batch_seq, hidden, ffn, heads, head_dim = SHAPES[shape_name]
        for op_name, make in CASES.items():
            ours, ref, ours_fwd, ref_fwd = make(batch_seq, hidden, ffn, heads, head_dim, dtype)
            t_ours, t_ref = time_pair(ours, ref, args.rounds, args.reps)
            mb_ours, mb_ref = saved_bytes(ours_fwd) / 2**20, saved_bytes(ref_fwd) / 2**20
            print(f"{shape_name:<9} {op_name:<9} {t_ours * 1e3:9.3f} {t_ref * 1e3:9.3f} "
                  f"{t_ref / t_ours:7.2f}x {mb_ours:14.2f} {mb_ref:7.2f}")
            details[f"{shape_name} {op_name}"] = {"ours_ms": t_ours * 1e3, "ref_ms": t_ref * 1e3,
                                                  "saved_mb_ours": mb_ours, "saved_mb_ref": mb_ref}
            rows.append(ratio_row(f"fused {op_name} fwd+bwd, {shape_name}, CPU {args.dtype}", "speed",
                                  "plain torch (autograd)", t_ref / t_ours))
    tokens, vocab = CROSS_ENTROPY_SHAPE
    t_ours, t_ref = time_pair(*_cross_entropy_case(dtype), args.rounds, args.reps)
    shape_name = f"{tokens}x{vocab}"
    print(f"{shape_name:<9} {'xent':<9} {t_ours * 1e3:9.3f} {t_ref * 1e3:9.3f} {t_ref / t_ours:7.2f}x "
          f"{'-':>14} {'-':>7}")
    details[f"{shape_name} cross_entropy_unit_grad"] = {"ours_ms": t_ours * 1e3, "ref_ms": t_ref * 1e3}
    rows.append(ratio_row(f"fused cross-entropy unit grad (in place), {shape_name}, CPU {args.dtype}", "speed",
                          "plain torch", t_ref / t_ours))
    write_json(args.json, rows, details)


if __name__ == "__main__":
    main()
