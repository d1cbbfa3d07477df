"""SCM, the steps computation mask: one 1 (compute) or 0 (may reuse cached work) per denoising step.

cache-dit and vllm-omni ship four named masks. They are defined at 28 steps as
alternating runs ("bins") of computed and cached steps, starting and ending with
a compute run, so there is one more compute bin than cache bins:

    policy   compute bins         cache bins       computed at 28
    slow     8, 3, 3, 2, 1, 1     1, 2, 2, 2, 3    18
    medium   6, 2, 2, 2, 2, 1     1, 3, 3, 3, 3    15
    fast     6, 1, 1, 1, 1, 1     1, 3, 4, 5, 4    11
    ultra    4, 1, 1, 1, 1        2, 5, 6, 7        8

``steps_mask(total_steps=N, mask_policy=p)`` gives the named mask at N steps.
At 28 steps it is exactly the bins above. At other counts cachec scales the
policy (its own rule, not cache-dit's), so that for every N >= 1:

* the first and the last step compute;
* no run of cached steps is longer than B = max(1, ceil(longest cache bin * N / 28));
* M, the number of computed steps, is frac * N rounded half up, frac being the
  policy's computed share at 28 steps (18/28, 15/28, 11/28, 8/28). Only below
  13 steps may M be higher: it is raised to the least count that leaves room
  for the rules above (M >= min(N, 2), and the N - M cached steps fit in the
  M - 1 gaps between computed steps in runs <= B), so no mask obeying them
  computes fewer steps. M is thus within one step of frac * N except for
  fast at N = 2, 4, 5 and ultra at N = 2, 3, 4, 5, 6, 8, 10 (e.g. ultra at
  10 steps: 2.9 -> 4 computed, 1001001001). At every N, slow computes at
  least as many steps as medium, medium as fast, and fast as ultra.
* the shape stays the policy's: a long first compute run (the first bin
  scaled, shortened only when B needs more cache runs), then the later
  compute and cache runs scaled, the cache runs growing toward the end.

How: the M computed and N - M cached steps are split over the bins in
proportion to their 28-step lengths with largest-remainder rounding, every run
at least 1 and every cache run at most B. When there are too few steps for
every bin, the smallest cache bins are dropped and the compute bins on either
side of each merge.

cache-dit scales differently: it trims bins off the tail for 16-27 steps,
grows every bin by a step-dependent amount above 28, and has hand-written
tables below 16 (only 4 or 6 steps below 8). At 16 steps its "fast" mask
caches 10 steps in a row; cachec's caches at most B = 3:

    cache-dit  fast@16  1111100000000001   (6 computed)
    cachec     fast@16  1100100100010001   (6 computed)
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Optional, Sequence

__all__ = ["SCM_POLICIES", "SCM_BINS", "SCM_REFERENCE_STEPS", "steps_mask", "named_mask"]

SCM_POLICIES = ("slow", "medium", "fast", "ultra")
SCM_REFERENCE_STEPS = 28
# policy -> (compute bins, cache bins) at SCM_REFERENCE_STEPS steps, as cache-dit 1.5.3 defines them.
SCM_BINS = MappingProxyType({
    "slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)),
    "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
    "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)),
    "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7)),
})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_total_steps(total_steps) -> None:
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} is invalid: expected an int >= 1")


def _runs_to_mask(compute_bins: Sequence[int], cache_bins: Sequence[int]) -> list:
    mask = [1] * compute_bins[0]
    for cache, compute in zip(cache_bins, compute_bins[1:]):
        mask += [0] * cache + [1] * compute
    return mask


def _apportion(total: int, weights: Sequence[int], lo: int, hi: Optional[int], prefer_late: bool) -> list:
    """Split ``total`` into ``len(weights)`` ints in [lo, hi], in proportion to ``weights``.

    Hand out steps one at a time to the part furthest below its exact share
    total * w / sum(w) that is still under ``hi``; with lo = 0 and no hi this is
    largest-remainder rounding. The caller guarantees len * lo <= total <= len * hi.
    Ties go to the later part if ``prefer_late`` (cache runs grow toward the end),
    else to the earlier one (compute runs are longest at the start).
    """
    n, wsum = len(weights), sum(weights)
    cap = total if hi is None else hi
    # Start from the floors of the shares when they fit: the greedy loop would reach them first anyway.
    parts = [max(lo, min(cap, total * w // wsum)) for w in weights]
    if sum(parts) > total:
        parts = [lo] * n
    for _ in range(total - sum(parts)):
        # deficit * wsum, compared in integers so the result is exact
        i = max((i for i in range(n) if parts[i] < cap),
                key=lambda i: (total * weights[i] - parts[i] * wsum, i if prefer_late else -i))
        parts[i] += 1
    return parts


def named_mask(policy: str, total_steps: int) -> tuple:
    """The named mask ``policy`` scaled to ``total_steps`` steps (see the module docstring)."""
    if policy not in SCM_POLICIES:
        raise ValueError(f"mask_policy={policy!r} is invalid: expected one of {SCM_POLICIES} (lowercase)")
    _check_total_steps(total_steps)
    compute28, cache28 = SCM_BINS[policy]
    n, ref = total_steps, SCM_REFERENCE_STEPS
    bound = max(1, -(-max(cache28) * n // ref))  # ceil, in integers
    # Computed steps: the 28-step share rounded half up, then raised until the cached
    # steps fit in runs <= bound (at most one run per cache bin, and one between
    # every two computed steps). Only small n ever needs the raise.
    m = max(min(n, 2), (2 * sum(compute28) * n + ref) // (2 * ref))
    while min(len(cache28), m - 1) * bound < n - m:
        m += 1
    z = n - m
    if z == 0:
        return (1,) * n
    # The first compute run is the first bin scaled, but short enough to leave a computed
    # step for each of the ceil(z / bound) or more compute runs between and after the cache runs.
    first = min(max(1, (2 * compute28[0] * n + ref) // (2 * ref)), m + (-z // bound))
    runs = min(len(cache28), z, m - first)
    # Keep the `runs` largest cache bins (ties: the later one), in order; dropping a cache
    # bin merges the compute bins on either side of it.
    keep = sorted(sorted(range(len(cache28)), key=lambda j: (cache28[j], j))[-runs:])
    cache_w = [cache28[j] for j in keep]
    edges = [0] + [j + 1 for j in keep] + [len(compute28)]
    compute_w = [sum(compute28[a:b]) for a, b in zip(edges, edges[1:])]
    cache = _apportion(z, cache_w, 1, bound, prefer_late=True)
    compute = _apportion(m, compute_w, 1, None, prefer_late=False)
    return tuple(_runs_to_mask(compute, cache))


def steps_mask(compute_bins: Optional[Sequence[int]] = None, cache_bins: Optional[Sequence[int]] = None,
               total_steps: Optional[int] = None, mask_policy: Optional[str] = "medium") -> list:
    """A steps computation mask: 1 = compute the step, 0 = the step may reuse cached work.

    Same keywords and positional order as ``cache_dit.steps_mask``:

    * explicit bins: ``steps_mask([6, 1, 1], [1, 3])`` is six 1s, one 0, one 1, three 0s,
      one 1 (12 steps): alternating runs, computing first, one more compute bin than
      cache bins, so the last step computes. ``mask_policy`` is then ignored.
      With ``total_steps`` too, the bins must add up to it exactly. cache-dit instead
      asserts the sum is at least ``total_steps`` and cuts the mask there, which can
      leave the last step cached or drop bins without a word; a mismatch is more
      likely a mistake than a wish to truncate, so cachec raises a ValueError.
      Giving only one of the two bin lists is an error too (cache-dit silently falls
      back to the named mask).
    * no bins: the named mask ``mask_policy`` ('slow', 'medium', 'fast' or 'ultra',
      lowercase, as cache-dit spells them) scaled to ``total_steps``, which is then
      required. See the module docstring for the scaling rule.
    """
    if compute_bins is None and cache_bins is None:
        if total_steps is None:
            raise ValueError(f"mask_policy={mask_policy!r}: a named mask needs the step count; pass total_steps "
                             f"(or set num_inference_steps in the options), or explicit compute_bins and cache_bins")
        return list(named_mask(mask_policy, total_steps))
    for name, bins in (("compute_bins", compute_bins), ("cache_bins", cache_bins)):
        if not isinstance(bins, (list, tuple)) or any(not _is_int(b) or b < 1 for b in bins):
            raise ValueError(f"{name}={bins!r} is invalid: expected a list of ints >= 1 (run lengths)")
    if len(compute_bins) != len(cache_bins) + 1:
        raise ValueError(f"compute_bins={list(compute_bins)} and cache_bins={list(cache_bins)} are invalid together: "
                         f"runs alternate compute, cache, ..., compute, so there is one more compute bin")
    if total_steps is not None:
        _check_total_steps(total_steps)
        if sum(compute_bins) + sum(cache_bins) != total_steps:
            raise ValueError(f"compute_bins={list(compute_bins)} and cache_bins={list(cache_bins)} add up to "
                             f"{sum(compute_bins) + sum(cache_bins)} steps, but total_steps={total_steps}")
    return _runs_to_mask(compute_bins, cache_bins)
