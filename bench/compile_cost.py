"""First-call (compile) time of FLUX-shaped models: plain inductor against cachec, with and
without compiling identical blocks once (``share_blocks``).

    python bench/compile_cost.py [--sizes 6+12 19+38] [--systems ...] [--dynamic] [--csv F] [--md F]

Each first call runs in a fresh process. "cold" gives it an empty inductor cache
directory (TORCHINDUCTOR_CACHE_DIR) of its own; "warm" runs it again in another
fresh process on the directory the cold run filled (inductor's FX graph cache and
AOTAutograd cache hit; dynamo still traces). The time is the first call: dynamo's
trace, the backend and the inner compile; inductor's own import (which plain
``torch.compile(backend="inductor")`` does before the call) comes before the timer for
every system. The model is the tests' tiny FLUX
(FluxTransformer2DModel at small widths: 2 heads of 16, 64 image tokens) at the depth asked;
cachec runs DBCache F1B0. The runs go one after another, each alone.

Two reference rows bound what any inductor-based compile of the model can reach: "dynamo's
trace alone" (backend="eager": the trace every backend pays before it is called) and
"inductor, one block of each kind" (plain inductor on the same model cut to one double and one
single block: the prologue, epilogue and one block of each kind compiled once, the least a
compiler that compiles each kind once must build, with a shorter trace than the full model's).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

_F1B0 = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0}
SYSTEMS = {   # name: (backend, cachec options, depth instead of the size asked)
    "inductor": ("inductor", None, None),
    "cachec": ("cachec", _F1B0, None),
    "cachec share_blocks=False": ("cachec", {**_F1B0, "share_blocks": False}, None),
    "dynamo's trace alone": ("eager", None, None),
    "inductor, one block of each kind": ("inductor", None, (1, 1)),
}


def one(system: str, double: int, single: int, dynamic: bool = False) -> dict:
    """Time the first call of one compiled model in this process."""
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny_models import _tiny_flux_transformer, build
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backend, opts, depth = SYSTEMS[system]
    double, single = depth or (double, single)
    model, inputs = _tiny_flux_transformer(double, single), {**build("flux").inputs(0.5), "return_dict": False}
    # torch.compile(backend="inductor") imports inductor's compile_fx right here, while cachec's
    # backend would import it inside the timed first call (~0.9 s): import it ahead for both
    import torch._inductor.compile_fx  # noqa: F401
    compiled = torch.compile(model, backend=backend, options=opts, dynamic=True if dynamic else None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        out = compiled(**inputs)[0]
        first = time.perf_counter() - start
        ref = model(**inputs)[0]
    return {"first_call_s": first, "max_abs_err": (out - ref).abs().max().item()}


def run(system: str, double: int, single: int, cache_dir: str, dynamic: bool = False) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    cmd = [sys.executable, __file__, "--one", system, "--size", f"{double}+{single}"] + (["--dynamic"] if dynamic else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=["6+12", "19+38"], help="double+single block counts")
    ap.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--csv", help="write the rows here")
    ap.add_argument("--md", help="write the table here (markdown)")
    ap.add_argument("--dynamic", action="store_true", help="torch.compile(..., dynamic=True) for every system")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        d, s = map(int, args.size.split("+"))
        print(json.dumps(one(args.one, d, s, args.dynamic)))
        return
    from tqdm import tqdm
    rows = []
    todo = [(size, system) for size in args.sizes for system in args.systems]
    for size, system in tqdm(todo, desc="first calls (cold, then warm)"):
        d, s = map(int, size.split("+"))
        with tempfile.TemporaryDirectory(prefix="cachec-compile-") as cache:
            cold = run(system, d, s, cache, args.dynamic)
            warm = run(system, d, s, cache, args.dynamic)
        rows.append({"blocks": size, "system": system, "cold_s": round(cold["first_call_s"], 2),
                     "warm_s": round(warm["first_call_s"], 2), "max_abs_err": f"{cold['max_abs_err']:.1e}"})
    for size in args.sizes:
        base = next((r for r in rows if r["blocks"] == size and r["system"] == "inductor"), None)
        for r in rows:
            if r["blocks"] == size and base is not None:
                r["cold_vs_inductor"] = round(r["cold_s"] / base["cold_s"], 2)
                r["warm_vs_inductor"] = round(r["warm_s"] / base["warm_s"], 2)
    keys = ["blocks", "system", "cold_s", "cold_vs_inductor", "warm_s", "warm_vs_inductor", "max_abs_err"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    print("\n".join(lines))
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
