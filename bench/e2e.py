"""End-to-end benchmark on the trained digits DiT: cachec against plain torch.compile, cache-dit
and diffusers' cache hooks, all in one run, on the same model, seeds, step count and CFG.

Every system generates the same digits (classifier-free guidance as two transformer calls per
step, cond then uncond, 28 Euler steps). Each row is one system at one setting: a warm-up
generation (compiles), then ``--repeats`` timed generations; the fastest counts. Columns:

* ``speedup``: plain torch.compile's time over this row's. Plain is compiled and timed again after
  every row; the baseline is the median of those timings under the same global inductor configs
  (a shared machine has spikes of 20-40% lasting tens of seconds: a median over the whole run is
  steadier than any single pairing). Their spread is printed;
* ``computed``: steps that ran the full block stack, cond/uncond branch, from each system's own
  records;
* ``PSNR``, ``SSIM``: against the plain images, on float images in [0, 1];
* ``accuracy``: a scikit-learn classifier reading the generated digits;
* ``recompiles``, ``breaks``: dynamo recompilations and graph breaks over warm-up and timed runs.

Systems: cachec (DBCache sweep, SCM mask, TaylorSeer), cache-dit 1.5.3 (same settings, its
``set_compile_configs()`` + ``torch.compile``), diffusers ``FirstBlockCache`` (threshold only) and
diffusers ``TaylorSeerCacheConfig`` (fixed interval), both under ``torch.compile``. cache-dit's
compile configs change inductor globally, so its rows run last, after a plain row under the same
configs. A setting a system cannot express is a row that says why.

    pip install -e ".[bench]"        # cache-dit, scikit-learn, matplotlib, tqdm
    python bench/e2e.py              # ~25 min on 2 CPU cores; writes out/e2e.csv and out/e2e.png
    python bench/e2e.py --quick      # 6 steps, 10 digits, aot_eager: a smoke run of the whole table
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402

import cachec  # noqa: E402
from cachec.metrics import psnr, ssim  # noqa: E402

BRANCHES = ("cond", "uncond")     # digits.sample calls the transformer in this order every step


@dataclass(frozen=True)
class DBCacheSetting:
    """One DBCache point of the sweep, in cache-dit's vocabulary."""
    Fn: int = 1
    Bn: int = 0
    threshold: float = 0.24
    warmup: int = 4
    max_continuous: int = 3
    mask: Optional[tuple] = None          # SCM: 1 compute / 0 cache per step, static policy
    taylorseer: int = 0                   # TaylorSeer order (0: off)

    @property
    def label(self) -> str:
        taylor = f" +TS{self.taylorseer}" if self.taylorseer else ""
        if self.mask is not None:
            return f"F{self.Fn}B{self.Bn} SCM static {sum(self.mask)}/{len(self.mask)}{taylor}"
        return f"F{self.Fn}B{self.Bn} r={self.threshold:g}{taylor}"

    def cache_config(self, steps: int) -> dict:
        """The cache-dit / cachec ``cache_config`` keys for this point."""
        config = dict(Fn_compute_blocks=self.Fn, Bn_compute_blocks=self.Bn, residual_diff_threshold=self.threshold,
                      max_warmup_steps=self.warmup, max_continuous_cached_steps=self.max_continuous,
                      num_inference_steps=steps)
        if self.mask is not None:
            config.update(steps_computation_mask=list(self.mask), steps_computation_policy="static")
        if self.taylorseer:   # cachec's keys (vllm-omni's); cache-dit takes a calibrator_config instead
            config.update(enable_taylorseer=True, taylorseer_order=self.taylorseer)
        return config


FAST_MASK_28 = tuple(cachec.steps_mask([6, 1, 1, 1, 1, 1], [1, 3, 4, 5, 4]))   # cache-dit's "fast": 11 of 28


