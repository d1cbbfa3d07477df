"""End-to-end benchmark on the trained digits DiT: cachec against plain torch.compile, cache-dit
and diffusers' cache hooks, all in one run, on the same model, seeds, step count and CFG.

Every system generates the same digits (classifier-free guidance as two transformer calls per
step, cond then uncond, 28 Euler steps). Each row is one system at one setting: a warm-up
generation (compiles), then ``--repeats`` timed generations; the fastest counts. Columns:

* ``strategy``: the curve the row belongs to (below), ``setting``: its point on that curve;
* ``speedup``: plain torch.compile's time over this row's. Plain is compiled and timed again after
  every row; the baseline is the median of those timings under the same global inductor configs
  (a shared machine has spikes of 20-40% lasting tens of seconds: a median over the whole run is
  steadier than any single pairing). Their spread is printed;
* ``computed``: steps that ran the full block stack, cond/uncond branch, from each system's own
  records; for DBPrune, blocks run cond/uncond "of" the blocks an uncached generation runs per branch;
* ``PSNR``, ``SSIM``: against the plain images, on float images in [0, 1];
* ``accuracy``: a scikit-learn classifier reading the generated digits;
* ``recompiles``, ``breaks``: dynamo recompilations and graph breaks over warm-up and timed runs.

Strategies, each run by cachec and by cache-dit 1.5.3 at the same settings (``STRATEGIES``: the
cachec options and the cache-dit kwargs of each; F1B0, warmup 4, max 3 cached steps in a row):

* ``DBCache``: threshold r = 0.08 ... 0.32, and F2B1 at r = 0.24;
* ``+TaylorSeer O1``, ``+TaylorSeer O2``, ``+FoCa``: DBCache with that calibrator, r = 0.16, 0.24, 0.32;
* ``SCM (dynamic)``, ``SCM (static)``: cache-dit's named step masks slow / medium / fast / ultra;
  dynamic caches a mask's 0-step only when the DBCache gate (r = 0.24) agrees, static outright;
* ``DBPrune``: r = 0.06, 0.1, 0.16 (0.04 prunes nothing on this model, 0.16 all that warmup and
  max_continuous_cached_steps allow);
* ``FlexCache teacache``, ``pab``, ``ditango``, ``dbcache``: FlexCache's one knob, cache_ratio =
  0 ... 1 with its default warmup 1 and cooldown 1 (cachec only: neither cache-dit nor diffusers has the
  knob, TeaCache or DiTango; diffusers' PAB hook is left out here). For PAB and DiTango, computed counts
  the steps where every attention output (head group) computed.

plus diffusers ``FirstBlockCache`` (the DBCache thresholds, threshold only) and diffusers
``TaylorSeerCacheConfig`` (fixed interval), both under ``torch.compile``. cache-dit runs under its
``set_compile_configs()`` + ``torch.compile``; those configs change inductor globally, so its rows run
last, after a plain row under the same configs. A setting a system cannot express is a row that
says why; so is a cachec strategy this version of cachec lacks ("needs cachec ...": FoCa, named SCM
masks and DBPrune are picked up as they land) and a row that fails ("failed: ..."). The plot draws
each (system, strategy) as its Pareto front of PSNR against speedup.

    pip install -e ".[bench]"        # cache-dit, scikit-learn, matplotlib, tqdm
    python bench/e2e.py              # ~50 min on 2 CPU cores (62 timed rows, ~40 while cachec lacks
                                     # FoCa/SCM/DBPrune); writes out/e2e.csv and out/e2e.png
    python bench/e2e.py --quick      # 6 steps, 10 digits, aot_eager: a smoke run of the whole table
    python bench/e2e.py --rows DBPrune --only cachec cache-dit   # one strategy, two systems

Timings assume the cores are free: with 2 threads and another process busy on one of 2 cores, every
call waits on OpenMP's spinning threads (a 0.05 s eager call of this model takes 3 s); there, pass
``--threads 1`` (the speedups then compare single-threaded times).

With 6 steps (``--quick``) cache-dit's named masks are all the same (111001); below 8 steps it
asserts on any count but 4 and 6, and those rows say so.
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
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.append(os.path.dirname(BENCH))     # the checkout's cachec, unless one is installed
import digits  # noqa: E402

import cachec  # noqa: E402
from cachec.metrics import psnr, ssim  # noqa: E402

BRANCHES = ("cond", "uncond")     # digits.sample calls the transformer in this order every step
CACHE_DIT = "cache-dit 1.5.3"

# ----------------------------------------------------------------------------------------- settings

DBCACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.24, max_warmup_steps=4,
               max_continuous_cached_steps=3)    # cache-dit's cache_config keys; every point starts here
SWEEP = (0.08, 0.12, 0.16, 0.24, 0.32)            # DBCache alone
CALIBRATED = (0.16, 0.24, 0.32)                   # with a calibrator: where there are cached steps to correct
MASKS = ("slow", "medium", "fast", "ultra")       # cache-dit's named step masks
PRUNE = (0.06, 0.1, 0.16)                         # DBPrune's spread on this model
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)              # FlexCache's one knob (warmup 1, cooldown 1: its defaults)


def dbcache(steps: int, **overrides) -> dict:
    """The cache_config keys of one point: ``DBCACHE`` with ``overrides``, for ``steps`` steps."""
    return {**DBCACHE, **overrides, "num_inference_steps": steps}


def _cache_dit():
    import cache_dit      # only when a cache-dit row is built: it may not be installed
    return cache_dit


def _enable_cache(config: dict, kind: str = "DBCacheConfig", calibrator=None) -> dict:
    """``cache_dit.enable_cache`` kwargs: ``config`` as cache-dit's ``kind``, separate CFG, a calibrator."""
    return dict(cache_config=getattr(_cache_dit(), kind)(**config, enable_separate_cfg=True),
                calibrator_config=calibrator)


