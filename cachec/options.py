"""Typed, validated options for the cachec backend.

Three layers:

* strategy configs, one frozen dataclass per strategy, with the field names of
  cache-dit's / vllm-omni's ``cache_config`` spelled exactly as they spell them:
  ``DBCacheConfig`` and ``DBPruneConfig`` (which adds cache-dit's prune keys);
  the runtime maps each config type to its handler (``runtime.strategies``);
* calibrator configs (``TaylorSeerCalibratorConfig``, ``FoCaCalibratorConfig``),
  cache-dit's ``calibrator_config``: how a cached residual is extrapolated;
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

__all__ = ["DBCacheConfig", "DBPruneConfig", "TeaCacheConfig", "PABConfig", "DiTangoConfig", "FlexCacheConfig", "TaylorSeerCalibratorConfig",
           "FoCaCalibratorConfig", "BackendOptions", "parse_options", "steps_mask", "INNER_BACKENDS"]

INNER_BACKENDS = ("inductor", "aot_eager", "eager")

from .scm import steps_mask  # noqa: E402  (re-exported: cachec.steps_mask)



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
            f"{name}={v!r} is invalid: a named mask goes in scm_steps_mask_policy={v!r} "
            f"(with num_inference_steps); {name} takes a list of 0/1 per step, e.g. [1, 1, 1, 1, 0, 1, 0, 1]")
    if not isinstance(v, (list, tuple)) or not v or any(not _is_int(m) or m not in (0, 1) for m in v):
        raise ValueError(f"{name}={v!r} is invalid: expected None or a non-empty list of 0 (cache) / 1 (compute) "
                         f"per step")


def _policy(name, v):
    if v not in SCM_POLICIES:
        raise ValueError(f"{name}={v!r} is invalid: expected one of {SCM_POLICIES}")


SCM_POLICIES = ("dynamic", "static")
SCM_MASK_POLICIES = ("slow", "medium", "fast", "ultra")


def _opt_policy(name, v):
    if v is not None and v not in SCM_POLICIES:
        raise ValueError(f"{name}={v!r} is invalid: expected None or one of {SCM_POLICIES}")


def _opt_named_mask(name, v):
    if v is not None and v not in SCM_MASK_POLICIES:
        raise ValueError(f"{name}={v!r} is invalid: expected None or one of {SCM_MASK_POLICIES}")


def _opt_calibrator(name, v):
    if v is not None and not isinstance(v, CALIBRATOR_CONFIGS):
        raise ValueError(f"{name}={v!r} is invalid: expected None, a cachec.TaylorSeerCalibratorConfig or "
                         f"cachec.FoCaCalibratorConfig, or a dict with calibrator_type in {CALIBRATOR_TYPES}")


def _block_ids(name, v):
    if not isinstance(v, (list, tuple)) or any(not _is_int(i) or i < 0 for i in v):
        raise ValueError(f"{name}={v!r} is invalid: expected a list of block indices (ints >= 0)")


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
    scm_steps_mask_policy: Optional[str] = _opt(
        None, _opt_named_mask, "SCM: a named mask ('slow', 'medium', 'fast', 'ultra') scaled to num_inference_steps")
    scm_steps_policy: Optional[str] = _opt(
        None, _opt_policy, "SCM: vllm-omni's name for steps_computation_policy")
    enable_taylorseer: bool = _opt(
        False, _bool, "TaylorSeer: on cached steps, extrapolate the cached residual from its finite differences")
    taylorseer_order: int = _opt(1, _int_at_least(1), "TaylorSeer: derivative orders kept per cached residual")
    calibrator_config: Optional[object] = _opt(
        None, _opt_calibrator, "cache-dit's calibrator: how cached steps extrapolate the residual (TaylorSeer, FoCa)")

    def __post_init__(self):
        cal = self.calibrator_config
        if isinstance(cal, Mapping) or (cal is not None and hasattr(cal, "calibrator_type")
                                         and not isinstance(cal, CALIBRATOR_CONFIGS)):
            object.__setattr__(self, "calibrator_config", calibrator_from(cal))
        for f in dataclasses.fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))
        if self.scm_steps_policy is not None:
            default = _FIELD_DEFAULTS["steps_computation_policy"]
            if self.steps_computation_policy not in (default, self.scm_steps_policy):
                raise ValueError(f"scm_steps_policy={self.scm_steps_policy!r} contradicts steps_computation_policy="
                                 f"{self.steps_computation_policy!r}: they are two names for one setting, give one")
            object.__setattr__(self, "steps_computation_policy", self.scm_steps_policy)
        mask = self.steps_computation_mask
        if mask is not None and self.scm_steps_mask_policy is not None:
            raise ValueError(f"steps_computation_mask and scm_steps_mask_policy={self.scm_steps_mask_policy!r} "
                             f"are both given: pass either an explicit mask or a named one")
        if mask is not None:
            object.__setattr__(self, "steps_computation_mask", tuple(mask))
            if self.num_inference_steps is None:
                object.__setattr__(self, "num_inference_steps", len(mask))
            elif len(mask) != self.num_inference_steps:
                raise ValueError(
                    f"steps_computation_mask has {len(mask)} entries but "
                    f"num_inference_steps={self.num_inference_steps}: give one 0/1 per step")
        elif self.scm_steps_mask_policy is not None:
            if self.num_inference_steps is None:
                raise ValueError(
                    f"scm_steps_mask_policy={self.scm_steps_mask_policy!r} needs num_inference_steps: a named mask "
                    f"is scaled to the step count, so give num_inference_steps (or an explicit "
                    f"steps_computation_mask)")
            mask = self.steps_mask_for(self.num_inference_steps)
        elif self.steps_computation_policy != _FIELD_DEFAULTS["steps_computation_policy"]:
            raise ValueError(
                f"steps_computation_policy={self.steps_computation_policy!r} needs a steps_computation_mask "
                f"or scm_steps_mask_policy: it says what to do on the mask's cache steps")
        if not self.enable_taylorseer and self.taylorseer_order != _FIELD_DEFAULTS["taylorseer_order"]:
            raise ValueError(f"taylorseer_order={self.taylorseer_order!r} needs enable_taylorseer=True")
        if self.enable_taylorseer and self.calibrator_config is not None:
            raise ValueError(f"enable_taylorseer=True and calibrator_config={self.calibrator_config!r} are both "
                             f"given: use one (calibrator_config=cachec.TaylorSeerCalibratorConfig("
                             f"taylorseer_order={self.taylorseer_order}) is the same as the flat keys)")
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

    cache_type = "DBCache"

    def short_name(self) -> str:
        """cache-dit style tag, e.g. ``F1B0W4I1M0MC3_R0.24``."""
        mask = self.steps_mask_for(self.num_inference_steps)
        scm = "" if mask is None else (
            f"_SCM{self.scm_steps_mask_policy or ''.join(map(str, mask))}_{self.steps_computation_policy}")
        cal = self.calibrator()
        return (("" if self.cache_type == "DBCache" else f"{self.cache_type}_")
                + f"F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}W{self.max_warmup_steps}"
                f"I{self.warmup_interval}M{max(0, self.max_cached_steps)}"
                f"MC{max(0, self.max_continuous_cached_steps)}_R{self.residual_diff_threshold}"
                + scm + ("" if cal is None else "_" + cal.short_name()))

    def steps_mask_for(self, num_inference_steps: Optional[int]) -> Optional[tuple]:
        """The SCM mask for a generation of this many steps: the explicit one, or the
        named one scaled to it (``cachec.steps_mask``); None without a mask."""
        if self.steps_computation_mask is not None:
            return self.steps_computation_mask
        if self.scm_steps_mask_policy is None:
            return None
        if num_inference_steps is None:
            raise ValueError(f"scm_steps_mask_policy={self.scm_steps_mask_policy!r} needs num_inference_steps")
        from .scm import steps_mask as scm_mask
        return tuple(scm_mask(total_steps=num_inference_steps, mask_policy=self.scm_steps_mask_policy))

    def calibrator(self) -> Optional["TaylorSeerCalibratorConfig | FoCaCalibratorConfig"]:
        """The calibrator in effect: ``calibrator_config``, or the flat TaylorSeer keys."""
        if self.enable_taylorseer:
            return TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)
        cal = self.calibrator_config
        if cal is None or not (cal.enable_calibrator or cal.enable_encoder_calibrator):
            return None
        return cal

    def warmup_steps(self, num_inference_steps: Optional[int] = None) -> frozenset:
        """The steps forced to compute at the start of a generation.

        As in cache-dit, a steps_computation_mask truncates warmup to its first run of 1s,
        so a mask that caches early is not overridden by warmup.
        """
        warmup = self.max_warmup_steps
        mask = self.steps_mask_for(num_inference_steps or self.num_inference_steps)
        if mask is not None:
            leading = next((i for i, m in enumerate(mask) if m == 0), len(mask))
            warmup = min(warmup, leading)
        return frozenset(range(0, warmup, self.warmup_interval))


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DBCacheConfig)}
CACHE_KEYS = tuple(_FIELD_DEFAULTS)


@dataclass(frozen=True)
class DBPruneConfig(DBCacheConfig):
    """cache-dit's Dynamic Block Prune: each middle block is skipped on its own when the
    relative L1 change of its input, against the last step it ran, is under the threshold.

    The DBCache keys keep their meaning, per block: warmup and SCM masks force whole
    steps to compute; ``max_cached_steps`` and ``max_continuous_cached_steps`` bound how
    often and how long one block is skipped. The threshold compares block inputs, so
    its scale is not DBCache's; the default is cache-dit's.
    """

    residual_diff_threshold: float = _opt(
        0.08, _float_at_least(0.0, " (0 never prunes, >= 1 prunes every block not forced to run)"),
        "prune a block when the relative L1 change of its input is below this")
    non_prune_block_ids: tuple = _opt((), _block_ids, "chain indices of blocks never pruned (besides Fn and Bn)")
    enable_dynamic_prune_threshold: bool = _opt(
        False, _bool, "raise the threshold to the mean of the step's first 5 positive block diffs x relax ratio")
    dynamic_prune_threshold_relax_ratio: float = _opt(
        1.25, _float_at_least(0.0), "the dynamic threshold is this times the mean of the step's first diffs")
    max_dynamic_prune_threshold: Optional[float] = _opt(
        None, _opt_positive_float, "the dynamic threshold is used only below this (None: 2 x the threshold)")

    cache_type = "DBPrune"

    def __post_init__(self):
        object.__setattr__(self, "non_prune_block_ids", tuple(self.non_prune_block_ids)
                           if isinstance(self.non_prune_block_ids, (list, tuple)) else self.non_prune_block_ids)
        super().__post_init__()
        if not self.enable_dynamic_prune_threshold:
            for name in ("dynamic_prune_threshold_relax_ratio", "max_dynamic_prune_threshold"):
                if getattr(self, name) != _PRUNE_DEFAULTS[name]:
                    raise ValueError(f"{name}={getattr(self, name)!r} needs enable_dynamic_prune_threshold=True")

    def max_dynamic_threshold(self) -> float:
        m = self.max_dynamic_prune_threshold
        return 2 * self.residual_diff_threshold if m is None else m


_PRUNE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DBPruneConfig)}
PRUNE_KEYS = tuple(k for k in _PRUNE_DEFAULTS if k not in _FIELD_DEFAULTS)


# ------------------------------------------------------------------------------------- FlexCache

FLEX_STRATEGIES = ("dbcache", "teacache", "pab", "ditango")
# the threshold cache_ratio c sets, 0.08 + c * (0.35 - 0.08): FlexCache's for TeaCache's accumulated
# rescaled change, and cachec's for the one-knob DBCache's F1B0 residual change (with at most
# 1 + round(4c) cached steps in a row)
FLEX_THRESHOLD_RANGE = (0.08, 0.35)
# The rescale polynomials TeaCache's authors published (highest power first, numpy.poly1d order),
# by the class of the model they fitted them on; any other model gets the identity
TEACACHE_COEFFICIENTS = {
    "FluxTransformer2DModel": (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
}


def _ratio(name, v):
    if not _is_number(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}={v!r} is invalid: cache_ratio must be in [0, 1] "
                         f"(0.0 quality first, 1.0 speed first)")


def _flex_strategy(name, v):
    if not isinstance(v, str) or v.lower() not in FLEX_STRATEGIES:
        raise ValueError(f"{name}={v!r} is invalid: expected one of {FLEX_STRATEGIES} (case-insensitive)")


def _opt_coefficients(name, v):
    if v is None:
        return
    if not isinstance(v, (list, tuple)) or not v or any(not _is_number(c) for c in v):
        raise ValueError(f"{name}={v!r} is invalid: expected None (the model's published polynomial, else the "
                         f"identity) or a non-empty list of finite numbers, highest power first (numpy.poly1d)")


def _opt_dir(name, v):
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{name}={v!r} is invalid: expected None or a directory path (str)")


def check_steps(warmup: int, cooldown: int, n: Optional[int]) -> None:
    """FlexCache's rule: the warmup and cooldown steps leave at least one step to cache."""
    if n is not None and warmup + cooldown >= n:
        raise ValueError(f"warmup={warmup} + cooldown={cooldown} must be < num_inference_steps={n}: "
                         f"warmup + cooldown < num_inference_steps (every step would compute)")