def sweep(steps: int) -> list[DBCacheSetting]:
    points = [DBCacheSetting(threshold=r) for r in (0.08, 0.12, 0.16, 0.24, 0.32)]
    points.append(DBCacheSetting(Fn=2, Bn=1, threshold=0.24))
    if steps == len(FAST_MASK_28):
        mask = FAST_MASK_28
    else:   # --quick: a short mask of the same shape
        mask = tuple([1, 1] + [0, 1] * ((steps - 2) // 2) + [1] * (steps % 2))
    points.append(DBCacheSetting(threshold=0.0, warmup=0, mask=mask))
    points += [DBCacheSetting(threshold=r, taylorseer=1) for r in (0.24, 0.32)]
    points.append(DBCacheSetting(threshold=0.0, warmup=0, mask=mask, taylorseer=1))
    return points


# ------------------------------------------------------------------------------------------ systems

@dataclass
class Prepared:
    """A system ready to generate: how to call it per branch, and what it recorded."""
    call: Callable                                   # call(branch_index, **transformer_kwargs)
    computed: Callable[[], tuple[int, int]]          # steps of the last generation that ran the full stack
    before_generation: Callable[[], None] = lambda: None


@dataclass
class Row:
    system: str
    setting: str
    prepare: Optional[Callable[[torch.nn.Module, int, str], Prepared]]
    note: str = ""
    configs: str = "default"                         # the global inductor configs the row ran under
    result: dict = field(default_factory=dict)


def plain(transformer, steps, backend):
    compiled = torch.compile(transformer, backend=backend)
    return Prepared(lambda b, **kw: compiled(**kw), lambda: (steps, steps))


def cachec_system(setting: DBCacheSetting):
    def prepare(transformer, steps, backend):
        compiled = torch.compile(transformer, backend="cachec",
                                 options={"inner_backend": backend, **setting.cache_config(steps)})

        def computed():
            branches = cachec.summary(compiled).branches
            return tuple(len(branches[name].computed_steps) for name in branches)
        return Prepared(lambda b, **kw: compiled(**kw), computed)
    return prepare


def cache_dit_system(setting: DBCacheSetting):
    def prepare(transformer, steps, backend):
        import cache_dit
        config = setting.cache_config(steps)
        order = config.pop("taylorseer_order", None)
        config.pop("enable_taylorseer", None)
        calibrator = None if order is None else cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order)
        cache_dit.enable_cache(transformer, cache_config=cache_dit.DBCacheConfig(**config, enable_separate_cfg=True),
                               calibrator_config=calibrator)
        compiled = torch.compile(transformer, backend=backend)

        def computed():
            stats = cache_dit.summary(transformer, logging=False)[0]
            return steps - len(stats.cached_steps), steps - len(stats.cfg_cached_steps)
        # Transformer-only use keeps cache-dit's state across generations (the second one is off by a
        # step, CFG roles swap): its documented fix is refresh_context before every generation.
        return Prepared(lambda b, **kw: compiled(**kw), computed,
                        lambda: cache_dit.refresh_context(transformer, num_inference_steps=steps))
    return prepare


def _record(owner, method: str, decisions: list, pick=lambda result: result):
    """Wrap a hook's decision method on the instance so each call's verdict is kept.

    The originals are ``torch.compiler.disable``-d; the wrapper is too, so dynamo breaks the
    graph at exactly the same place as without it.
    """
    original = getattr(owner, method)

    @torch.compiler.disable
    def recorded(*args, **kwargs):
        result = original(*args, **kwargs)
        decisions.append(bool(pick(result)))
        return result
    setattr(owner, method, recorded)


def _diffusers_prepared(transformer, compiled, decisions: list) -> Prepared:
    def call(b, **kw):
        with transformer.cache_context(BRANCHES[b]):      # as diffusers pipelines do with separate CFG
            return compiled(**kw)

    def computed():
        return sum(decisions[0::2]), sum(decisions[1::2])

    def before_generation():
        transformer._reset_stateful_cache()               # what a pipeline does after each generation
        decisions.clear()
    return Prepared(call, computed, before_generation)


def first_block_cache_system(threshold: float):
    def prepare(transformer, steps, backend):
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        decisions: list = []
        head = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0])
        _record(head.get_hook("fbc_leader_block_hook"), "_should_compute_remaining_blocks", decisions)
        return _diffusers_prepared(transformer, torch.compile(transformer, backend=backend), decisions)
    return prepare