@dataclass(frozen=True)
class Strategy:
    """One curve of the table: its points, and each point spelled for cachec and for cache-dit.

    ``cachec(point, steps)``: the ``torch.compile`` options (``inner_backend`` aside);
    ``cache_dit(point, steps)``: the ``cache_dit.enable_cache`` kwargs. A cachec without
    ``requires`` (an attribute) or rejecting the options with a ValueError lacks ``feature``.
    """
    name: str
    points: tuple
    label: Callable[[Any], str]
    cachec: Callable[[Any, int], dict]
    cache_dit: Callable[[Any, int], dict]
    diffusers: str = ""          # why diffusers' hooks cannot run it ("": FirstBlockCache rows)
    feature: str = ""            # the cachec feature it needs ("": any cachec has it)
    requires: str = ""           # a cachec attribute the options use (hasattr: the feature is there)
    counts: str = "steps"        # computed column: "steps" (full stack) or "blocks" (run)


def _at(point: dict) -> str:
    p = {**DBCACHE, **point}
    return f"F{p['Fn_compute_blocks']}B{p['Bn_compute_blocks']} r={p['residual_diff_threshold']:g}"


def _thresholds(values) -> tuple:
    return tuple({"residual_diff_threshold": r} for r in values)


NO_EXTRAPOLATION = "no extrapolation of the cached residual (diffusers' TaylorSeer hook: its own rows)"


def _taylorseer(order: int) -> Strategy:
    return Strategy(
        f"+TaylorSeer O{order}", _thresholds(CALIBRATED), _at,
        cachec=lambda p, n: {**dbcache(n, **p), "enable_taylorseer": True, "taylorseer_order": order},
        cache_dit=lambda p, n: _enable_cache(
            dbcache(n, **p), calibrator=_cache_dit().TaylorSeerCalibratorConfig(taylorseer_order=order)),
        diffusers=NO_EXTRAPOLATION)


