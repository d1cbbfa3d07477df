"""What cachec adds to each transformer call: timed interleaved, in one process, against
plain torch.compile and (optionally) against cachec at another git revision.

    python bench/percall.py [--baseline REV] [--model flux|toy] [--side 8] [--blocks 2+3] [--inner eager] [--rounds 80]

Every system runs the same model with the same inner backend: the tiny FLUX of the
tests (2 double + 3 single blocks, 64 image tokens), or the tests' toy DiT (8 blocks
of a few elementwise ops on 16 x 8 values), where cachec's Python per call is most of
the time and so differences in it show. cachec runs at ``residual_diff_threshold=0``, so
every step computes: the difference to plain compile is cachec's fixed cost per call.
With ``--baseline REV`` the package at that revision is unpacked (``git archive``)
under another name and compiled side by side with the working tree's, twice: the
two copies of the same code give the noise floor of the comparison (on the tiny
FLUX, ~30 us between two copies, from where each one's tensors landed). With
``--inner inductor`` cachec also runs with ``share_blocks=False`` (every block
compiled inline), which prices what calling shared block code costs per call.
``--guard-filter NAME`` compiles every system with ``torch.compiler.NAME`` as dynamo's
guard filter (``skip_guard_on_inbuilt_nn_modules_unsafe``: no guards on the model's
modules and parameters, which every call checks otherwise).

Each round times one 28-step generation per system, systems in a shuffled order,
with warm caches; the per-call time of a system is its median over rounds. The table gives
the ms per call, the ratio to plain compile and the added ms per call.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from typing import Callable

import torch

from tqdm import tqdm

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from tiny_models import _image_ids, _tiny_flux_transformer, build  # noqa: E402

import cachec  # noqa: E402


def package_at(rev: str):
    """cachec as of git revision ``rev``, importable as ``cachec_<rev>``."""
    name = "cachec_" + "".join(c if c.isalnum() else "_" for c in rev)
    where = tempfile.mkdtemp(prefix="cachec_rev_")
    blob = subprocess.run(["git", "-C", ROOT, "archive", rev, "cachec"], check=True, capture_output=True).stdout
    path = os.path.join(where, "archive.tar")
    with open(path, "wb") as f:
        f.write(blob)
    with tarfile.open(path) as tar:
        tar.extractall(where, filter="data")
    os.rename(os.path.join(where, "cachec"), os.path.join(where, name))
    sys.path.insert(0, where)
    return importlib.import_module(name)


def _compile(m, backend, guard_filter=None, options=None):
    """torch.compile, with dynamo's guard filter if one was asked for."""
    options = {**(options or {}), **({"guard_filter_fn": guard_filter} if guard_filter else {})}
    return torch.compile(m, backend=backend, options=options or None)


def systems(inner: str, baseline, variants: bool = False, cached: bool = False, guard_filter=None) -> dict:
    tc = functools.partial(_compile, guard_filter=guard_filter)
    opts = {"inner_backend": inner, "residual_diff_threshold": 0.0}
    out = {"torch.compile": lambda m: tc(m, inner),
           "cachec": lambda m: tc(m, functools.partial(cachec.cachec_backend, options=opts))}
    if inner == "inductor":   # blocks compiled once (the default) against inlined
        unshared = {**opts, "share_blocks": False}
        out["cachec share_blocks=False"] = lambda m: tc(
            m, functools.partial(cachec.cachec_backend, options=unshared))
    if inner == "inductor" and variants:   # inductor's per-call input asserts: off in plain, on in cachec
        out["torch.compile size_asserts=False"] = lambda m: tc(m, inner, options={"size_asserts": False})
        loud = {**opts, "inductor": {"size_asserts": True}}
        out["cachec size_asserts=True"] = lambda m: tc(
            m, functools.partial(cachec.cachec_backend, options=loud))
    if cached:   # every step after the first reuses the middle: what a cached step costs
        always = {**opts, "residual_diff_threshold": 1.0, "max_warmup_steps": 0, "max_continuous_cached_steps": -1,
                  "max_cached_steps": -1}
        out["cachec cached steps"] = lambda m: tc(
            m, functools.partial(cachec.cachec_backend, options=always))
    if baseline is not None:
        rev, pkg = baseline
        for name in (f"cachec@{rev}", f"cachec@{rev} (2nd copy)"):
            out[name] = lambda m: tc(m, functools.partial(pkg.cachec_backend, options=opts))
    return out


