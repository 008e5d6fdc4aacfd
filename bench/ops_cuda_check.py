"""Build megallama._ops with its CUDA kernels and check them on a GPU (run on a CUDA machine).

Builds the extension in place (setup.py build_ext, only csrc/ops unless --all-extensions), then
checks every fused op on CUDA tensors against the plain-torch reference forms in fp32 and bf16
(forward and backward, odd and strided shapes, rows that start off the 16-byte grid and so take
the kernels' one-element-per-access path, raw kernel callers with strided output buffers,
determinism of grad_weight, gradcheck in fp64), the in-place cross-entropy unit gradient (fp32,
bf16, fp16 against the fp32 reference, fp64 against autograd), its two vocabulary-parallel phases
(against their references, and composed over two ranks against the single-rank op) and the
weight-gradient accumulation into an fp32 buffer, and times each op's fwd+bwd against the reference
differentiated by autograd. Last, each raw kernel at the 16×2048 training shape against
the memory bandwidth a device copy of the same bytes reaches (CUDA events, median of 50): the
kernels are bandwidth-bound, so that fraction is how close they are to their floor.
Prints a PASS/FAIL table; exits 1 if any check fails.

    python bench/ops_cuda_check.py                # build, check, time
    python bench/ops_cuda_check.py --no-build     # reuse an existing in-place build
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# assert_close tolerances. The CUDA build uses --use_fast_math (approximate exp, sqrt, division),
# so fp32 gets a little more room than the CPU tests give.
TOL = {"float32": dict(rtol=1e-4, atol=1e-5), "bfloat16": dict(rtol=1.6e-2, atol=1e-2),
       "float16": dict(rtol=2e-3, atol=1e-3)}
TOL_SUM = {"float32": dict(rtol=1e-4, atol=1e-4), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


def build(all_extensions, arch):
    env = dict(os.environ)
    if not all_extensions:
        env["MEGALLAMA_EXTENSIONS"] = "ops"
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-8000:])
        print(f"BUILD FAILED (exit {proc.returncode})")
        sys.exit(1)
    print(f"build: ok in {time.perf_counter() - start:.0f} s")


class Checks:
    def __init__(self):
        self.rows = []

    def run(self, name, fn):
        try:
            fn()
            self.rows.append((name, "PASS", ""))
        except Exception as exc:  # a failed check is reported, the others still run
            detail = str(exc).strip().splitlines()
            self.rows.append((name, "FAIL", detail[0][:160] if detail else type(exc).__name__))
            traceback.print_exc()

    def report(self):
        width = max(len(n) for n, _, _ in self.rows)
        print(f"\n{'check':<{width}}  result")
        for name, result, detail in self.rows:
            print(f"{name:<{width}}  {result}  {detail}")
        failed = sum(r == "FAIL" for _, r, _ in self.rows)
        print(f"\n{len(self.rows) - failed} passed, {failed} failed")
        return failed


def grads_of(fn, inputs, grads):
    import torch
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [t.grad for t in inputs]


def assert_all_close(ours, ref, tols):
    import torch
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype, f"item {i}: dtype {a.dtype} != {b.dtype}"
        torch.testing.assert_close(a, b, **tols[i] if isinstance(tols, list) else tols,
                                   msg=lambda m, i=i: f"item {i}: {m}")


def define_checks(checks, ops, torch, dev):
    for dname in ("float32", "bfloat16"):
        dt = getattr(torch, dname)

        def rms(shape, strided, dname=dname, dt=dt):
            h = shape[-1]
            x = torch.randn(*shape[:-1], 3 * h, device=dev, dtype=dt)[..., h:2 * h] if strided \
                else torch.randn(shape, device=dev, dtype=dt)
            w = (1 + 0.1 * torch.randn(h, device=dev)).to(dt)
            g = torch.randn(shape, device=dev, dtype=dt)
            ours = grads_of(lambda x, w: ops.rms_norm(x, w, 1e-6), [x, w], [g])
            ref = grads_of(lambda x, w: ops.rms_norm_ref(x, w, 1e-6), [x, w], [g])
            assert_all_close(ours, ref, [TOL[dname], TOL[dname], TOL_SUM[dname]])

        def rms_fp32_weight(dname=dname, dt=dt):
            x, w = torch.randn(4, 9, 40, device=dev, dtype=dt), torch.randn(40, device=dev)
            g = torch.randn(4, 9, 40, device=dev, dtype=dt)
            ours = grads_of(lambda x, w: ops.rms_norm(x, w, 1e-5), [x, w], [g])
            ref = grads_of(lambda x, w: ops.rms_norm_ref(x, w, 1e-5), [x, w], [g])
            assert_all_close(ours, ref, [TOL[dname], TOL[dname], TOL_SUM[dname]])

        def rms_deterministic(dt=dt):
            x, w = torch.randn(4096, 512, device=dev, dtype=dt), torch.randn(512, device=dev, dtype=dt)
            g = torch.randn_like(x)
            _, rstd = ops.rms_norm_forward(x, w, 1e-6)
            first = ops.rms_norm_backward(g, x, w, rstd)
            second = ops.rms_norm_backward(g, x, w, rstd)
            assert all(torch.equal(a, b) for a, b in zip(first, second)), "grads differ between runs"

        def swiglu(shape, dname=dname, dt=dt):
            f = shape[-1]
            ab = 3 * torch.randn(*shape[:-1], 2 * f, device=dev, dtype=dt)
            g = torch.randn(shape, device=dev, dtype=dt)
            ref = grads_of(lambda ab: ops.swiglu_ref(ab[..., :f], ab[..., f:]), [ab], [g])
            packed = grads_of(ops.swiglu_packed, [ab], [g])
            assert_all_close(packed, ref, TOL[dname])

        def rope(shape, dname=dname, dt=dt):
            b, s, h, d = shape
            qkv = torch.randn(b, s, 3 * h * d, device=dev, dtype=dt)
            q, k = qkv[..., :h * d].view(b, s, h, d), qkv[..., h * d:2 * h * d].view(b, s, h, d)
            cos, sin = ops.rope_cos_sin(s, d, offset=5, device=dev)
            gq, gk = torch.randn(b, s, h, d, device=dev, dtype=dt), torch.randn(b, h, s, d, device=dev, dtype=dt).transpose(1, 2)
            ours = grads_of(lambda q, k: ops.apply_rotary(q, k, cos, sin), [q, k], [gq, gk])
            ref = grads_of(lambda q, k: (ops.rope_ref(q, cos, sin), ops.rope_ref(k, cos, sin)), [q, k], [gq, gk])
            assert_all_close(ours, ref, TOL[dname])
            assert ours[0].transpose(1, 2).is_contiguous(), "q_out is not [b, h, s, d]-contiguous"
            out = torch.empty(b, s, 2 * h, d, device=dev, dtype=dt)[:, :, ::2]
            ops.rope_forward(q, cos, sin, out=out)
            assert_all_close([out], [ops.rope_ref(q, cos, sin)], TOL[dname])

        for shape in [(4, 256, 256), (3, 5, 37), (1, 1, 1), (2, 3, 4096)]:
            for strided in (False, True):
                checks.run(f"rms_norm {dname} {shape}{' strided' if strided else ''}",
                           lambda shape=shape, strided=strided, rms=rms: rms(shape, strided))
        if dt == torch.bfloat16:
            checks.run(f"rms_norm {dname} with a float32 weight", rms_fp32_weight)
        checks.run(f"rms_norm {dname} deterministic grads", rms_deterministic)
        for shape in [(4, 256, 688), (3, 5, 37), (1, 1, 1), (1, 64, 11008)]:
            checks.run(f"swiglu {dname} {shape}", lambda shape=shape, swiglu=swiglu: swiglu(shape))
        for shape in [(4, 256, 4, 64), (2, 3, 5, 6), (1, 1, 1, 2), (1, 64, 32, 128)]:
            checks.run(f"rotary {dname} {shape}", lambda shape=shape, rope=rope: rope(shape))

        def misaligned(dname=dname, dt=dt):
            # Views one element past a 16-byte boundary: widths the packed path takes, rows it cannot.
            rows, h, f, heads, d = 24, 256, 256, 4, 64
            x = torch.randn(rows, h + 1, device=dev, dtype=dt)[:, 1:]
            w = (1 + 0.1 * torch.randn(h, device=dev)).to(dt)
            g = torch.randn(rows, h, device=dev, dtype=dt)
            assert_all_close(grads_of(lambda x, w: ops.rms_norm(x, w, 1e-6), [x, w], [g]),
                             grads_of(lambda x, w: ops.rms_norm_ref(x, w, 1e-6), [x, w], [g]),
                             [TOL[dname], TOL[dname], TOL_SUM[dname]])
            ab = 3 * torch.randn(rows, 2 * f + 1, device=dev, dtype=dt)[:, 1:]
            g = torch.randn(rows, f, device=dev, dtype=dt)
            assert_all_close(grads_of(ops.swiglu_packed, [ab], [g]),
                             grads_of(lambda ab: ops.swiglu_ref(ab[..., :f], ab[..., f:]), [ab], [g]), TOL[dname])
            q = torch.randn(2, 6, heads * d + 1, device=dev, dtype=dt)[..., 1:].view(2, 6, heads, d)
            cos, sin = ops.rope_cos_sin(6, d, device=dev)
            assert_all_close([ops.rope_forward(q, cos, sin)], [ops.rope_ref(q, cos, sin)], TOL[dname])
            assert_all_close([ops.rope_backward(q, cos, sin)], [ops.rope_ref(q, cos, sin, inverse=True)], TOL[dname])

        checks.run(f"all ops {dname}, rows off the 16-byte grid", misaligned)

    def gradchecks():
        d = dict(device=dev, dtype=torch.float64, requires_grad=True)
        x, w = torch.randn(2, 3, 7, **d), torch.randn(7, **d)
        assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-6), (x, w))
        assert torch.autograd.gradcheck(ops.swiglu_packed, (torch.randn(2, 3, 8, **d),))
        cos, sin = ops.rope_cos_sin(3, 6, device=dev)
        q, k = torch.randn(2, 3, 2, 6, **d), torch.randn(2, 3, 1, 6, **d)
        assert torch.autograd.gradcheck(lambda q, k: ops.apply_rotary(q, k, cos, sin), (q, k))

    checks.run("gradcheck float64 (all Functions)", gradchecks)


def define_loss_checks(checks, ops, torch, dev):
    """The cross-entropy unit gradient and the fp32 weight-gradient accumulation."""
    import torch.nn.functional as F

    def cross_entropy(dname, rows, classes, offset):
        dt = getattr(torch, dname)
        # Rows of a wider buffer starting `offset` elements in: odd offsets leave the 16-byte grid.
        buf = 3 * torch.randn(rows, classes + 16, device=dev)
        buf[1, classes // 2 + 1:] = float("-inf")  # a masked tail
        target = torch.randint(0, max(1, classes // 2), (rows,), device=dev)
        target[::3] = -100
        logits = buf.to(dt)[:, offset:offset + classes]
        ref = logits.to(torch.float32, copy=True)  # the reference computes on it in place
        ref_loss = ops.cross_entropy_unit_grad_ref(ref, target, -100)
        loss = ops.cross_entropy_unit_grad_(logits, target, -100)
        assert loss.dtype == torch.float32, f"loss is {loss.dtype}"
        assert_all_close([loss, logits.float()], [ref_loss, ref], [TOL["float32"], TOL[dname]])

    for dname in ("float32", "bfloat16", "float16"):
        for rows, classes, offset in [(64, 32000, 0), (64, 32000, 8), (9, 1000, 1), (5, 7, 0), (4, 1, 0)]:
            checks.run(f"cross_entropy {dname} {rows}x{classes} offset {offset}",
                       lambda dname=dname, rows=rows, classes=classes, offset=offset:
                       cross_entropy(dname, rows, classes, offset))

    def cross_entropy_float64_autograd():
        logits = torch.randn(6, 37, device=dev, dtype=torch.float64, requires_grad=True)
        target = torch.randint(0, 37, (6,), device=dev)
        target[2] = -100
        loss = F.cross_entropy(logits, target, ignore_index=-100, reduction="none")
        loss.backward(torch.ones_like(loss))
        grad = logits.detach().clone()
        ours = ops.cross_entropy_unit_grad_(grad, target, -100)
        assert_all_close([ours, grad], [loss.detach(), logits.grad], dict(rtol=1e-10, atol=1e-12))

    checks.run("cross_entropy float64 equals autograd's gradient", cross_entropy_float64_autograd)

    def vocab_parallel_phases(dname, rows, width, valid, offset):
        dt = getattr(torch, dname)
        buf = 3 * torch.randn(rows, width + 16, device=dev)
        buf[:, offset + valid:] = float("nan")  # padding columns must take no part
        buf[1, :offset + valid // 2] = float("-inf")
        target = torch.randint(0, max(1, valid), (rows,), device=dev) if valid else \
            torch.full((rows,), -1, device=dev)
        target[::3] = -1
        logits = buf.to(dt)[:, offset:offset + width]
        stats = ops.cross_entropy_partials(logits, target, valid)
        ref_stats = ops.cross_entropy_partials_ref(logits, target, valid)
        assert_all_close([stats], [ref_stats], TOL["float32"])
        row_max = stats[:, 0].contiguous()
        row_scale = torch.where(target >= 0, 1 / stats[:, 1], 0)
        ref = logits.clone()
        ops.cross_entropy_grad_from_stats_ref_(ref, target, valid, row_max, row_scale)
        ops.cross_entropy_grad_from_stats_(logits, target, valid, row_max, row_scale)
        assert torch.isfinite(logits).all(), "non-finite gradient"
        assert_all_close([logits.float()], [ref.float()], TOL[dname])

    # (rows, local width, valid columns, offset): a pack cut by valid_columns, whole packs, rows off
    # the 16-byte grid, no valid column at all, one column
    for dname in ("float32", "bfloat16", "float16"):
        for rows, width, valid, offset in [(64, 16000, 15997, 0), (64, 16000, 16000, 8), (9, 1000, 997, 1),
                                           (5, 7, 4, 0), (4, 8, 0, 0), (4, 1, 1, 0)]:
            checks.run(f"cross_entropy vocab-parallel phases {dname} {rows}x{width} valid {valid} "
                       f"offset {offset}", lambda dname=dname, rows=rows, width=width, valid=valid, offset=offset:
                       vocab_parallel_phases(dname, rows, width, valid, offset))

    def vocab_parallel_composes(dname, vocab, width):
        """Two ranks' phases, all-reduced by hand, against the single-rank op on the whole rows."""
        dt = getattr(torch, dname)
        rows = 24
        logits = (3 * torch.randn(rows, vocab, device=dev, dtype=torch.float64)).to(dt)
        logits[5] = float("-inf")
        target = torch.randint(0, vocab, (rows,), device=dev)
        target[::4] = target[5] = -100
        target[2] = vocab - 1
        parts, stats = [], []
        for r in range(2):
            start = r * width
            valid = min(max(vocab - start, 0), width)
            local = torch.full((rows, width), float("nan"), device=dev, dtype=dt)
            local[:, :valid] = logits[:, start:start + valid]
            shifted = target - start
            mine = (target != -100) & (shifted >= 0) & (shifted < valid)
            parts.append((local, torch.where(mine, shifted, -1), valid))
            stats.append(ops.cross_entropy_partials(*parts[-1]))
        stats = torch.stack(stats)
        row_max = stats[:, :, 0].amax(0)
        counts = target != -100
        sum_exp = (stats[:, :, 1] * (stats[:, :, 0] - row_max).exp()).sum(0)
        loss = torch.where(counts, row_max + sum_exp.log() - stats[:, :, 2].sum(0), 0)
        scale = torch.where(counts, 1 / sum_exp, 0)
        for local, local_target, valid in parts:
            ops.cross_entropy_grad_from_stats_(local, local_target, valid, row_max, scale)
        grad = torch.cat([p[0] for p in parts], 1)
        assert not grad[:, vocab:].any(), "padding columns not zeroed"
        want_grad = logits.clone()
        want_loss = ops.cross_entropy_unit_grad_(want_grad, target, -100)
        fp64 = dict(rtol=1e-10, atol=1e-12)
        tols = [fp64, fp64] if dname == "float64" else [TOL["float32"], TOL[dname]]
        assert_all_close([loss, grad[:, :vocab]], [want_loss, want_grad], tols)

    for dname in ("float32", "bfloat16", "float64"):
        for vocab, width in [(32000, 16008), (13, 7), (2, 3)]:
            checks.run(f"cross_entropy vocab-parallel {dname} V={vocab} over 2 ranks of {width}",
                       lambda dname=dname, vocab=vocab, width=width: vocab_parallel_composes(dname, vocab, width))

    def wgrad(dname, tokens, out, inp):
        dt = getattr(torch, dname)
        x = torch.randn(tokens, inp + 3, device=dev).to(dt)[:, 3:]  # strided rows
        grad_out = [torch.randn(tokens, out, device=dev).to(dt) for _ in range(2)]
        main_grad = torch.randn(out, inp, device=dev)
        want = main_grad + sum(g.float().t() @ x.float() for g in grad_out)
        for g in grad_out:  # accumulates twice
            ops.wgrad_accumulate_(main_grad, g, x)
        fused = dev.type == "cuda" and ops.has_fp32_wgrad_gemm()
        # Without the fused gemm a 16-bit product is added: bf16-sized errors.
        rtol, atol = (1e-3, 1e-3) if fused else (1.6e-2, 2.5e-2)
        torch.testing.assert_close(main_grad, want, rtol=rtol, atol=atol * tokens ** 0.5)
        if fused:
            # The product accumulated in fp32: far closer than a 16-bit product added afterwards.
            rounded = torch.randn(out, inp, device=dev)
            direct = rounded.clone()
            ops.wgrad_accumulate_(direct, grad_out[0], x)
            exact = rounded + grad_out[0].float().t() @ x.float()
            rounded.add_(grad_out[0].t() @ x)
            assert (direct - exact).abs().max() < (rounded - exact).abs().max() / 4, "no fp32 accumulation"

    for dname in ("bfloat16", "float16"):
        for tokens, out, inp in [(4096, 1024, 2048), (37, 19, 11)]:
            checks.run(f"wgrad_accumulate {dname} into float32 {tokens}x{out}x{inp}",
                       lambda dname=dname, tokens=tokens, out=out, inp=inp: wgrad(dname, tokens, out, inp))

    def fp32_gemm_built():
        version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        assert ops.has_fp32_wgrad_gemm() == (version >= (2, 8)), \
            f"has_fp32_wgrad_gemm() is {ops.has_fp32_wgrad_gemm()} with torch {torch.__version__}"

    if dev.type == "cuda":
        checks.run("wgrad_accumulate uses the fp32-output addmm (torch >= 2.8)", fp32_gemm_built)


