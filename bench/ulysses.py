"""Ulysses on CPU with gloo: bytes each rank sends per step in bf16 and in fp8, and time per step.

    python bench/ulysses.py [--inner inductor] [--steps 6]

The model is FLUX-shaped (2 double + 4 single blocks) at FLUX's head width (2 heads of 128
channels), in bf16, with 256 image and 32 text tokens: tests/ulysses_workers.py's
``bench_model``. Each rank counts the bytes it hands to ``all_to_all_single`` (less the chunk it
addresses to itself) per transformer call; time per call is the median over ``--steps`` calls
after two warm-up calls, each rank starting together (a barrier before every call). The
1-rank row runs the same model without Ulysses; every process uses one thread, so 2 ranks use
the machine's 2 cores. The fp8 error is max |out_fp8 - out_bf16| / max |out_bf16| per call;
"in all-to-all" is the mean time per call rank 0 spent inside ``all_to_all_single``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from ulysses_workers import spawn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    kw = dict(inner=args.inner, steps=args.steps)
    one = spawn([("1", "ulysses_cost", dict(comm="bf16", **kw))], world=1)[0]["1"]
    two = spawn([(c, "ulysses_cost", dict(comm=c, **kw)) for c in ("bf16", "fp8")], world=2)
    for r in two:
        for v in r.values():
            if "error" in v:
                raise SystemExit(v["trace"])
    print(f"FLUX-shaped bf16 model, 2+4 blocks, 2 heads x 128, 256 image + 32 text tokens; gloo on CPU, "
          f"1 thread per rank, inner backend {args.inner}, torch {torch.__version__}")
    print(f"{'ranks':>5}  {'comm':>4}  {'bytes/step/rank':>15}  {'ms/step':>8}  {'compile s':>9}  "
          f"{'fp8 err':>7}  {'in all-to-all ms':>16}")
    print(f"{1:>5}  {'-':>4}  {0:>15,}  {one['seconds'] * 1e3:>8.1f}  {one['compile']:>9.1f}  {'':>7}")
    for comm in ("bf16", "fp8"):
        r = two[0][comm]
        err = ""
        if comm == "fp8":
            err = max(((a - b).abs().max() / b.abs().max()).item()
                      for a, b in zip(r["outs"], two[0]["bf16"]["outs"]))
            err = f"{err:.4f}"
        print(f"{2:>5}  {comm:>4}  {int(r['bytes']):>15,}  {r['seconds'] * 1e3:>8.1f}  {r['compile']:>9.1f}  {err:>7}  "
              f"{r['exchange'] * 1e3:>16.1f}")
    ratio = two[0]["bf16"]["bytes"] / two[0]["fp8"]["bytes"]
    print(f"bytes bf16 / fp8: {ratio:.2f}x (rank 0; rank 1 sends {int(two[1]['fp8']['bytes']):,} in fp8)")


if __name__ == "__main__":
    main()