@dataclass(frozen=True)
class FlexDBCacheConfig(DBCacheConfig):
    """DBCache as FlexCache's ``strategy="dbcache"`` resolves it: with ``cooldown`` last steps
    that always compute. Build it with ``cachec.FlexCacheConfig(strategy="dbcache", ...)``."""

    cooldown: int = _opt(0, _int_at_least(0), "last steps of a generation that always compute")

    def __post_init__(self):
        super().__post_init__()
        check_steps(self.max_warmup_steps, self.cooldown, self.num_inference_steps)

    def short_name(self) -> str:
        return super().short_name() + (f"_C{self.cooldown}" if self.cooldown else "")


@dataclass(frozen=True)
class TeaCacheConfig(DBCacheConfig):
    """TeaCache (Liu et al., "Timestep Embedding Tells"): skip the whole block chain while the
    accumulated, rescaled relative L1 change of the first block's timestep-modulated input
    (its adaptive norm's output) stays under the threshold; compute, and start the sum
    again, once it reaches it.

    No block runs before the gate (``Fn_compute_blocks`` is 0); the DBCache keys that bound
    caching (``max_cached_steps``, ``max_continuous_cached_steps``, warmup) keep their meaning.
    ``cachec.FlexCacheConfig(strategy="teacache", cache_ratio=c)`` sets the threshold from c.
    """

    Fn_compute_blocks: int = _opt(0, _int_at_least(0), "TeaCache gates before the first block: 0")
    residual_diff_threshold: float = _opt(
        0.08 + 0.25 * (0.35 - 0.08), _float_at_least(0.0, " (0 never caches, >= 1 caches every step after warmup)"),
        "cache while the accumulated rescaled change of the modulated input stays below this")
    max_warmup_steps: int = _opt(1, _int_at_least(0), "steps at the start of a generation that always compute")
    max_continuous_cached_steps: int = _opt(-1, _int_at_least(-1, " (-1 = unlimited)"), "cached steps allowed in a row")
    cooldown: int = _opt(1, _int_at_least(0), "last steps of a generation that always compute")
    teacache_coefficients: Optional[tuple] = _opt(
        None, _opt_coefficients, "rescale polynomial of the relative L1 change, highest power first; None: the "
        "model's published one (FLUX), else the identity")

    cache_type = "TeaCache"

    def __post_init__(self):
        if isinstance(self.teacache_coefficients, list):
            object.__setattr__(self, "teacache_coefficients", tuple(self.teacache_coefficients))
        super().__post_init__()
        if self.Fn_compute_blocks != 0:
            raise ValueError(f"Fn_compute_blocks={self.Fn_compute_blocks} is invalid for TeaCache: it gates "
                             f"before the first block and skips the whole chain; use 0 (or DBCache for Fn >= 1)")
        check_steps(self.max_warmup_steps, self.cooldown, self.num_inference_steps)
        if self.max_accumulated_residual_diff_threshold is not None:
            raise ValueError(f"max_accumulated_residual_diff_threshold={self.max_accumulated_residual_diff_threshold!r}"
                             f" does not apply to TeaCache: its accumulated change is the signal itself, and "
                             f"residual_diff_threshold bounds it")

    def short_name(self) -> str:
        return (f"TeaCache_B{self.Bn_compute_blocks}W{self.max_warmup_steps}C{self.cooldown}"
                f"_R{self.residual_diff_threshold:.4g}")

    def rescale(self, model: str = "") -> tuple:
        """The polynomial in effect for a model of class ``model`` (highest power first)."""
        if self.teacache_coefficients is not None:
            return self.teacache_coefficients
        return TEACACHE_COEFFICIENTS.get(model, (1.0, 0.0))