def time_ops(ops, torch, dev, reps):
    """Median ms of fwd+bwd per op, ours vs the reference under autograd, alternated."""
    shapes = {"small": ((4, 256), 256, 688, 4, 64), "7b-layer": ((1, 2048), 4096, 11008, 32, 128)}
    if dev.type != "cuda":  # a dry run: keep it short
        shapes = {"small": shapes["small"]}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"\n{'shape':<9} {'dtype':<9} {'op':<9} {'ours ms':>9} {'ref ms':>9} {'speedup':>8}")
    for shape_name, ((b, s), hidden, ffn, heads, head_dim) in shapes.items():
        for dname in ("float32", "bfloat16"):
            dt = getattr(torch, dname)
            x = torch.randn(b, s, hidden, device=dev, dtype=dt, requires_grad=True)
            w = torch.ones(hidden, device=dev, dtype=dt, requires_grad=True)
            ab = torch.randn(b, s, 2 * ffn, device=dev, dtype=dt, requires_grad=True)
            qkv = torch.randn(b, s, 3 * heads * head_dim, device=dev, dtype=dt, requires_grad=True)
            cos, sin = ops.rope_cos_sin(s, head_dim, device=dev)

            def qk():
                q, k, _ = qkv.view(b, s, 3, heads, head_dim).unbind(2)
                return q, k

            cases = {
                "rms_norm": (lambda: ops.rms_norm(x, w, 1e-6), lambda: ops.rms_norm_ref(x, w, 1e-6)),
                "swiglu": (lambda: ops.swiglu_packed(ab), lambda: ops.swiglu_ref(ab[..., :ffn], ab[..., ffn:])),
                "rotary": (lambda: ops.apply_rotary(*qk(), cos, sin),
                           lambda: tuple(ops.rope_ref(t, cos, sin) for t in qk())),
            }
            for op_name, (ours, ref) in cases.items():
                def step(fn):
                    outs = fn()
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
                    x.grad = w.grad = ab.grad = qkv.grad = None

                times = {"ours": [], "ref": []}
                for fn in (ours, ref):
                    step(fn)
                for _ in range(reps):
                    for side, fn in (("ours", ours), ("ref", ref)):
                        sync()
                        start = time.perf_counter()
                        step(fn)
                        sync()
                        times[side].append((time.perf_counter() - start) * 1e3)
                t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
                print(f"{shape_name:<9} {dname:<9} {op_name:<9} {t_ours:9.3f} {t_ref:9.3f} {t_ref / t_ours:7.2f}x")


