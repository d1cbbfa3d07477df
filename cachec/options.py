"""Typed, validated options for the cachec backend.

Two layers:

* ``DBCacheConfig``: the caching schedule, with the field names of cache-dit's /
  vllm-omni's ``cache_config`` spelled exactly as they spell them.
* ``BackendOptions``: how cachec compiles (inner backend, strictness) plus the
  cache config.

``parse_options(dict)`` turns what ``torch.compile(..., options=...)`` hands the
backend into ``BackendOptions``; every error is a ``ValueError`` that names the
key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["DBCacheConfig", "BackendOptions", "parse_options", "steps_mask", "INNER_BACKENDS"]

INNER_BACKENDS = ("inductor", "aot_eager", "eager")

# Keys that belong to strategies which have not landed yet. They are part of the
# vocabulary we accept, so they get a clear "not supported yet" instead of a
# did-you-mean.
_PLANNED_KEYS = (
    "scm_steps_mask_policy", "scm_steps_policy",
    "strategy", "cache_ratio", "warmup", "cooldown",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_at_least(lo: int, meaning: str = ""):
    def check(name, v):
        if not _is_int(v) or v < lo:
            raise ValueError(f"{name}={v!r} is invalid: expected an int >= {lo}{meaning}")
    return check


def _opt_int_at_least(lo: int):
    def check(name, v):
        if v is not None and (not _is_int(v) or v < lo):
            raise ValueError(f"{name}={v!r} is invalid: expected None or an int >= {lo}")
    return check


def _float_at_least(lo: float, meaning: str = ""):
    def check(name, v):
        if not _is_number(v) or v < lo:
            raise ValueError(f"{name}={v!r} is invalid: expected a finite number >= {lo}{meaning}")
    return check


def _opt_positive_float(name, v):
    if v is not None and (not _is_number(v) or v <= 0):
        raise ValueError(f"{name}={v!r} is invalid: expected None (off) or a finite number > 0")


def _bool(name, v):
    if not isinstance(v, bool):
        raise ValueError(f"{name}={v!r} is invalid: expected True or False")


def _opt_bool(name, v):
    if v is not None and not isinstance(v, bool):
        raise ValueError(f"{name}={v!r} is invalid: expected None (detect), True or False")


def _opt_mask(name, v):
    if v is None:
        return
    if isinstance(v, str):
        raise ValueError(
            f"{name}={v!r} is not supported yet: named masks (cache-dit's 'slow'/'medium'/'fast'/'ultra') "
            f"come with the SCM presets; pass an explicit list of 0/1 per step, e.g. [1, 1, 1, 1, 0, 1, 0, 1]")
    if not isinstance(v, (list, tuple)) or not v or any(not _is_int(m) or m not in (0, 1) for m in v):
        raise ValueError(f"{name}={v!r} is invalid: expected None or a non-empty list of 0 (cache) / 1 (compute) "
                         f"per step")


def _policy(name, v):
    if v not in SCM_POLICIES:
        raise ValueError(f"{name}={v!r} is invalid: expected one of {SCM_POLICIES}")


SCM_POLICIES = ("dynamic", "static")


def steps_mask(compute_bins: list, cache_bins: list) -> list:
    """A ``steps_computation_mask`` from alternating runs, computing first (cache-dit's bins).

    ``steps_mask([6, 1, 1], [1, 3])`` is six 1s, one 0, one 1, three 0s, one 1: 12 steps.
    There is one more compute bin than cache bins, so the last step computes.
    """
    for name, bins in (("compute_bins", compute_bins), ("cache_bins", cache_bins)):
        if not isinstance(bins, (list, tuple)) or any(not _is_int(n) or n < 1 for n in bins):
            raise ValueError(f"{name}={bins!r} is invalid: expected a list of ints >= 1 (run lengths)")
    if len(compute_bins) != len(cache_bins) + 1:
        raise ValueError(f"compute_bins={list(compute_bins)} and cache_bins={list(cache_bins)} are invalid together: "
                         f"runs alternate compute, cache, ..., compute, so there is one more compute bin")
    mask = [1] * compute_bins[0]
    for cache, compute in zip(cache_bins, compute_bins[1:]):
        mask += [0] * cache + [1] * compute
    return mask


def _opt(default, check, doc):
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class DBCacheConfig:
    """DBCache schedule (cache-dit's Dual Block Cache), validated at construction.

    The defaults are vllm-omni's: they are safe on any model with at least two
    blocks (cache-dit's Fn=8 asserts on models with fewer than 8 blocks) and give
    a clear speedup on large ones.
    """

    Fn_compute_blocks: int = _opt(1, _int_at_least(1), "first blocks that always run; their residual drives the gate")
    Bn_compute_blocks: int = _opt(0, _int_at_least(0), "last blocks that always run")
    residual_diff_threshold: float = _opt(
        0.24, _float_at_least(0.0, " (0 never caches, >= 1 caches every step after warmup)"),
        "cache a step when mean|R_prev - R| / mean|R_prev| is below this")
    max_warmup_steps: int = _opt(4, _int_at_least(0), "steps at the start of a generation that always compute")
    warmup_interval: int = _opt(1, _int_at_least(1), "in warmup, only every n-th step is forced to compute")
    max_cached_steps: int = _opt(-1, _int_at_least(-1, " (-1 = unlimited)"), "cached steps allowed per generation")
    max_continuous_cached_steps: int = _opt(3, _int_at_least(-1, " (-1 = unlimited)"), "cached steps allowed in a row")
    max_accumulated_residual_diff_threshold: Optional[float] = _opt(
        None, _opt_positive_float, "stop caching once the diffs of a generation add up to this")
    num_inference_steps: Optional[int] = _opt(None, _opt_int_at_least(1), "steps per generation, if known")
    enable_separate_cfg: Optional[bool] = _opt(
        None, _opt_bool, "two transformer calls per step (cond, uncond); None detects it from repeated timesteps")
    cfg_compute_first: bool = _opt(False, _bool, "with separate CFG, the uncond call comes first in each step")
    cfg_diff_compute_separate: bool = _opt(True, _bool, "with separate CFG, each branch measures its own diff")
    steps_computation_mask: Optional[tuple] = _opt(
        None, _opt_mask, "SCM: 1 (compute) or 0 (cache candidate) per step; sets num_inference_steps when unset")
    steps_computation_policy: str = _opt(
        "dynamic", _policy, "SCM: 'dynamic' caches a 0-step only when the gate agrees, 'static' caches it outright")
    enable_taylorseer: bool = _opt(
        False, _bool, "TaylorSeer: on cached steps, extrapolate the cached residual from its finite differences")
    taylorseer_order: int = _opt(1, _int_at_least(1), "TaylorSeer: derivative orders kept per cached residual")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))
        mask = self.steps_computation_mask
        if mask is not None:
            object.__setattr__(self, "steps_computation_mask", tuple(mask))
            if self.num_inference_steps is None:
                object.__setattr__(self, "num_inference_steps", len(mask))
            elif len(mask) != self.num_inference_steps:
                raise ValueError(
                    f"steps_computation_mask has {len(mask)} entries but "
                    f"num_inference_steps={self.num_inference_steps}: give one 0/1 per step")
        elif self.steps_computation_policy != _FIELD_DEFAULTS["steps_computation_policy"]:
            raise ValueError(
                f"steps_computation_policy={self.steps_computation_policy!r} needs a steps_computation_mask: "
                f"it says what to do on the mask's cache steps")
        if not self.enable_taylorseer and self.taylorseer_order != _FIELD_DEFAULTS["taylorseer_order"]:
            raise ValueError(f"taylorseer_order={self.taylorseer_order!r} needs enable_taylorseer=True")
        n = self.num_inference_steps
        if n is not None and mask is None and self.max_warmup_steps >= n:   # a mask truncates warmup
            raise ValueError(
                f"max_warmup_steps={self.max_warmup_steps} is invalid with num_inference_steps={n}: "
                f"every step would be a warmup step and nothing could be cached; use max_warmup_steps < {n}")
        if self.enable_separate_cfg is False:
            for name in ("cfg_compute_first", "cfg_diff_compute_separate"):
                default = _FIELD_DEFAULTS[name]
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} contradicts enable_separate_cfg=False: "
                        f"it only applies to separate CFG; leave it at {default!r} or set enable_separate_cfg=True/None")

    def short_name(self) -> str:
        """cache-dit style tag, e.g. ``F1B0W4I1M0MC3_R0.24``."""
        return (f"F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}W{self.max_warmup_steps}"
                f"I{self.warmup_interval}M{max(0, self.max_cached_steps)}"
                f"MC{max(0, self.max_continuous_cached_steps)}_R{self.residual_diff_threshold}"
                + ("" if self.steps_computation_mask is None else
                   f"_SCM{''.join(map(str, self.steps_computation_mask))}_{self.steps_computation_policy}")
                + (f"_TaylorSeer_O({self.taylorseer_order})" if self.enable_taylorseer else ""))

    def warmup_steps(self) -> frozenset:
        """The steps forced to compute at the start of a generation.

        As in cache-dit, a steps_computation_mask truncates warmup to its first run of 1s,
        so a mask that caches early is not overridden by warmup.
        """
        warmup = self.max_warmup_steps
        if self.steps_computation_mask is not None:
            leading = next((i for i, m in enumerate(self.steps_computation_mask) if m == 0),
                           len(self.steps_computation_mask))
            warmup = min(warmup, leading)
        return frozenset(range(0, warmup, self.warmup_interval))


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DBCacheConfig)}
CACHE_KEYS = tuple(_FIELD_DEFAULTS)


@dataclass(frozen=True)
class BackendOptions:
    """Everything the backend needs: how to compile, and the cache schedule."""

    cache_config: DBCacheConfig = field(default_factory=DBCacheConfig)
    inner_backend: str = "inductor"
    strict: bool = False

    def __post_init__(self):
        if not isinstance(self.cache_config, DBCacheConfig):
            raise ValueError(
                f"cache_config={self.cache_config!r} is invalid: expected a cachec.DBCacheConfig or a dict of its fields")
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(f"inner_backend={self.inner_backend!r} is invalid: expected one of {INNER_BACKENDS}")
        _bool("strict", self.strict)


BACKEND_KEYS = ("cache_config", "inner_backend", "strict")


def _unknown_key(key: Any, known: tuple) -> ValueError:
    if not isinstance(key, str):
        return ValueError(f"option key {key!r} is invalid: keys are strings, one of {sorted(known)}")
    if key in _PLANNED_KEYS:
        return ValueError(f"option {key!r} is not supported yet by this version of cachec "
                          f"(supported: {sorted(known)})")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown option {key!r}{hint} (allowed: {sorted(known)})")


def _cache_config_from(value: Any) -> DBCacheConfig:
    if isinstance(value, DBCacheConfig):
        return value
    if isinstance(value, Mapping):
        for k in value:
            if k not in CACHE_KEYS:
                raise _unknown_key(k, CACHE_KEYS)
        return DBCacheConfig(**value)
    raise ValueError(
        f"cache_config={value!r} is invalid: expected a cachec.DBCacheConfig or a dict of its fields")


def parse_options(options: Optional[Mapping[str, Any]]) -> BackendOptions:
    """Validate ``torch.compile(..., options=...)`` for the cachec backend.

    Accepts the flat cache-dit keys (``{"Fn_compute_blocks": 1, ...}``) or
    ``{"cache_config": DBCacheConfig(...) or dict}``, not both at once, plus the
    backend keys ``inner_backend`` and ``strict``.
    """
    if options is None:
        return BackendOptions()
    if not isinstance(options, Mapping):
        raise ValueError(f"options={options!r} is invalid: expected a dict")
    known = BACKEND_KEYS + CACHE_KEYS
    backend_kw, flat = {}, {}
    for k, v in options.items():
        if k in BACKEND_KEYS:
            backend_kw[k] = v
        elif k in CACHE_KEYS:
            flat[k] = v
        else:
            raise _unknown_key(k, known)
    if "cache_config" in backend_kw:
        if flat:
            raise ValueError(
                f"options {sorted(flat)} contradict 'cache_config': give the cache settings either "
                f"flat or inside cache_config, not both")
        backend_kw["cache_config"] = _cache_config_from(backend_kw["cache_config"])
    else:
        backend_kw["cache_config"] = DBCacheConfig(**flat)
    return BackendOptions(**backend_kw)