@dataclass(frozen=True)
class PABConfig(DBCacheConfig):
    """Pyramid Attention Broadcast (Zhao et al.): attention outputs are computed once every
    ``self_attention_range`` steps (spatial, full and joint attention), ``temporal_attention_range``
    steps (attention across frames, where a video model's graph has it) or ``cross_attention_range``
    steps (cross attention, whose output changes least) and broadcast to the steps in between;
    everything else in the blocks runs on every step. A range of 0 or 1 computes every step.

    The attention regions are found by data flow (``passes.attention``); warmup and cooldown
    steps compute everything. ``cachec.FlexCacheConfig(strategy="pab", cache_ratio=c)`` sets
    the ranges to ``round(10c)``, ``round(round(10c) * 4 / 3)`` (temporal) and ``round(round(10c) * 5 / 3)``
    (cross).
    """

    Fn_compute_blocks: int = _opt(0, _int_at_least(0), "PAB gates attention outputs, not blocks: 0")
    max_warmup_steps: int = _opt(1, _int_at_least(0), "steps at the start of a generation that always compute")
    max_continuous_cached_steps: int = _opt(-1, _int_at_least(-1, " (-1 = unlimited)"), "unused by PAB: -1")
    self_attention_range: int = _opt(2, _int_at_least(0), "self-attention outputs are computed once every this many steps")
    cross_attention_range: int = _opt(3, _int_at_least(0), "cross-attention outputs are computed once every this many steps")
    temporal_attention_range: int = _opt(
        3, _int_at_least(0), "temporal-attention outputs (video models attending across frames) are computed once "
        "every this many steps")
    cooldown: int = _opt(1, _int_at_least(0), "last steps of a generation that always compute")

    cache_type = "PAB"

    def __post_init__(self):
        super().__post_init__()
        for name in ("Fn_compute_blocks", "residual_diff_threshold", "max_continuous_cached_steps",
                     "max_accumulated_residual_diff_threshold", "steps_computation_mask", "scm_steps_mask_policy"):
            default = _PAB_DEFAULTS.get(name, _FIELD_DEFAULTS.get(name))
            if getattr(self, name) != default:
                raise ValueError(f"{name}={getattr(self, name)!r} does not apply to PAB: it broadcasts attention "
                                 f"outputs on a fixed schedule (self_attention_range, cross_attention_range); "
                                 f"leave it at {default!r}")
        if self.enable_taylorseer or self.calibrator_config is not None:
            raise ValueError("PAB reuses attention outputs as they were: it takes no calibrator "
                             "(enable_taylorseer, calibrator_config)")
        check_steps(self.max_warmup_steps, self.cooldown, self.num_inference_steps)

    def short_name(self) -> str:
        return (f"PAB_S{self.self_attention_range}T{self.temporal_attention_range}X{self.cross_attention_range}"
                f"W{self.max_warmup_steps}C{self.cooldown}")


