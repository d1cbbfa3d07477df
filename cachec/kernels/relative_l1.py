"""Relative L1 change between two activations: sum|prev - cur| / sum|prev|.

This is the cache-hit test of first-block / TeaCache-style caching, run once
per denoising step on a [tokens, hidden] activation, so it has to be one read
of both tensors and must give the same answer on every run.

Semantics (kernel and reference agree):
  * the ratio of sums equals mean|prev - cur| / mean|prev|;
  * all arithmetic is fp32 (inputs are upcast exactly before subtracting);
  * sum|prev| == 0: returns +inf, except 0 when sum|prev - cur| is 0 too
    (two all-zero tensors have not changed, so a cache may reuse them; a
    change away from all-zeros is infinitely large relative to it);
  * NaN anywhere gives NaN;
  * empty tensors are rejected (there is no change to measure).

Layout: any strides, including non-contiguous views and stride-0 broadcasts,
are read in place. The kernel indexes up to 4 dims after merging dims that are
contiguous with each other in both tensors (a contiguous tensor merges to 1);
layouts that still need more than 4 dims raise ValueError rather than copy.

Determinism: each program writes its two partial sums to its own slot, and a
second single-program kernel adds the slots in a fixed order. The number of
programs depends only on numel, so repeated calls are bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._op import kernel_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every call takes the torch reference.
    triton = None

__all__ = ["relative_l1", "relative_l1_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_DIMS = 4
_BLOCK = 1024
# Caps the partial-sum buffer (and the single-program finalize loop) at
# 2 * 1024 floats; the Wan 14B activation (32760 x 5120) then gets 160
# blocks per program.
_MAX_PROGRAMS = 1024
_FINALIZE_BLOCK = 1024
# Offsets reaching this switch the kernels to int64 indexing (tests lower it
# to run that path on small tensors).
_INT32_INDEX_LIMIT = 2**31


def relative_l1_reference(prev: Tensor, cur: Tensor) -> Tensor:
    """Plain-torch definition; returns a 0-d fp32 tensor on prev's device."""
    p = prev.float()
    diff = (p - cur.float()).abs().sum()
    base = p.abs().sum()
    both_zero = (diff == 0) & (base == 0)
    return torch.where(both_zero, torch.zeros_like(diff), diff / base)


def _merged_layout(shape, strides_a, strides_b):
    """Drop size-1 dims and merge neighbours that are contiguous in both tensors."""
    dims = [(s, a, b) for s, a, b in zip(shape, strides_a, strides_b) if s != 1]
    merged: list[list[int]] = []
    for size, sa, sb in dims:
        if merged:
            psize, psa, psb = merged[-1]
            if psa == sa * size and psb == sb * size:
                merged[-1] = [psize * size, sa, sb]
                continue
        merged.append([size, sa, sb])
    if not merged:
        merged = [[1, 1, 1]]
    return merged


def _check(prev: Tensor, cur: Tensor) -> None:
    if prev.dtype not in _DTYPES:
        raise ValueError(f"relative_l1: prev.dtype must be one of {_DTYPES}, got {prev.dtype}")
    if cur.dtype != prev.dtype:
        raise ValueError(
            f"relative_l1: cur.dtype must equal prev.dtype ({prev.dtype}), got {cur.dtype}"
        )
    if cur.shape != prev.shape:
        raise ValueError(
            f"relative_l1: cur.shape must equal prev.shape ({tuple(prev.shape)}), "
            f"got {tuple(cur.shape)}"
        )
    if cur.device != prev.device:
        raise ValueError(
            f"relative_l1: cur must be on prev's device ({prev.device}), got {cur.device}"
        )
    if prev.numel() == 0:
        raise ValueError("relative_l1: prev and cur must have at least one element, got numel 0")
    merged = _merged_layout(prev.shape, prev.stride(), cur.stride())
    if len(merged) > _MAX_DIMS:
        raise ValueError(
            f"relative_l1: prev/cur layout needs {len(merged)} strided dims after merging "
            f"contiguous ones; at most {_MAX_DIMS} are supported (strides "
            f"{prev.stride()} and {cur.stride()}); pass .contiguous() tensors"
        )