def taylorseer_system(interval: int, warmup: int):
    def prepare(transformer, steps, backend):
        from diffusers.hooks import HookRegistry, TaylorSeerCacheConfig
        transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup,
                                                       max_order=1, taylor_factors_dtype=torch.float32))
        decisions: list = []
        first = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0].attn)
        _record(first.get_hook("taylorseer_cache"), "_measure_should_compute", decisions, pick=lambda r: r[0])
        return _diffusers_prepared(transformer, torch.compile(transformer, backend=backend), decisions)
    return prepare


def cache_dit_compile_configs(transformer, steps, backend):
    """Plain torch.compile after ``cache_dit.set_compile_configs()`` (global; stays for the rest of the run)."""
    import cache_dit
    cache_dit.set_compile_configs()
    return plain(transformer, steps, backend)


def rows(steps: int, with_cache_dit: bool, cache_dit_missing: str) -> list[Row]:
    points = sweep(steps)
    out = [Row("torch.compile", "uncached", plain)]
    out += [Row("cachec", p.label, cachec_system(p)) for p in points]
    for p in points:
        if p.taylorseer:
            out.append(Row("diffusers FirstBlockCache", p.label, None,
                           "no extrapolation of the cached residual (diffusers' TaylorSeer hook: rows below)"))
        elif p.mask is not None:
            out.append(Row("diffusers FirstBlockCache", p.label, None, "no step masks in diffusers' hooks"))
        elif (p.Fn, p.Bn) != (1, 0):
            out.append(Row("diffusers FirstBlockCache", p.label, None,
                           "only the first block gates and only the last block ends the cached run: no Fn/Bn"))
        else:
            out.append(Row("diffusers FirstBlockCache", f"r={p.threshold:g}", first_block_cache_system(p.threshold),
                           "threshold only: no warmup, no max_continuous_cached_steps"))
    warmup = DBCacheSetting().warmup
    out += [Row("diffusers TaylorSeer", f"interval {k}, warmup {warmup}", taylorseer_system(k, warmup),
                "fixed interval, order 1, attention outputs only; computed = attention steps")
            for k in (2, 3, 4)]
    if with_cache_dit:
        out.append(Row("torch.compile + cache-dit configs", "uncached", cache_dit_compile_configs,
                       "cache_dit.set_compile_configs() then torch.compile", "cache-dit"))
        out += [Row("cache-dit 1.5.3", p.label, cache_dit_system(p),
                    "refresh_context before each generation", "cache-dit") for p in points]
    else:
        out += [Row("cache-dit 1.5.3", p.label, None, cache_dit_missing) for p in points]
    return out


# ------------------------------------------------------------------------------------- measurement

class CompileCounter:
    """Counts dynamo recompilations (a frame compiled again) and graph breaks while active."""

    def __enter__(self):
        from torch._dynamo.callback import callback_handler
        from torch._dynamo.utils import counters
        self.recompiles = 0
        counters.clear()

        def on_start(args):
            ids = re.findall(r"\d+", str(args.compile_id))
            self.recompiles += len(ids) >= 2 and int(ids[1]) > 0
        self._callback = callback_handler.register_start_callback(on_start)
        return self

    def __exit__(self, *exc):
        from torch._dynamo.callback import callback_handler
        from torch._dynamo.utils import counters
        callback_handler.remove_start_callback(self._callback)
        self.graph_breaks = sum(counters["graph_break"].values())


def generate(prepared: Prepared, conditioner, labels, steps: int, seed: int, bar) -> torch.Tensor:
    calls = itertools.count()

    def call(**kw):
        bar.update(1)
        return prepared.call(next(calls) % 2, **kw)
    prepared.before_generation()
    return digits.sample(None, conditioner, labels, steps=steps, seed=seed, transformer_call=call)