_PAB_DEFAULTS = {"Fn_compute_blocks": 0, "max_continuous_cached_steps": -1}


@dataclass(frozen=True)
class DiTangoConfig(PABConfig):
    """DiTango on one device: attention work per (layer, head group) is reused while its error
    estimate stays under the ``cache_ratio``-quantile of the estimates seen so far in the
    generation; an anchor step recomputes everything once the mean estimate passes
    ``0.6 * cache_ratio``. The CFG branches of a step share one decision.

    The estimate of a group is the relative L1 change of its queries since the step it last
    computed, measured on the device during a call and read with the next call's one host
    read, extrapolated one step along its own rate. The decision map (step x layer-group) is
    written to ``<output_dir>/ditango_policy_step_layer_group.ppm`` and ``.png`` at each
    generation's last step, where ``output_dir`` is set.
    """

    cache_ratio: float = _opt(0.25, _ratio, "0.0 quality first ... 1.0 speed first: the quantile and the anchor")
    head_groups: int = _opt(2, _int_at_least(1), "groups of heads per attention call (at most the heads)")
    output_dir: Optional[str] = _opt(None, _opt_dir, "where the decision map is written (None: not written)")
    self_attention_range: int = _opt(0, _int_at_least(0), "unused by DiTango: 0")
    cross_attention_range: int = _opt(0, _int_at_least(0), "unused by DiTango: 0")
    temporal_attention_range: int = _opt(0, _int_at_least(0), "unused by DiTango: 0")

    cache_type = "DiTango"

    def __post_init__(self):
        super().__post_init__()
        for name in ("self_attention_range", "cross_attention_range", "temporal_attention_range"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name}={getattr(self, name)!r} does not apply to DiTango: it decides per head "
                                 f"group from error estimates; leave it at 0")

    def short_name(self) -> str:
        return f"DiTango_c{self.cache_ratio:g}G{self.head_groups}W{self.max_warmup_steps}C{self.cooldown}"