def model_and_calls(name: str, steps: int, side: int = 8, blocks: str = "2+3") -> tuple[Callable, list]:
    """A builder of identical models, and the keyword arguments of one generation's calls."""
    ts = torch.linspace(1.0, 0.05, steps).tolist()
    if name == "toy":
        from toy import ToyDiT
        x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
        return lambda: ToyDiT(8), [dict(hidden_states=x, timestep=torch.tensor([t])) for t in ts]
    case = build("flux")
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, side * side, 16, generator=gen)
    double, single = map(int, blocks.split("+"))
    return lambda: _tiny_flux_transformer(double, single), [
        {**case.inputs(t), "hidden_states": latent, "img_ids": _image_ids(side, side)}
                                         for t in ts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="a git revision of cachec to time side by side")
    ap.add_argument("--inner", default="eager", choices=["eager", "aot_eager", "inductor"])
    ap.add_argument("--model", default="flux", choices=["flux", "toy"])
    ap.add_argument("--side", type=int, default=8, help="tiny FLUX: packed latent grid side (8: 64 tokens)")
    ap.add_argument("--blocks", default="2+3", help="tiny FLUX: double+single blocks (FLUX.1: 19+38)")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guard-filter", help="a torch.compiler guard filter for every system "
                    "(skip_guard_on_inbuilt_nn_modules_unsafe, skip_guard_on_all_nn_modules_unsafe, ...)")
    ap.add_argument("--variants", action="store_true",
                    help="inductor: also plain compile with inductor's size_asserts off, cachec with them on")
    ap.add_argument("--cached", action="store_true",
                    help="also time cachec caching every step after the first (threshold 1), against the "
                         "share of the FLOPs it still runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    baseline = (args.baseline, package_at(args.baseline)) if args.baseline else None
    new_model, calls = model_and_calls(args.model, args.steps, args.side, args.blocks)
    # one model instance each (same weights): compiled code and cachec's state stay apart
    guard_filter = getattr(torch.compiler, args.guard_filter) if args.guard_filter else None
    made = systems(args.inner, baseline, args.variants, args.cached, guard_filter)
    compiled = {name: make(new_model()) for name, make in made.items()}
    if args.cached and args.model == "flux":   # what a cached step still runs, compiled plainly: the
        # same prologue and epilogue around the first block alone
        first_block = lambda: _tiny_flux_transformer(1, 0)  # noqa: E731
        compiled["torch.compile, first block only"] = _compile(first_block(), args.inner, guard_filter)
        # dynamo's entry alone (guards on every parameter, frame and wrappers): a backend that returns
        # the outputs at once, on the full model and on the first-block model
        compiled["dynamo entry only"] = _compile(new_model(), _entry_only, guard_filter)
        compiled["dynamo entry only, first block only"] = _compile(first_block(), _entry_only, guard_filter)
    times = {name: [] for name in compiled}
    with torch.no_grad():
        for name, m in compiled.items():   # compile and warm up
            for kw in calls:
                m(**kw)
        order = list(compiled)
        for r in tqdm(range(args.rounds), desc="rounds"):
            random.Random(r).shuffle(order)   # no system always runs right after another
            for name in order:
                m = compiled[name]
                start = time.perf_counter()
                for kw in calls:
                    m(**kw)
                times[name].append((time.perf_counter() - start) / len(calls) * 1e3)
    plain = statistics.median(times["torch.compile"])
    what = f"tiny FLUX {args.blocks} blocks, {args.side ** 2} tokens" if args.model == "flux" else "toy DiT, 8 blocks"
    print(f"\nper call, median of {args.rounds} interleaved rounds of {args.steps} calls; {what}, "
          f"inner backend {args.inner}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'system':<30} {'ms/call':>8} {'x plain':>8} {'added us':>9}")
    for name, ts_ in times.items():
        ms = statistics.median(ts_)
        print(f"{name:<30} {ms:8.4f} {ms / plain:8.3f} {(ms - plain) * 1e3:9.1f}")
    if args.cached:
        share = flop_share_outside_middle(new_model(), calls[0])
        # the generation's first call computes (as a threshold-0 call does); the other calls are cached
        ms = (statistics.median(times["cachec cached steps"]) * len(calls) - statistics.median(times["cachec"])) \
            / (len(calls) - 1)
        print(f"cached steps: the first block, prologue and epilogue are {share:.1%} of a call's FLOPs; "
              f"that share of plain's time is {plain * share:.4f} ms, and a cached step costs {ms:.4f} ms "
              f"({(ms - plain * share) * 1e3:.1f} us over the FLOP share; the generation's computed first call "
              f"taken out at the threshold-0 call's time)")
        if "torch.compile, first block only" in times:
            alone = statistics.median(times["torch.compile, first block only"])
            entry = statistics.median(times["dynamo entry only"]) - \
                statistics.median(times["dynamo entry only, first block only"])
            print(f"the same work compiled plainly (prologue, first block, epilogue) takes {alone:.4f} ms: a cached "
                  f"step costs {(ms - alone) * 1e3:.1f} us more, of which {entry * 1e3:.1f} us is dynamo's entry "
                  f"into the full model (its guards check every parameter; plain compile of the full model pays "
                  f"it too) and {(ms - alone - entry) * 1e3:.1f} us cachec's own")


def _entry_only(gm, example_inputs):
    """A backend whose compiled graph returns the first call's outputs: a call then costs
    dynamo's entry alone."""
    outs = gm(*example_inputs)
    return lambda *args: outs


def flop_share_outside_middle(model: torch.nn.Module, kwargs: dict) -> float:
    """The share of one call's FLOPs outside the cached middle at F1B0 (every block but the
    first of the chain), counted by torch's FlopCounterMode per module."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**kwargs)
    flops = counter.get_flop_counts()
    total = sum(flops["Global"].values())
    names = [n for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList) and len(m)]
    blocks = [f"{n}.{i}" for n in names for i in range(len(getattr(model, n)))]
    middle = sum(sum(flops.get(f"{type(model).__name__}.{b}", {}).values()) for b in blocks[1:])
    return 1 - middle / total


if __name__ == "__main__":
    main()