if triton is not None:

    @triton.jit
    def _relative_l1_partial_kernel(
        prev_ptr, cur_ptr, partial_ptr,
        n, iters,
        s1, s2, s3,
        p0, p1, p2, p3,
        c0, c1, c2, c3,
        NDIM: tl.constexpr,
        BLOCK: tl.constexpr,
        INDEX_64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        lane = tl.arange(0, BLOCK)
        if INDEX_64:
            start = pid.to(tl.int64) * iters * BLOCK
            lane = lane.to(tl.int64)
        else:
            start = pid * iters * BLOCK
        acc_diff = tl.zeros([BLOCK], dtype=tl.float32)
        acc_prev = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(iters):
            idx = start + i * BLOCK + lane
            mask = idx < n
            # Sizes/strides are right-aligned: dim 3 is the innermost. Inlined
            # rather than a @triton.jit helper: every helper call re-patches
            # triton.language in the interpreter (~1 ms each on this CPU).
            if NDIM == 1:
                p_off = idx * p3
                c_off = idx * c3
            else:
                i3 = idx % s3
                rest = idx // s3
                if NDIM == 2:
                    i2 = rest
                    i1 = 0
                    i0 = 0
                else:
                    i2 = rest % s2
                    rest = rest // s2
                    if NDIM == 3:
                        i1 = rest
                        i0 = 0
                    else:
                        i1 = rest % s1
                        i0 = rest // s1
                p_off = i0 * p0 + i1 * p1 + i2 * p2 + i3 * p3
                c_off = i0 * c0 + i1 * c1 + i2 * c2 + i3 * c3
            p = tl.load(prev_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
            c = tl.load(cur_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
            acc_diff += tl.abs(p - c)
            acc_prev += tl.abs(p)
        tl.store(partial_ptr + 2 * pid, tl.sum(acc_diff, axis=0))
        tl.store(partial_ptr + 2 * pid + 1, tl.sum(acc_prev, axis=0))

    @triton.jit
    def _relative_l1_finalize_kernel(partial_ptr, out_ptr, num_partials, BLOCK: tl.constexpr):
        lane = tl.arange(0, BLOCK)
        acc_diff = tl.zeros([BLOCK], dtype=tl.float32)
        acc_prev = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, num_partials, BLOCK):
            idx = start + lane
            mask = idx < num_partials
            acc_diff += tl.load(partial_ptr + 2 * idx, mask=mask, other=0.0)
            acc_prev += tl.load(partial_ptr + 2 * idx + 1, mask=mask, other=0.0)
        diff = tl.sum(acc_diff, axis=0)
        base = tl.sum(acc_prev, axis=0)
        # div_rn: IEEE division like torch; plain `/` is approximate on CUDA.
        ratio = tl.math.div_rn(diff, base)
        ratio = tl.where((diff == 0) & (base == 0), 0.0, ratio)
        tl.store(out_ptr, ratio)


def _relative_l1_triton(prev: Tensor, cur: Tensor) -> Tensor:
    """Launch the two Triton kernels on prev/cur's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("relative_l1: the Triton path needs `triton`, which failed to import")
    _check(prev, cur)
    merged = _merged_layout(prev.shape, prev.stride(), cur.stride())
    ndim = len(merged)
    padded = [[1, 0, 0]] * (_MAX_DIMS - ndim) + merged
    sizes = [d[0] for d in padded]
    p_strides = [d[1] for d in padded]
    c_strides = [d[2] for d in padded]
    n = prev.numel()
    extent = max(
        n,
        1 + sum((s - 1) * abs(t) for s, t in zip(sizes, p_strides)),
        1 + sum((s - 1) * abs(t) for s, t in zip(sizes, c_strides)),
    )
    num_blocks = triton.cdiv(n, _BLOCK)
    iters = triton.cdiv(num_blocks, _MAX_PROGRAMS)
    programs = triton.cdiv(num_blocks, iters)
    partials = torch.empty((programs, 2), dtype=torch.float32, device=prev.device)
    out = torch.empty((), dtype=torch.float32, device=prev.device)
    torch.library.wrap_triton(_relative_l1_partial_kernel)[(programs,)](
        prev, cur, partials,
        n, iters,
        sizes[1], sizes[2], sizes[3],
        *p_strides,
        *c_strides,
        NDIM=ndim,
        BLOCK=_BLOCK,
        INDEX_64=extent + iters * _BLOCK >= _INT32_INDEX_LIMIT,
    )
    torch.library.wrap_triton(_relative_l1_finalize_kernel)[(1,)](
        partials, out, programs, BLOCK=_FINALIZE_BLOCK
    )
    return out


@kernel_op("cachec::relative_l1", mutates_args=())
def _relative_l1_op(prev: Tensor, cur: Tensor) -> Tensor:
    # An explicit device branch, not register_kernel("cpu"): under AOTAutograd
    # triton_op calls this function directly on FunctionalTensors, bypassing
    # per-device registrations (checked on torch 2.13).
    _check(prev, cur)
    if triton is not None and prev.device.type == "cuda":
        return _relative_l1_triton(prev, cur)
    return relative_l1_reference(prev, cur)


@_relative_l1_op.register_fake
def _relative_l1_fake(prev: Tensor, cur: Tensor) -> Tensor:
    _check(prev, cur)
    return prev.new_empty((), dtype=torch.float32)


def relative_l1(prev: Tensor, cur: Tensor) -> Tensor:
    """sum|prev - cur| / sum|prev| as a 0-d fp32 tensor (see module docstring)."""
    return torch.ops.cachec.relative_l1(prev, cur)