@dataclass(frozen=True)
class FlexCacheConfig:
    """Smart-Diffusion's FlexCache API: one knob for every strategy.

    ``cache_ratio`` runs from 0.0 (quality first) to 1.0 (speed first); the first
    ``warmup`` and the last ``cooldown`` steps of a generation always compute.
    ``strategy`` (case-insensitive) picks what is reused:

    * ``"teacache"``: the whole block chain, while the accumulated rescaled change of the
      first block's modulated input stays under ``0.08 + c * (0.35 - 0.08)``;
    * ``"dbcache"``: the blocks after the first (F1B0), while the first block's residual
      changes less than ``0.08 + c * (0.35 - 0.08)``, at most ``1 + round(4c)`` steps in a row;
    * ``"pab"``: attention outputs, self-attention computed once every ``round(10c)`` steps and
      cross-attention once every ``round(round(10c) * 5 / 3)`` (``PABConfig``);
    * ``"ditango"``: attention work per (layer, head group), reused under the c-quantile of its
      error estimates, with anchors past ``0.6c`` (``DiTangoConfig``; ``output_dir`` for its map).

    ``resolve()`` gives the strategy config the runtime runs (``TeaCacheConfig``, ...).
    """

    strategy: str = _opt("teacache", _flex_strategy, f"one of {FLEX_STRATEGIES}, case-insensitive")
    cache_ratio: float = _opt(0.25, _ratio, "0.0 quality first ... 1.0 speed first")
    warmup: int = _opt(1, _int_at_least(0), "first steps of a generation that always compute")
    cooldown: int = _opt(1, _int_at_least(0), "last steps of a generation that always compute")
    num_inference_steps: Optional[int] = _opt(None, _opt_int_at_least(1), "steps per generation, if known")
    teacache_coefficients: Optional[tuple] = _opt(
        None, _opt_coefficients, "TeaCache: rescale polynomial (None: the model's published one, else identity)")
    output_dir: Optional[str] = _opt(None, _opt_dir, "DiTango: where its decision map is written")

    def __post_init__(self):
        _calibrator_check(self)
        object.__setattr__(self, "strategy", self.strategy.lower())
        if isinstance(self.teacache_coefficients, list):
            object.__setattr__(self, "teacache_coefficients", tuple(self.teacache_coefficients))
        check_steps(self.warmup, self.cooldown, self.num_inference_steps)
        if self.teacache_coefficients is not None and self.strategy != "teacache":
            raise ValueError(f"teacache_coefficients={self.teacache_coefficients!r} needs strategy='teacache' "
                             f"(it is {self.strategy!r})")
        if self.output_dir is not None and self.strategy != "ditango":
            raise ValueError(f"output_dir={self.output_dir!r} needs strategy='ditango' (it is {self.strategy!r})")

    def resolve(self) -> DBCacheConfig:
        """The strategy config this knob setting stands for."""
        c = self.cache_ratio
        lo, hi = FLEX_THRESHOLD_RANGE
        threshold = round(lo + c * (hi - lo), 6)
        if self.strategy == "teacache":
            return TeaCacheConfig(residual_diff_threshold=threshold, max_warmup_steps=self.warmup,
                                  cooldown=self.cooldown, num_inference_steps=self.num_inference_steps,
                                  teacache_coefficients=self.teacache_coefficients)
        if self.strategy == "pab":   # FlexCache divides by these; a range under 2 here just computes every step
            self_range = round(10 * c)
            return PABConfig(self_attention_range=self_range, cross_attention_range=round(self_range * 5 / 3),
                             temporal_attention_range=round(self_range * 4 / 3),
                             max_warmup_steps=self.warmup, cooldown=self.cooldown,
                             num_inference_steps=self.num_inference_steps)
        if self.strategy == "ditango":
            return DiTangoConfig(cache_ratio=c, max_warmup_steps=self.warmup, cooldown=self.cooldown,
                                 num_inference_steps=self.num_inference_steps, output_dir=self.output_dir)
        return FlexDBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                 max_warmup_steps=self.warmup, max_continuous_cached_steps=1 + round(4 * c),
                                 cooldown=self.cooldown, num_inference_steps=self.num_inference_steps)


FLEX_KEYS = tuple(f.name for f in dataclasses.fields(FlexCacheConfig))
FLEX_ONLY_KEYS = tuple(k for k in FLEX_KEYS if k != "num_inference_steps")
# ``{"flexcache": "teacache"}``: FlexCache's legacy spelling, a strategy name with the defaults above
LEGACY_FLEX_KEY = "flexcache"
CACHE_TYPES = {c.cache_type.lower(): c for c in (DBCacheConfig, DBPruneConfig, TeaCacheConfig, PABConfig, DiTangoConfig)}
# the keys of the strategy configs beyond DBCache's and DBPrune's (with cache_type="TeaCache", "PAB", "DiTango")
STRATEGY_KEYS = ("cooldown", "teacache_coefficients", "self_attention_range", "cross_attention_range",
            "temporal_attention_range", "head_groups", "output_dir")