def _scm(policy: str) -> Strategy:
    gate = f" r={DBCACHE['residual_diff_threshold']:g}" if policy == "dynamic" else ""
    return Strategy(
        f"SCM ({policy})", MASKS, lambda mask: f"mask={mask}{gate}",
        cachec=lambda mask, n: {**dbcache(n), "scm_steps_mask_policy": mask, "scm_steps_policy": policy},
        cache_dit=lambda mask, n: _enable_cache(dbcache(
            n, steps_computation_mask=_cache_dit().steps_mask(mask_policy=mask, total_steps=n),
            steps_computation_policy=policy)),
        diffusers="no step masks in diffusers' hooks", feature="named SCM masks")


def _no_flexcache(ratio, steps):
    raise ValueError("no FlexCache one-knob API and no TeaCache in cache-dit 1.5.3")


def _flex(strategy: str) -> Strategy:
    return Strategy(
        f"FlexCache {strategy}", RATIOS, lambda c: f"cache_ratio={c:g}",
        cachec=lambda c, n: {"strategy": strategy, "cache_ratio": c, "num_inference_steps": n},
        cache_dit=_no_flexcache, diffusers="no one-knob API (FlexCache) in diffusers' hooks",
        feature=f"FlexCache {strategy}", requires="FlexCacheConfig")


STRATEGIES = (
    Strategy("DBCache", _thresholds(SWEEP) + ({"Fn_compute_blocks": 2, "Bn_compute_blocks": 1},), _at,
             cachec=lambda p, n: dbcache(n, **p),
             cache_dit=lambda p, n: _enable_cache(dbcache(n, **p))),
    _taylorseer(1),
    _taylorseer(2),
    Strategy("+FoCa", _thresholds(CALIBRATED), _at,
             cachec=lambda p, n: {**dbcache(n, **p), "calibrator_config": cachec.FoCaCalibratorConfig()},
             cache_dit=lambda p, n: _enable_cache(dbcache(n, **p), calibrator=_cache_dit().FoCaCalibratorConfig()),
             diffusers=NO_EXTRAPOLATION, feature="FoCa", requires="FoCaCalibratorConfig"),
    _scm("dynamic"),
    _scm("static"),
    Strategy("DBPrune", PRUNE, lambda r: f"F1B0 r={r:g}",
             cachec=lambda r, n: {"cache_type": "DBPrune", **dbcache(n, residual_diff_threshold=r)},
             cache_dit=lambda r, n: _enable_cache(dbcache(n, residual_diff_threshold=r), "DBPruneConfig"),
             diffusers="no block pruning in diffusers' hooks", feature="DBPrune", counts="blocks"),
    _flex("teacache"),
    _flex("pab"),
    _flex("ditango"),
    _flex("dbcache"),
)


# ------------------------------------------------------------------------------------------ systems

@dataclass
class Prepared:
    """A system ready to generate: how to call it per branch, and what it recorded."""
    call: Callable                                   # call(branch_index, **transformer_kwargs)
    computed: Callable[[], str]                      # the computed column for the last generation
    before_generation: Callable[[], None] = lambda: None


@dataclass
class Row:
    system: str
    strategy: str                                    # the curve: uncached, one of STRATEGIES, a diffusers hook
    setting: str
    prepare: Optional[Callable[[torch.nn.Module, int, str], Prepared]]
    note: str = ""
    configs: str = "default"                         # the global inductor configs the row ran under
    feature: str = ""                                # a cachec feature the row needs (its note if missing)
    result: dict = field(default_factory=dict)