def measure(row: Row, conditioner, labels, steps: int, backend: str, repeats: int) -> None:
    torch._dynamo.reset()
    transformer, _ = digits.load_model()          # a fresh model: hooks and patches never carry over
    with CompileCounter() as counter, torch.no_grad(), \
            tqdm(total=2 * steps * (1 + repeats), desc=f"{row.system}: {row.setting}", unit="call",
                 leave=False) as bar:
        prepared = row.prepare(transformer, steps, backend)
        start = time.perf_counter()
        generate(prepared, conditioner, labels, steps, seed=99, bar=bar)         # compiles
        first = time.perf_counter() - start
        times, images = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            images.append(generate(prepared, conditioner, labels, steps, seed=0, bar=bar))
            times.append(time.perf_counter() - start)
    same = all(torch.equal(images[0], im) for im in images[1:])
    row.result = dict(seconds=min(times), first_seconds=first, computed=prepared.computed(), images=images[-1],
                      recompiles=counter.recompiles, graph_breaks=counter.graph_breaks)
    if not same:
        row.note = (row.note + "; " if row.note else "") + "repeated generations differ"


def measure_with_baseline(row: Row, conditioner, labels, steps: int, backend: str, repeats: int) -> None:
    """Measure ``row``, then plain torch.compile at once (same global configs): its paired baseline."""
    measure(row, conditioner, labels, steps, backend, repeats)
    if row.prepare in (plain, cache_dit_compile_configs):
        row.result["base_seconds"] = row.result["seconds"]
        return
    base = Row("torch.compile", "baseline", plain)
    measure(base, conditioner, labels, steps, backend, repeats)
    row.result["base_seconds"] = base.result["seconds"]


def finish(rows_: list[Row], labels, steps: int) -> list[dict]:
    base = next(r for r in rows_ if r.result)
    baselines = {}
    for r in rows_:
        if r.result:
            baselines.setdefault(r.configs, []).append(r.result["base_seconds"])
    median = {configs: statistics.median(times) for configs, times in baselines.items()}
    table = []
    for r in rows_:
        line = {"system": r.system, "setting": r.setting, "note": r.note}
        if r.result:
            res = r.result
            cond, uncond = res["computed"]
            line.update(speedup=median[r.configs] / res["seconds"], seconds=res["seconds"],
                        base_seconds=median[r.configs], paired_base_seconds=res["base_seconds"],
                        first_seconds=res["first_seconds"], computed=f"{cond}/{uncond}",
                        psnr=psnr(res["images"], base.result["images"], data_range=1.0),
                        ssim=ssim(res["images"], base.result["images"]),
                        accuracy=digits.accuracy(res["images"], labels),
                        recompiles=res["recompiles"], graph_breaks=res["graph_breaks"])
        table.append(line)
    return table


def print_table(table: list[dict], steps: int, n: int, backend: str) -> None:
    print(f"\ndigits DiT, {n} digits, {steps} steps, CFG as two calls per step (computed: cond/uncond), "
          f"inner backend {backend}, {torch.get_num_threads()} threads")
    bases = [t["paired_base_seconds"] for t in table if "paired_base_seconds" in t]
    medians = sorted({t["base_seconds"] for t in table if "base_seconds" in t})
    print(f"plain torch.compile, timed after every row: {min(bases):.2f} to {max(bases):.2f} s per generation; "
          f"speedup = median of those under the same configs ({', '.join(f'{m:.2f} s' for m in medians)}) "
          f"/ the row's time")
    head = (f"{'system':<34}{'setting':<24}{'speedup':>8}{'computed':>10}{'PSNR':>7}{'SSIM':>7}{'acc':>6}"
            f"{'recomp':>7}{'breaks':>7}  note")
    print(head)
    print("-" * len(head))
    for t in table:
        if "speedup" in t:
            q = "inf" if math.isinf(t["psnr"]) else f"{t['psnr']:.1f}"
            print(f"{t['system']:<34}{t['setting']:<24}{t['speedup']:>7.2f}x{t['computed']:>10}{q:>7}"
                  f"{t['ssim']:>7.3f}{t['accuracy']:>6.0%}{t['recompiles']:>7}{t['graph_breaks']:>7}  {t['note']}")
        else:
            print(f"{t['system']:<34}{t['setting']:<24}{'cannot run':>30}  {t['note']}")


