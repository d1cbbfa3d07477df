"""Compile time per tiny diffusers model: plain torch.compile against cachec, same inner backend.

    python bench/compile_times.py [--inner inductor] [--models flux sd3 ...]

Each time is the first call (dynamo trace + backend + inner compile) after
torch._dynamo.reset(). Inductor's on-disk caches stay as they are: for cold
numbers run each system alone with a fresh TORCHINDUCTOR_CACHE_DIR
(--only plain, --only cachec), since the second system reuses kernels the
first one compiled.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny_models import MODEL_NAMES, build  # noqa: E402

import cachec  # noqa: E402


def first_call(model, case, backend, options=None) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=options)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", cachec.CachecWarning)
        compiled(**case.inputs(1.0))
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--models", nargs="*", default=MODEL_NAMES)
    ap.add_argument("--only", choices=["plain", "cachec"], help="time one system only")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    for name in tqdm(args.models, desc="models"):
        case = build(name)
        nan = float("nan")
        plain = first_call(case.model, case, args.inner) if args.only != "cachec" else nan
        cached = first_call(case.model, case, "cachec", {"inner_backend": args.inner}) if args.only != "plain" else nan
        try:
            if args.only == "plain":
                raise ValueError("not compiled with cachec")
            s = cachec.summary(case.model)
            chain = f"{len(s.blocks)} blocks, " + " | ".join(f"{k}[{len(b)}]" if b else k for k, b in s.segments)
        except ValueError:
            chain = "no chain (compiled plainly)" if args.only != "plain" else "-"
        rows.append((name, plain, cached, chain))
    print(f"\nfirst-call time, inner backend {args.inner}, {torch.get_num_threads()} threads")
    print(f"{'model':<14}{'plain s':>9}{'cachec s':>10}  chain")
    for name, plain, cached, chain in rows:
        print(f"{name:<14}{plain:>9.1f}{cached:>10.1f}  {chain}")


if __name__ == "__main__":
    main()