def _note(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _first_line(error: BaseException) -> str:
    """An error's message, first line, without cachec's suggestions and lists of what is allowed."""
    line = (str(error).strip().splitlines() or [""])[0]
    for tail in (" by this version of cachec", " (supported: ", " (allowed: ", "; did you mean"):
        line = line.split(tail)[0]
    return line


def plain(transformer, steps, backend):
    compiled = torch.compile(transformer, backend=backend)
    return Prepared(lambda b, **kw: compiled(**kw), lambda: f"{steps}/{steps}")


def _cachec_blocks(summary, steps: int) -> Optional[str]:
    """DBPrune's computed column from cachec's summary: per branch ``blocks_run`` ({step: blocks run})
    of ``blocks_total`` (blocks per call) times the steps; None while the summary has no such fields."""
    runs = [getattr(b, "blocks_run", None) for b in summary.branches.values()]
    totals = [getattr(b, "blocks_total", getattr(summary, "blocks_total", None)) for b in summary.branches.values()]
    if not runs or None in runs or None in totals:
        return None
    return "/".join(str(sum(run.values())) for run in runs) + f" of {max(totals) * steps}"


def cachec_system(strategy: Strategy, point):
    def prepare(transformer, steps, backend):
        compiled = torch.compile(transformer, backend="cachec",
                                 options={"inner_backend": backend, **strategy.cachec(point, steps)})

        def computed():
            summary = cachec.summary(compiled)
            blocks = _cachec_blocks(summary, steps) if strategy.counts == "blocks" else None
            return blocks or "/".join(str(len(b.computed_steps)) for b in summary.branches.values())
        return Prepared(lambda b, **kw: compiled(**kw), computed)
    return prepare


def cachec_row(strategy: Strategy, point, steps: int) -> Row:
    """A cachec row, or a row saying what this cachec lacks for it (checked as the backend will)."""
    row = Row("cachec", strategy.name, strategy.label(point), None, feature=strategy.feature)
    if strategy.requires and not hasattr(cachec, strategy.requires):
        row.note = f"needs cachec.{strategy.requires}"
        return row
    try:
        cachec.parse_options({"inner_backend": "eager", **strategy.cachec(point, steps)})
    except ValueError as e:
        if not strategy.feature:
            raise
        row.note = f"needs cachec {strategy.feature}: {_first_line(e)}"
        return row
    row.prepare = cachec_system(strategy, point)
    return row


def cache_dit_system(strategy: Strategy, point):
    def prepare(transformer, steps, backend):
        import cache_dit
        cache_dit.enable_cache(transformer, **strategy.cache_dit(point, steps))
        compiled = torch.compile(transformer, backend=backend)

        def computed():
            stats = cache_dit.summary(transformer, logging=False)[0]   # one entry: FLUX's blocks are merged
            if strategy.counts == "blocks":   # blocks per call, per branch (cfg_: the second call of a step)
                total = sum(stats.actual_blocks)
                return (f"{total - sum(stats.pruned_blocks)}/"
                        f"{sum(stats.cfg_actual_blocks) - sum(stats.cfg_pruned_blocks)} of {total}")
            return f"{steps - len(stats.cached_steps)}/{steps - len(stats.cfg_cached_steps)}"
        # Transformer-only use keeps cache-dit's state across generations (the second one is off by a
        # step, CFG roles swap): its documented fix is refresh_context before every generation.
        return Prepared(lambda b, **kw: compiled(**kw), computed,
                        lambda: cache_dit.refresh_context(transformer, num_inference_steps=steps))
    return prepare


def cache_dit_row(strategy: Strategy, point, steps: int) -> Row:
    """A cache-dit row, or a row saying why cache-dit cannot build this setting."""
    row = Row(CACHE_DIT, strategy.name, strategy.label(point), None, "refresh_context before each generation",
              "cache-dit")
    try:
        kwargs = strategy.cache_dit(point, steps)
    except (AssertionError, ValueError) as e:          # e.g. steps_mask at 5 or 7 steps
        row.note = f"cache-dit cannot: {_first_line(e) or type(e).__name__}"
        return row
    mask = getattr(kwargs["cache_config"], "steps_computation_mask", None)
    if mask is not None:
        row.note = _note(row.note, f"mask {''.join(map(str, mask))}")
    row.prepare = cache_dit_system(strategy, point)
    return row


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
        return f"{sum(decisions[0::2])}/{sum(decisions[1::2])}"

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
    out = [Row("torch.compile", "uncached", "uncached", plain)]
    out += [cachec_row(s, p, steps) for s in STRATEGIES for p in s.points]
    fbc = "diffusers FirstBlockCache"
    for s in STRATEGIES:
        if s.diffusers:
            out.append(Row(fbc, s.name, "all points", None, s.diffusers))
            continue
        for p in s.points:
            p = {**DBCACHE, **p}
            if (p["Fn_compute_blocks"], p["Bn_compute_blocks"]) != (1, 0):
                out.append(Row(fbc, s.name, _at(p), None,
                               "only the first block gates and only the last block ends the cached run: no Fn/Bn"))
            else:
                r = p["residual_diff_threshold"]
                out.append(Row(fbc, "FirstBlockCache", f"r={r:g}", first_block_cache_system(r),
                               "threshold only: no warmup, no max_continuous_cached_steps"))
    warmup = DBCACHE["max_warmup_steps"]
    out += [Row("diffusers TaylorSeer", "TaylorSeer (interval)", f"interval {k}, warmup {warmup}",
                taylorseer_system(k, warmup),
                "fixed interval, order 1, attention outputs only; computed = attention steps")
            for k in (2, 3, 4)]
    if with_cache_dit:
        out.append(Row("torch.compile + cache-dit configs", "uncached", "uncached", cache_dit_compile_configs,
                       "cache_dit.set_compile_configs() then torch.compile", "cache-dit"))
        out += [cache_dit_row(s, p, steps) for s in STRATEGIES for p in s.points]
    else:
        out += [Row(CACHE_DIT, s.name, s.label(p), None, cache_dit_missing) for s in STRATEGIES for p in s.points]
    return out


def select(plan: list[Row], systems: Optional[list[str]], strategies: Optional[list[str]]) -> list[Row]:
    """The rows whose system contains one of ``systems`` and whose strategy one of ``strategies``
    (case-insensitive; None: all). Plain torch.compile always stays (PSNR is against its images); the
    plain row under cache-dit's configs stays while a cache-dit row will run."""
    def has(text: str, words) -> bool:
        return words is None or any(w.lower() in text.lower() for w in words)
    kept = [r for r in plan if r.system == "torch.compile"
            or (has(r.system, systems) and (r.strategy == "uncached" or has(r.strategy, strategies)))]
    cache_dit_runs = any(r.configs == "cache-dit" and r.strategy != "uncached" and r.prepare for r in kept)
    return [r for r in kept if cache_dit_runs or not (r.configs == "cache-dit" and r.strategy == "uncached")]


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
    base = Row("torch.compile", "uncached", "baseline", plain)
    measure(base, conditioner, labels, steps, backend, repeats)
    row.result["base_seconds"] = base.result["seconds"]


def failure_note(row: Row, error: BaseException) -> str:
    """What a row that raised says: a ValueError from cachec's option checks means the feature is missing."""
    seen, e = [], error
    while e is not None and e not in seen:         # dynamo wraps a backend's error (BackendCompilerFailed)
        seen.append(e)
        if isinstance(e, ValueError) and row.system == "cachec" and row.feature:
            return f"needs cachec {row.feature}: {_first_line(e)}"
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    return f"failed: {type(error).__name__}: {_first_line(error)}"


def run(plan: list[Row], conditioner, labels, steps: int, backend: str, repeats: int) -> None:
    """Measure every runnable row; one that raises keeps a note instead of a result and the run goes on."""
    for row in tqdm([r for r in plan if r.prepare is not None], desc="e2e", unit="row"):
        try:
            measure_with_baseline(row, conditioner, labels, steps, backend, repeats)
        except Exception as e:  # noqa: BLE001 - one row must not end an hour-long run
            row.result = {}
            row.note = _note(row.note, failure_note(row, e))
            tqdm.write(f"{row.system} / {row.strategy} / {row.setting}: {row.note}\n"
                       + "".join(traceback.format_exception(e, limit=-4)), file=sys.stderr)


def finish(rows_: list[Row], labels, steps: int) -> list[dict]:
    base = next(r for r in rows_ if r.result)
    baselines = {}
    for r in rows_:
        if r.result:
            baselines.setdefault(r.configs, []).append(r.result["base_seconds"])
    median = {configs: statistics.median(times) for configs, times in baselines.items()}
    table = []
    for r in rows_:
        line = {"system": r.system, "strategy": r.strategy, "setting": r.setting, "note": r.note}
        if r.result:
            res = r.result
            line.update(speedup=median[r.configs] / res["seconds"], seconds=res["seconds"],
                        base_seconds=median[r.configs], paired_base_seconds=res["base_seconds"],
                        first_seconds=res["first_seconds"], computed=res["computed"],
                        psnr=psnr(res["images"], base.result["images"], data_range=1.0),
                        ssim=ssim(res["images"], base.result["images"]),
                        accuracy=digits.accuracy(res["images"], labels),
                        recompiles=res["recompiles"], graph_breaks=res["graph_breaks"])
        table.append(line)
    return table


def print_table(table: list[dict], steps: int, n: int, backend: str) -> None:
    print(f"\ndigits DiT, {n} digits, {steps} steps, CFG as two calls per step (computed: cond/uncond steps "
          f"that ran the full stack; DBPrune: blocks run of those of an uncached generation), "
          f"inner backend {backend}, {torch.get_num_threads()} threads")
    bases = [t["paired_base_seconds"] for t in table if "paired_base_seconds" in t]
    medians = sorted({t["base_seconds"] for t in table if "base_seconds" in t})
    print(f"plain torch.compile, timed after every row: {min(bases):.2f} to {max(bases):.2f} s per generation; "
          f"speedup = median of those under the same configs ({', '.join(f'{m:.2f} s' for m in medians)}) "
          f"/ the row's time")
    head = (f"{'system':<34}{'strategy':<22}{'setting':<20}{'speedup':>8}{'computed':>15}{'PSNR':>7}{'SSIM':>7}"
            f"{'acc':>6}{'recomp':>7}{'breaks':>7}  note")
    print(head)
    print("-" * len(head))
    for t in table:
        first = f"{t['system']:<34}{t['strategy']:<22}{t['setting']:<20}"
        if "speedup" in t:
            q = "inf" if math.isinf(t["psnr"]) else f"{t['psnr']:.1f}"
            print(f"{first}{t['speedup']:>7.2f}x{t['computed']:>15}{q:>7}{t['ssim']:>7.3f}{t['accuracy']:>6.0%}"
                  f"{t['recompiles']:>7}{t['graph_breaks']:>7}  {t['note']}")
        else:
            print(f"{first}{'cannot run':>30}  {t['note']}")


def write_csv(table: list[dict], path: str) -> None:
    keys = ["system", "strategy", "setting", "speedup", "seconds", "base_seconds", "paired_base_seconds",
            "first_seconds", "computed", "psnr", "ssim", "accuracy", "recompiles", "graph_breaks", "note"]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)