def _calibrator_check(self) -> None:
    for f in dataclasses.fields(self):
        f.metadata["check"](f.name, getattr(self, f.name))


@dataclass(frozen=True)
class TaylorSeerCalibratorConfig:
    """cache-dit's TaylorSeer calibrator: a cached step extrapolates each residual from
    the finite differences of its values at computed steps (docs/design.md)."""

    taylorseer_order: int = _opt(1, _int_at_least(1), "derivative orders kept per cached residual")
    enable_calibrator: bool = _opt(True, _bool, "extrapolate the hidden-state residual")
    enable_encoder_calibrator: bool = _opt(True, _bool, "extrapolate the other residuals (encoder states)")

    calibrator_type = "taylorseer"
    __post_init__ = _calibrator_check

    def short_name(self) -> str:
        return f"TaylorSeer_O({self.taylorseer_order})"


@dataclass(frozen=True)
class FoCaCalibratorConfig:
    """cache-dit's FoCa calibrator (Forecast then Calibrate): a BDF2-style predictor with a
    Heun corrector anchored at the last computed step; no hyper-parameters (docs/design.md)."""

    enable_calibrator: bool = _opt(True, _bool, "extrapolate the hidden-state residual")
    enable_encoder_calibrator: bool = _opt(True, _bool, "extrapolate the other residuals (encoder states)")

    calibrator_type = "foca"
    __post_init__ = _calibrator_check

    def short_name(self) -> str:
        return "FoCa"


CALIBRATOR_CONFIGS = (TaylorSeerCalibratorConfig, FoCaCalibratorConfig)
CALIBRATOR_TYPES = ("taylorseer", "foca")


def calibrator_from(value: Any):
    """A calibrator config from a dict or a cache-dit config object (``calibrator_type`` says which)."""
    if isinstance(value, CALIBRATOR_CONFIGS):
        return value
    kind = value.get("calibrator_type") if isinstance(value, Mapping) else getattr(value, "calibrator_type", None)
    if not isinstance(kind, str) or kind.lower() not in CALIBRATOR_TYPES:
        raise ValueError(f"calibrator_config={value!r} is invalid: calibrator_type={kind!r}, "
                         f"expected one of {CALIBRATOR_TYPES}")
    cls = CALIBRATOR_CONFIGS[CALIBRATOR_TYPES.index(kind.lower())]
    allowed = tuple(f.name for f in dataclasses.fields(cls))
    if isinstance(value, Mapping):
        fields = {k: v for k, v in value.items() if k != "calibrator_type"}
    else:   # cache-dit's CalibratorConfig and its subclasses: the same field names
        fields = {k: getattr(value, k) for k in allowed if hasattr(value, k)}
    for k in fields:
        if k not in allowed:
            raise _unknown_key(k, allowed, f" of calibrator_config ({kind})")
    return cls(**fields)


ULYSSES_COMMS = ("bf16", "fp8")
ULYSSES_KEYS = ("ulysses_size", "ulysses_comm", "ulysses_group")


@dataclass(frozen=True)
class UlyssesConfig:
    """Ulysses context parallelism: each of ``ulysses_size`` ranks holds a slice of the
    tokens, and attention exchanges them for a slice of the heads (``passes.ulysses``).

    ``ulysses_comm``: "bf16" sends activations as they are (the input dtype; the
    default), "fp8" sends queries, values and the attention output as float8_e4m3fn
    with one scale per token and head (keys stay as they are). ``ulysses_group``: a
    ``torch.distributed`` process group of ``ulysses_size`` ranks; by default the
    default group, which must then have exactly ``ulysses_size`` ranks.
    """

    ulysses_size: int
    ulysses_comm: Optional[str] = None
    ulysses_group: Any = None

    def __post_init__(self):
        _int_at_least(1)("ulysses_size", self.ulysses_size)
        if self.ulysses_comm is not None and self.ulysses_comm not in ULYSSES_COMMS:
            raise ValueError(f"ulysses_comm={self.ulysses_comm!r} is invalid: expected one of {ULYSSES_COMMS} "
                             f"(None: 'bf16', the input dtype)")

    @property
    def comm(self) -> str:
        return self.ulysses_comm or "bf16"

    def resolve(self):
        """(process group, its size, this process's rank in it); a ValueError where
        torch.distributed is not set up to match."""
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(f"ulysses_size={self.ulysses_size} needs torch.distributed: call "
                             f"torch.distributed.init_process_group() first (torchrun sets up the environment "
                             f"for it), or leave ulysses_size out")
        group = self.ulysses_group
        if group is None:
            world = dist.get_world_size()
            if world != self.ulysses_size:
                raise ValueError(f"ulysses_size={self.ulysses_size} but the default process group has {world} "
                                 f"ranks: give ulysses_size={world}, or a group of {self.ulysses_size} ranks as "
                                 f"ulysses_group (torch.distributed.new_subgroups({self.ulysses_size}))")
            group = dist.group.WORLD
        elif not isinstance(group, dist.ProcessGroup):
            raise ValueError(f"ulysses_group={group!r} is invalid: expected a torch.distributed ProcessGroup")
        elif group.size() != self.ulysses_size:
            raise ValueError(f"ulysses_size={self.ulysses_size} but ulysses_group has {group.size()} ranks")
        return group, group.size(), dist.get_rank(group)