def write_csv(table: list[dict], path: str) -> None:
    keys = ["system", "setting", "speedup", "seconds", "base_seconds", "paired_base_seconds", "first_seconds",
            "computed", "psnr", "ssim", "accuracy", "recompiles", "graph_breaks", "note"]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)


def plot(table: list[dict], path: str, title: str) -> None:
    """Speedup against PSNR, one curve per system (uncached points sit at the right edge)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    finite = [t["psnr"] for t in table if "psnr" in t and math.isfinite(t["psnr"])]
    cap = max(finite, default=40.0) + 5
    fig, ax = plt.subplots(figsize=(8, 5))
    def curve_of(t):   # TaylorSeer rows of a system form a curve of their own, dashed
        return t["system"], "+TS" in t["setting"]
    colors = {}
    for key in dict.fromkeys(curve_of(t) for t in table if "speedup" in t):
        points = sorted((min(t["psnr"], cap), t["speedup"], "SCM" in t["setting"]) for t in table
                        if "speedup" in t and curve_of(t) == key)
        system, taylor = key
        curve = [(x, y) for x, y, scm in points if not scm] or [(x, y) for x, y, _ in points]
        line, = ax.plot(*zip(*curve), marker="o", linestyle="--" if taylor else "-", color=colors.get(system),
                        label=system + (" + TaylorSeer" if taylor else ""))
        colors[system] = line.get_color()
        for x, y, scm in points:
            if scm:   # a fixed step mask is not a point of the threshold sweep: drawn apart
                ax.plot([x], [y], marker="*", markersize=12, color=line.get_color())
                ax.annotate("SCM mask" + (" +TS" if taylor else ""), (x, y), textcoords="offset points",
                            xytext=(6, -3), fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel(f"PSNR against uncached, dB (uncached drawn at {cap:.0f})")
    ax.set_ylabel("speedup over plain torch.compile")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--per-class", type=int, default=4, help="digits of each class per generation")
    ap.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                    help="what every system compiles with (cachec: its inner backend)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per row; the fastest counts")
    ap.add_argument("--no-cache-dit", action="store_true", help="leave cache-dit out even if it is installed")
    ap.add_argument("--quick", action="store_true", help="6 steps, 1 digit per class, aot_eager, 1 repeat")
    ap.add_argument("--only", nargs="*", metavar="SYSTEM",
                    help="run only rows whose system contains one of these words (plain always runs)")
    ap.add_argument("--csv", default="out/e2e.csv")
    ap.add_argument("--png", default="out/e2e.png")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.per_class, args.backend, args.repeats = 6, 1, "aot_eager", 1
    torch.set_num_threads(min(2, torch.get_num_threads()))

    missing = ""
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        missing = "cache-dit is not installed (pip install -e '.[bench]')"
    with_cache_dit = not (args.no_cache_dit or missing)
    missing = missing or "left out (--no-cache-dit)"

    _, conditioner = digits.load_model()
    labels = [c for c in range(digits.NUM_CLASSES) for _ in range(args.per_class)]
    plan = rows(args.steps, with_cache_dit, missing)
    if args.only:
        plan = [r for r in plan if r.system == "torch.compile" or any(w in r.system for w in args.only)]
    runnable = [r for r in plan if r.prepare is not None]
    for row in tqdm(runnable, desc="e2e", unit="row"):
        measure_with_baseline(row, conditioner, labels, args.steps, args.backend, args.repeats)
    table = finish(plan, labels, args.steps)
    print_table(table, args.steps, len(labels), args.backend)
    write_csv(table, args.csv)
    plot(table, args.png, f"digits DiT, {len(labels)} digits, {args.steps} steps, separate CFG, {args.backend}")
    print(f"\nCSV: {args.csv}\nPNG: {args.png}")


if __name__ == "__main__":
    main()