def read_csv(path: str) -> list[dict]:
    """A table ``write_csv`` wrote, with its numbers as numbers again."""
    def value(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v
    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each of its rows that ``new`` measured again replaced, and ``new``'s other
    rows appended; a row is its (system, strategy, setting). The plain torch.compile row of
    ``old`` stays: PSNR is against its images in both runs (same seeds and model)."""
    key = lambda t: (t["system"], t["strategy"], t["setting"])   # noqa: E731
    fresh = {key(t): t for t in new if t["strategy"] != "uncached"}
    merged = [fresh.pop(key(t), t) for t in old]
    return merged + list(fresh.values())


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (PSNR, speedup) points no other point beats on both, sorted by PSNR.

    A point is dominated when another has both a higher PSNR and a higher speedup.
    """
    return sorted(p for p in points if not any(q[0] > p[0] and q[1] > p[1] for q in points))


_PALETTE = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9", "gold", "teal", "navy", "lime")
CURVE_COLORS = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(
    [s.name for s in STRATEGIES] + ["FirstBlockCache", "TaylorSeer (interval)"])}


def _line_style(system: str) -> tuple[str, str]:
    """(line style, marker): cachec solid, cache-dit dashed, diffusers dotted."""
    if system == "cachec":
        return "-", "o"
    return ("--", "s") if system.startswith("cache-dit") else (":", "^")


