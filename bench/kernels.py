"""Benchmark cachec.kernels: Triton kernel vs torch reference vs
torch.compile(reference), as achieved GB/s and as a fraction of a plain
dst.copy_(src) measured in the same run.

    python bench/kernels.py            # FLUX / Wan 14B sizes (meant for a GPU)
    python bench/kernels.py --quick    # smaller sizes, a few minutes on CPU

The Triton column needs CUDA (the fp8 kernels sm_89+); on CPU it is skipped.
Bytes moved count each tensor read or written once; the copy baseline moves
2 x its buffer (read + write).
"""

from __future__ import annotations

import argparse
import os
import importlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import cachec.kernels as K  # noqa: E402

RL1 = importlib.import_module("cachec.kernels.relative_l1")
TAY = importlib.import_module("cachec.kernels.taylor")
FP8 = importlib.import_module("cachec.kernels.fp8_a2a")
GATE = importlib.import_module("cachec.passes.residuals")

ORDER = 2
WORLD = 4
HEADS, HEAD_DIM = 24, 128


@dataclass
class Case:
    kernel: str
    size: str
    nbytes: int
    make: Callable[[], tuple]
    reference: Callable
    triton: Callable | None


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def build_cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    if quick:
        acts = [("1024x3072", 1024, 3072)]
        seqs = [("S1024 H24 D128", 1024)]
    else:
        acts = [("FLUX 4096x3072", 4096, 3072), ("Wan14B 32760x5120", 32760, 5120)]
        seqs = [("FLUX S4096 H24 D128", 4096), ("Wan S32760 H24 D128", 32760)]
    e = _elt(dtype)
    cases = []
    for label, t, h in acts:
        n = t * h

        def make_rl1(t=t, h=h):
            prev = torch.randn(t, h, device=device, dtype=dtype)
            return prev, prev + 0.05 * torch.randn_like(prev)

        cases.append(Case("relative_l1", label, 2 * n * e, make_rl1, K.relative_l1_reference,
                          RL1._relative_l1_triton))

        def make_upd(t=t, h=h):
            derivs = torch.randn(ORDER + 1, t, h, device=device)
            return derivs, torch.randn(t, h, device=device, dtype=dtype), 2.0

        cases.append(Case(f"taylor_update_ o{ORDER}", label, n * e + 2 * (ORDER + 1) * n * 4, make_upd,
                          K.taylor_update_reference_, TAY._taylor_update_triton))

        def make_apply(t=t, h=h):
            base = torch.randn(t, h, device=device, dtype=dtype)
            return base, torch.randn(ORDER + 1, t, h, device=device), 1.5

        cases.append(Case(f"taylor_apply o{ORDER}", label, 2 * n * e + (ORDER + 1) * n * 4, make_apply,
                          K.taylor_apply_reference, TAY._taylor_apply_triton))
    for label, s in seqs:
        n = s * HEADS * HEAD_DIM
        rows = n // HEAD_DIM

        def make_q(s=s):
            return torch.randn(1, s, HEADS, HEAD_DIM, device=device, dtype=dtype), WORLD

        cases.append(Case(f"fp8 quantize w{WORLD}", label, n * e + n + 4 * rows, make_q,
                          K.quantize_fp8_seq_to_head_reference, FP8._quantize_triton))

        def make_dq(s=s):
            x = torch.randn(1, s // WORLD, HEADS, HEAD_DIM, device=device, dtype=dtype)
            q, scale = K.quantize_fp8_seq_to_head_reference(x, WORLD)
            # Stand-in for the all-to-all output: same shape and layout.
            return q, scale, dtype

        nd = (s // WORLD) * HEADS * HEAD_DIM
        cases.append(Case(f"fp8 dequantize w{WORLD}", label.replace(f"S{s}", f"S{s // WORLD}x{WORLD}"),
                          nd + 4 * (nd // HEAD_DIM) + nd * e, make_dq,
                          K.dequantize_fp8_head_to_seq_reference, FP8._dequantize_triton))
    return cases


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable, args: tuple, device: str, warmup: int, reps: int) -> float:
    """Median wall time of one call in ms."""
    for _ in range(warmup):
        fn(*args)
    _sync(device)
    samples = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_gbps(nbytes: int, device: str, warmup: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), (), device, warmup, reps)
    return 2 * nbytes / ms / 1e6


class _FnStandIn(torch.nn.Module):
    """The end of a first block, as the gate sees it: FLUX's gated residual add."""

    def forward(self, x, attn, gate):
        return (x + gate * attn,)


def gate_rows(quick: bool, device: str, dtype: torch.dtype, warmup: int, reps: int) -> list[tuple]:
    """The gate after Fn: residual + relative L1 apart from the Fn code, or fused into its graph."""
    t, h = (1024, 3072) if quick else (4096, 3072)
    x, attn = (torch.randn(1, t, h, device=device, dtype=dtype) for _ in range(2))
    gate = torch.randn(1, 1, h, device=device, dtype=dtype)
    prev = (0.9 * attn).contiguous()
    fn = torch.fx.symbolic_trace(_FnStandIn())
    fused_gm = GATE.fuse_gate_diff(fn, 0, 0)
    torch._dynamo.reset()
    fn_c = torch.compile(fn, dynamic=False)
    fused_c = torch.compile(fused_gm, dynamic=False)
    diff_c = torch.compile(K.relative_l1_reference, dynamic=False)

    def apart(diff):
        def run(x, attn, gate, prev):
            out = fn_c(x, attn, gate)[0]
            residual = (out - x).contiguous()
            return out, residual, diff(prev, residual)
        return run

    impls = [("Fn alone", lambda x, attn, gate, prev: fn_c(x, attn, gate)),
             ("apart, compiled diff", apart(diff_c))]
    if device == "cuda":
        impls.append(("apart, Triton diff", apart(RL1._relative_l1_triton)))
    impls.append(("fused in Fn graph", fused_c))
    ref = apart(K.relative_l1_reference)(x, attn, gate, prev)
    rows = []
    for name, fn_i in impls:
        got = fn_i(x, attn, gate, prev)
        if name != "Fn alone":   # the paths must agree before they are timed
            # fused, the residual is taken from the output before it is rounded to dtype
            ulp = torch.finfo(dtype).eps * float(ref[0].abs().max())
            torch.testing.assert_close(got[-2], ref[1], rtol=0, atol=ulp)
            torch.testing.assert_close(got[-1], ref[2], rtol=1e-2, atol=0)
        rows.append((name, time_ms(fn_i, (x, attn, gate, prev), device, warmup, reps)))
        print(f"  gate {name:<22} {rows[-1][1]:9.3f} ms", flush=True)
    return [(f"{t}x{h}", name, ms, ms - rows[0][1]) for name, ms in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CPU-friendly)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=None, help="timed calls per cell (median reported)")
    ap.add_argument("--png", default="out/kernels.png", help="plot path (needs matplotlib)")
    args = ap.parse_args()

    device, dtype = args.device, getattr(torch, args.dtype)
    reps = args.reps or (10 if device == "cpu" else 50)
    warmup = 2 if device == "cpu" else 10
    torch.manual_seed(0)
    cases = build_cases(args.quick, device, dtype)
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU, {torch.get_num_threads()} torch thread(s)"
    print(f"device: {name} | torch {torch.__version__} | dtype {args.dtype} | reps {reps} (median)")

    copy_bytes = max(c.nbytes for c in cases) // 2
    copy = copy_gbps(copy_bytes, device, warmup, reps)
    print(f"copy baseline: dst.copy_(src) of {copy_bytes / 2**20:.0f} MiB -> {copy:.1f} GB/s")
    if device != "cuda":
        print("triton: skipped (no CUDA device; the Triton kernels only run on GPU outside the interpreter)")

    rows = []
    for case in cases:
        inputs = case.make()
        impls: list[tuple[str, Callable | None, str]] = []
        if device == "cuda":
            use = case.triton
            if case.kernel.startswith("fp8") and not FP8._use_triton(inputs[0]):
                use = None
            impls.append(("triton", use, "" if use else "needs sm_89+"))
        impls.append(("torch eager", case.reference, ""))
        torch._dynamo.reset()
        impls.append(("torch.compile", torch.compile(case.reference, dynamic=False), ""))
        for impl, fn, note in impls:
            if fn is None:
                rows.append((case.kernel, case.size, case.nbytes, impl, None, None, note or "skipped"))
                continue
            extra = ""
            try:
                if impl == "torch.compile":
                    t0 = time.perf_counter()
                    fn(*inputs)
                    _sync(device)
                    extra = f"compile {time.perf_counter() - t0:.0f} s"
                ms = time_ms(fn, inputs, device, warmup, reps)
            except Exception as exc:  # report and keep benchmarking the rest
                rows.append((case.kernel, case.size, case.nbytes, impl, None, None,
                             f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"))
                continue
            rows.append((case.kernel, case.size, case.nbytes, impl, ms, case.nbytes / ms / 1e6, extra))
            print(f"  {case.kernel:<22} {case.size:<22} {impl:<14} {ms:9.3f} ms", flush=True)
        del inputs

    header = f"{'kernel':<22} {'size':<22} {'MB moved':>9} {'impl':<14} {'ms':>9} {'GB/s':>8} {'% copy':>7}  note"
    print()
    print(header)
    print("-" * len(header))
    for kernel, size, nbytes, impl, ms, gbps, note in rows:
        ms_s = f"{ms:9.3f}" if ms is not None else f"{'-':>9}"
        gb_s = f"{gbps:8.2f}" if gbps is not None else f"{'-':>8}"
        pct = f"{100 * gbps / copy:6.1f}%" if gbps is not None else f"{'-':>7}"
        print(f"{kernel:<22} {size:<22} {nbytes / 1e6:9.1f} {impl:<14} {ms_s} {gb_s} {pct}  {note}")
    print(f"(% copy: GB/s relative to dst.copy_(src) at {copy:.1f} GB/s on the same device)")
    if device == "cpu":
        print("(on CPU copy_ also pays write-allocate reads that the count above ignores, so "
              "read-heavy kernels can pass 100%; timings share the machine with other jobs)")

    gates = gate_rows(args.quick, device, dtype, warmup, reps)
    print()
    print(f"{'gate after Fn (stand-in: x + gate * attn)':<44} {'ms':>9} {'gate ms':>9}")
    for size, name, ms, over in gates:
        print(f"{size + ' ' + name:<44} {ms:9.3f} {over:9.3f}")
    print("(gate ms: the time above 'Fn alone', i.e. what the residual and the diff cost)")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("PNG skipped: matplotlib is not installed")
        return
    labels = sorted({(r[0], r[1]) for r in rows}, key=lambda kv: [(r[0], r[1]) for r in rows].index(kv))
    impl_names = list(dict.fromkeys(r[3] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4))
    width = 0.8 / len(impl_names)
    for i, impl in enumerate(impl_names):
        vals = []
        for label in labels:
            match = [r for r in rows if (r[0], r[1]) == label and r[3] == impl and r[5] is not None]
            vals.append(match[0][5] if match else 0.0)
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=impl)
    ax.axhline(copy, color="k", linestyle="--", linewidth=1, label="copy_")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels([f"{k}\n{s}" for k, s in labels], fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title(f"cachec.kernels on {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"PNG saved to {args.png}")


if __name__ == "__main__":
    main()