def _ulysses_config(value: Any, flat: Mapping) -> Optional[UlyssesConfig]:
    if value is not None and flat:
        raise ValueError(f"options {sorted(flat)} contradict 'ulysses_config': give them either flat or inside "
                         f"cachec.UlyssesConfig, not both")
    if value is None:
        if not flat:
            return None
        if "ulysses_size" not in flat:
            raise ValueError(f"options {sorted(flat)} need ulysses_size (the number of ranks sharing the sequence)")
        return UlyssesConfig(**flat)
    if isinstance(value, UlyssesConfig):
        return value
    if isinstance(value, Mapping):
        for k in value:
            if k not in ULYSSES_KEYS:
                raise _unknown_key(k, ULYSSES_KEYS, " of ulysses_config")
        return _ulysses_config(None, value)
    raise ValueError(f"ulysses_config={value!r} is invalid: expected a cachec.UlyssesConfig or a dict of "
                     f"{ULYSSES_KEYS}")


@dataclass(frozen=True)
class BackendOptions:
    """Everything the backend needs: how to compile, and the cache schedule."""

    # the strategy config; a cachec.FlexCacheConfig resolves to one (``flex`` keeps it); None:
    # caching is off ({"flexcache": None}), the model compiles plainly with the inner backend
    cache_config: Optional[DBCacheConfig] = field(default_factory=DBCacheConfig)
    inner_backend: str = "inductor"
    strict: bool = False
    # inductor config patches (torch._inductor.config names) applied to every compiled segment
    inductor: Mapping[str, Any] = field(default_factory=dict)
    # dynamo's recompile_limit / accumulated_recompile_limit, set when the model first compiles
    recompile_limits: Mapping[str, int] = field(default_factory=dict)
    # inductor: blocks of equal structure in one compiled piece compile once (passes.share)
    share_blocks: bool = True
    flex: Optional[FlexCacheConfig] = None
    # Ulysses context parallelism across ranks (passes.ulysses); None: one process
    ulysses: Optional[UlyssesConfig] = None

    def __post_init__(self):
        if isinstance(self.cache_config, FlexCacheConfig):
            object.__setattr__(self, "flex", self.cache_config)
            object.__setattr__(self, "cache_config", self.cache_config.resolve())
        if self.cache_config is not None and not isinstance(self.cache_config, DBCacheConfig):
            raise ValueError(f"cache_config={self.cache_config!r} is invalid: expected a cachec.DBCacheConfig, "
                             f"a cachec.DBPruneConfig, a cachec.TeaCacheConfig, a cachec.FlexCacheConfig "
                             f"or a dict of their fields")
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(f"inner_backend={self.inner_backend!r} is invalid: expected one of {INNER_BACKENDS}")
        _bool("strict", self.strict)
        _bool("share_blocks", self.share_blocks)
        _check_inductor(self.inductor, self.inner_backend)
        from .compile_configs import check_limits
        check_limits(dict(self.recompile_limits))


BACKEND_KEYS = ("cache_config", "inner_backend", "strict", "inductor", "share_blocks")
LIMIT_KEYS = ("recompile_limit", "accumulated_recompile_limit")


def _check_inductor(patches: Any, inner_backend: str) -> None:
    """``inductor``: a dict of ``torch._inductor.config`` names, each value of its option's type."""
    if not isinstance(patches, Mapping):
        raise ValueError(f"inductor={patches!r} is invalid: expected a dict of torch._inductor.config options, "
                         f"e.g. {{'max_autotune': True}}")
    if not patches:
        return
    if inner_backend != "inductor":
        raise ValueError(f"inductor={dict(patches)!r} needs inner_backend='inductor' (it is {inner_backend!r}): "
                         f"the options patch inductor's config for each compiled segment")
    import torch._inductor
    import torch._inductor.config as config
    known = tuple(torch._inductor.list_options())
    for name, value in patches.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"inductor option {name!r} is unknown to torch._inductor.config{hint} "
                             f"(all of them: torch._inductor.list_options())")
        current = getattr(config, name)
        expected = type(current)
        if isinstance(current, bool):
            ok = isinstance(value, bool)
        elif isinstance(current, int):
            ok = _is_int(value)
        elif isinstance(current, float):
            ok = _is_number(value)
        elif isinstance(current, str):
            ok = isinstance(value, str)
        else:   # None, callables, containers: inductor checks these itself
            ok = True
        if not ok:
            raise ValueError(f"inductor option {name}={value!r} is invalid: expected a {expected.__name__}, "
                             f"like its current value {current!r}")


def _unknown_key(key: Any, known: tuple, where: str = "") -> ValueError:
    if not isinstance(key, str):
        return ValueError(f"option key {key!r}{where} is invalid: keys are strings, one of {sorted(known)}")
    if key in PRUNE_KEYS:
        return ValueError(f"option {key!r} is a DBPrune option: add cache_type='DBPrune' (or pass "
                          f"cache_config=cachec.DBPruneConfig(...)) to prune blocks")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown option {key!r}{where}{hint} (allowed: {sorted(known)})")