def kernel_bandwidth(ops, torch, dev, reps=50):
    """Each raw kernel at the 16x2048 model's training shapes (micro-batch 4 × 2048 tokens, bf16):
    bytes it must move (inputs read once, outputs written once) over its median time, against a
    device copy of as many bytes, printed as a table."""
    rows, hidden, ffn, heads, head_dim = 4 * 2048, 2048, 5632, 16, 128
    dt = torch.bfloat16
    x = torch.randn(rows, hidden, device=dev, dtype=dt)
    w = torch.ones(hidden, device=dev, dtype=dt)
    g = torch.randn_like(x)
    _, rstd = ops.rms_norm_forward(x, w, 1e-6)
    ab = torch.randn(rows, 2 * ffn, device=dev, dtype=dt)
    g_ffn = torch.randn(rows, ffn, device=dev, dtype=dt)
    qkv = torch.randn(4, 2048, 3 * heads * head_dim, device=dev, dtype=dt)
    q = qkv[..., :heads * head_dim].view(4, 2048, heads, head_dim)
    cos, sin = ops.rope_cos_sin(2048, head_dim, device=dev)
    logits = torch.randn(rows, 32000, device=dev, dtype=dt)
    target = torch.randint(0, 32000, (rows,), device=dev)
    half = logits[:, :16000].contiguous()
    half_target = torch.where(target < 16000, target, -1)
    half_max = torch.zeros(rows, device=dev)
    half_scale = torch.full((rows,), 1 / 32000, device=dev)
    size = x.numel() * 2  # bytes of one [rows, hidden] bf16 tensor
    cases = {  # name: (call, bytes moved)
        "rms_norm fwd": (lambda: ops.rms_norm_forward(x, w, 1e-6), 2 * size),
        "rms_norm bwd": (lambda: ops.rms_norm_backward(g, x, w, rstd), 3 * size),
        "swiglu fwd": (lambda: ops.swiglu_forward(ab), 3 * rows * ffn * 2),
        "swiglu bwd": (lambda: ops.swiglu_backward(g_ffn, ab), 5 * rows * ffn * 2),
        "rotary (q)": (lambda: ops.rope_forward(q, cos, sin), 2 * q.numel() * 2),
        # in place, the logits read once more (from L2, mostly) and not counted
        "cross_entropy (V=32000)": (lambda: ops.cross_entropy_unit_grad_(logits, target, -100),
                                    2 * logits.numel() * 2),
        # TP=2's half of the vocabulary: phase 1 reads it, phase 2 reads and writes it
        "ce partials (Vl=16000)": (lambda: ops.cross_entropy_partials(half, half_target, 16000),
                                   half.numel() * 2),
        "ce grad_from_stats (Vl=16000)": (lambda: ops.cross_entropy_grad_from_stats_(half, half_target, 16000,
                                                                                    half_max, half_scale),
                                          2 * half.numel() * 2),
    }

    def median_ms(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    print(f"\n{'kernel (16x2048 shapes, bf16)':<30} {'ms':>8} {'GB/s':>8} {'copy GB/s':>10} {'of copy':>8}")
    for name, (fn, moved) in cases.items():
        source = torch.empty(moved // 2, dtype=torch.uint8, device=dev).random_(0, 255)
        target = torch.empty_like(source)
        ours, copy = median_ms(fn), median_ms(lambda: target.copy_(source))
        print(f"{name:<30} {ours:8.3f} {moved / ours / 1e6:8.0f} {moved / copy / 1e6:10.0f} {copy / ours:7.0%}")


def require_cuda_kernels(ops):
    if not ops.has_cuda():
        raise AssertionError("megallama._ops.has_cuda() is False: the build found no CUDA toolkit")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-build", action="store_true", help="skip the in-place build (reuse megallama/_ops*.so)")
    parser.add_argument("--all-extensions", action="store_true",
                        help="build every csrc/ folder, not only csrc/ops (when megallama imports others)")
    parser.add_argument("--arch", default=None,
                        help="TORCH_CUDA_ARCH_LIST for the build (default: the visible GPU's)")
    parser.add_argument("--reps", type=int, default=20, help="timed fwd+bwd repetitions per op and side")
    parser.add_argument("--device", default="cuda",
                        help="device to check (default cuda; 'cpu' dry-runs this script on the CPU kernels)")
    args = parser.parse_args()
    if not args.no_build:
        build(args.all_extensions, args.arch)

    sys.path.insert(0, ROOT)
    import torch
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("FAIL: torch sees no CUDA device")
        sys.exit(1)
    from megallama import ops
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, has_cuda={ops.has_cuda()}")
    checks = Checks()
    if dev.type == "cuda":
        checks.run("extension built with CUDA kernels", lambda: require_cuda_kernels(ops))
    torch.manual_seed(0)
    runnable = dev.type != "cuda" or ops.has_cuda()
    if runnable:
        define_checks(checks, ops, torch, dev)
        define_loss_checks(checks, ops, torch, dev)
    failed = checks.report()
    if runnable:
        time_ops(ops, torch, dev, args.reps)
        if dev.type == "cuda":
            kernel_bandwidth(ops, torch, dev)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