def plot(table: list[dict], path: str, title: str) -> None:
    """Speedup against PSNR: each (system, strategy) as its Pareto front, dominated points faint.

    A strategy keeps its colour across systems; uncached points sit at the right edge (PSNR capped).
    """
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): no {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    finite = [t["psnr"] for t in table if "psnr" in t and math.isfinite(t["psnr"])]
    cap = max(finite, default=40.0) + 5
    curves: dict[tuple[str, str], list] = {}
    for t in table:
        if "speedup" in t:
            curves.setdefault((t["system"], t["strategy"]), []).append((min(t["psnr"], cap), t["speedup"]))
    fig, ax = plt.subplots(figsize=(11, 6))
    for (system, strategy), points in curves.items():
        if strategy == "uncached":
            ax.plot(*zip(*points), linestyle="none", marker="*", markersize=12,
                    color="black" if system == "torch.compile" else "grey", label=f"{system}: uncached")
            continue
        style, marker = _line_style(system)
        color = CURVE_COLORS.get(strategy)
        front = pareto_front(points)
        line, = ax.plot(*zip(*front), linestyle=style, marker=marker, color=color, label=f"{system}: {strategy}")
        dominated = [p for p in points if p not in front]
        if dominated:
            ax.plot(*zip(*dominated), linestyle="none", marker=marker, color=line.get_color(), alpha=0.25)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel(f"PSNR against uncached, dB (uncached drawn at {cap:.0f}); faint: dominated points")
    ax.set_ylabel("speedup over plain torch.compile")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
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
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (at most the cores); 1 on a machine where another process keeps a core busy")
    ap.add_argument("--no-cache-dit", action="store_true", help="leave cache-dit out even if it is installed")
    ap.add_argument("--quick", action="store_true", help="6 steps, 1 digit per class, aot_eager, 1 repeat")
    ap.add_argument("--only", nargs="*", metavar="SYSTEM",
                    help="run only rows whose system contains one of these words (plain always runs)")
    ap.add_argument("--rows", nargs="*", metavar="STRATEGY",
                    help="run only rows whose strategy contains one of these words, e.g. DBPrune, TaylorSeer, "
                         "SCM, FoCa, DBCache, FirstBlockCache (uncached rows always run)")
    ap.add_argument("--merge", metavar="CSV",
                    help="merge this run's rows into an earlier table (e.g. bench/results/e2e.csv): rows measured "
                         "again replace theirs, new ones are added; --csv/--png get the merged table")
    ap.add_argument("--csv", default="out/e2e.csv")
    ap.add_argument("--png", default="out/e2e.png")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.per_class, args.backend, args.repeats = 6, 1, "aot_eager", 1
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))

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
    plan = select(plan, args.only or None, args.rows or None)
    run(plan, conditioner, labels, args.steps, args.backend, args.repeats)
    table = finish(plan, labels, args.steps)
    print_table(table, args.steps, len(labels), args.backend)
    if args.merge:
        table = merge(read_csv(args.merge), table)
    write_csv(table, args.csv)
    plot(table, args.png, f"digits DiT, {len(labels)} digits, {args.steps} steps, separate CFG, {args.backend}")
    print(f"\nCSV: {args.csv}\nPNG: {args.png}")


if __name__ == "__main__":
    main()