def _strategy_config(fields: Mapping) -> DBCacheConfig:
    """The strategy config for flat keys, ``cache_type`` choosing which (default DBCache)."""
    fields = dict(fields)
    kind = fields.pop("cache_type", "DBCache")
    cls = CACHE_TYPES.get(kind.lower()) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"cache_type={kind!r} is invalid: expected one of {[c.cache_type for c in CACHE_TYPES.values()]}")
    keys = tuple(f.name for f in dataclasses.fields(cls))
    for k in fields:
        if k not in keys:
            raise _unknown_key(k, keys + ("cache_type",))
    return cls(**fields)


def _cache_config_from(value: Any) -> "DBCacheConfig | FlexCacheConfig":
    if isinstance(value, (DBCacheConfig, FlexCacheConfig)):
        return value
    if isinstance(value, Mapping):
        return _strategy_config(value)
    raise ValueError(f"cache_config={value!r} is invalid: expected a cachec.DBCacheConfig, a "
                     f"cachec.DBPruneConfig, a cachec.TeaCacheConfig, a cachec.FlexCacheConfig or a dict of "
                     f"their fields")


def parse_options(options: Optional[Mapping[str, Any]]) -> BackendOptions:
    """Validate ``torch.compile(..., options=...)`` for the cachec backend.

    Accepts the flat cache-dit keys (``{"Fn_compute_blocks": 1, ...}``) or
    ``{"cache_config": DBCacheConfig(...) or dict}``, not both at once, plus the
    backend keys ``inner_backend``, ``strict``, ``inductor`` (inductor config
    patches for every compiled segment, as ``torch.compile(options=...)`` takes them
    for plain inductor) and ``share_blocks`` (blocks of equal structure compile once).
    """
    if options is None:
        return BackendOptions()
    if not isinstance(options, Mapping):
        raise ValueError(f"options={options!r} is invalid: expected a dict")
    known = BACKEND_KEYS + LIMIT_KEYS + CACHE_KEYS + ("cache_type", LEGACY_FLEX_KEY) + FLEX_ONLY_KEYS \
        + ULYSSES_KEYS + ("ulysses_config",)
    backend_kw, flat, flex, limits, ulysses = {}, {}, {}, {}, {}
    for k, v in options.items():
        if k in BACKEND_KEYS:
            backend_kw[k] = v
        elif k in ULYSSES_KEYS:
            ulysses[k] = v
        elif k == "ulysses_config":
            continue
        elif k in LIMIT_KEYS:
            limits[k] = v
        elif k in FLEX_ONLY_KEYS or k == LEGACY_FLEX_KEY:
            flex[k] = v
        elif k in known or k in PRUNE_KEYS or k in STRATEGY_KEYS:
            flat[k] = v
        else:
            raise _unknown_key(k, known)
    if "cache_type" in flat:   # a strategy config spelled flat: TeaCache's own keys belong to it
        flat.update({k: flex.pop(k) for k in STRATEGY_KEYS if k in flex})
    if flex:
        given = [k for k in ("cache_config",) if k in backend_kw] + sorted(k for k in flat if k != "num_inference_steps")
        if given:
            raise ValueError(f"options {given} contradict the FlexCache options {sorted(flex)}: FlexCache's "
                             f"one knob (strategy, cache_ratio, warmup, cooldown) sets the schedule itself; give "
                             f"either those or the DBCache keys")
        backend_kw["cache_config"] = _flex_config(flex, flat.get("num_inference_steps"))
    elif "cache_config" in backend_kw:
        if flat:
            raise ValueError(
                f"options {sorted(flat)} contradict 'cache_config': give the cache settings either "
                f"flat or inside cache_config, not both")
        backend_kw["cache_config"] = _cache_config_from(backend_kw["cache_config"])
    else:
        backend_kw["cache_config"] = _strategy_config(flat)
    return BackendOptions(**backend_kw, recompile_limits=limits,
                          ulysses=_ulysses_config(options.get("ulysses_config"), ulysses))


def _flex_config(flex: Mapping, num_inference_steps: Optional[int]) -> Optional[FlexCacheConfig]:
    """The FlexCache options as a config; None where ``{"flexcache": None}`` turns caching off."""
    flex = dict(flex)
    if LEGACY_FLEX_KEY in flex:
        legacy = flex.pop(LEGACY_FLEX_KEY)
        if legacy is None:
            if flex:
                raise ValueError(f"flexcache=None turns caching off, but {sorted(flex)} are given too")
            return None
        if isinstance(legacy, FlexCacheConfig):
            if flex or num_inference_steps is not None:
                raise ValueError(f"flexcache={legacy!r} is a whole config: give {sorted(flex) or ['num_inference_steps']} "
                                 f"inside it")
            return legacy
        if "strategy" in flex:
            raise ValueError(f"flexcache={legacy!r} and strategy={flex['strategy']!r} are both given: they are "
                             f"two names for one setting, give one")
        if not isinstance(legacy, str):
            raise ValueError(f"flexcache={legacy!r} is invalid: expected a strategy name in {FLEX_STRATEGIES}, "
                             f"None (caching off) or a cachec.FlexCacheConfig")
        flex["strategy"] = legacy
    if num_inference_steps is not None:
        flex["num_inference_steps"] = num_inference_steps
    return FlexCacheConfig(**flex)
