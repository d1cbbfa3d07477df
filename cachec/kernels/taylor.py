"""TaylorSeer helpers for a cached residual.

A cached block keeps `derivs` = [order + 1, *shape]: derivs[0] is the residual
from the last full compute and derivs[i] its i-th finite-difference derivative
per denoising step.

taylor_update_(derivs, new, n): after a full compute that is `n` steps after
the previous one, with old = derivs before the call,
    derivs[0]   = new
    derivs[i+1] = (derivs[i]_new - old[i]) / n          for i < order
all in fp32 (each derivs[i]_new is the unrounded fp32 value, then every order
is rounded once to derivs.dtype on store). One read and one write of every
order plus one read of `new`.

taylor_apply(base, derivs, k): the block's output k steps after the last full
compute, base + sum_i derivs[i] * k**i / i!, accumulated in fp32 and written
once in base.dtype: the caller gets "Fn output + predicted residual" without
materialising the predicted residual.

Layout: derivs is cache state that the caller allocates, so it must be
contiguous; `new`, `base` must be contiguous too (ValueError otherwise). They
may each be fp32, bf16 or fp16, independently of derivs.dtype.

Is torch.compile(reference) as fast as the kernel path? Measured on CPU only
(this machine: 2 shared cores, OMP_NUM_THREADS=1, torch 2.13; the Triton
kernels cannot run natively on CPU, and on CPU the ops dispatch to the eager
reference), order 2, 1024 x 3072, bf16 new/base, fp32 derivs, three runs of
bench/kernels.py --quick (ranges are load noise from a concurrent job):
    taylor_update_   eager  9.7 - 32.9 ms   compiled 28.1 - 30.9 ms
    taylor_apply     eager 10.6 - 38.2 ms   compiled  1.8 -  2.5 ms
Compiling wins for apply but not for update: inductor writes all orders to
a scratch buffer, recomputing each from every order, then copies it back into
derivs (read from its generated C++): ~78 bytes per element against the
kernel's 26. So cachec's runtime calls taylor_update_ (the kernel on CUDA, the
eager reference elsewhere), while a cached step runs inductor's code for
apply (the combination graph of cachec/passes/calibrate.py: it also writes strided outputs, which this
kernel does not). taylor_apply stays here for bench/kernels.py, whose GPU
rows compare it with the compiled reference; no GPU was lent to take them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._op import kernel_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every call takes the torch reference.
    triton = None

__all__ = ["taylor_update_", "taylor_apply", "taylor_update_reference_", "taylor_apply_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024
# Offsets reaching this switch the kernels to int64 indexing (tests lower it
# to run that path on small tensors).
_INT32_INDEX_LIMIT = 2**31


def taylor_update_reference_(derivs: Tensor, new: Tensor, n: float) -> None:
    """In-place torch definition of taylor_update_."""
    cur = new.float()
    inv_n = 1.0 / n
    for i in range(derivs.shape[0]):
        # For fp32 derivs, .float() aliases derivs[i]: use it before the copy_.
        nxt = (cur - derivs[i].float()) * inv_n
        derivs[i].copy_(cur)
        cur = nxt


def taylor_apply_reference(base: Tensor, derivs: Tensor, k: float) -> Tensor:
    """Torch definition of taylor_apply; returns a new tensor in base.dtype."""
    acc = base.float()
    coef = 1.0
    for i in range(derivs.shape[0]):
        acc = acc + derivs[i].float() * coef
        coef = coef * k / (i + 1)
    return acc.to(base.dtype)


def _check_derivs(op: str, derivs: Tensor, other: Tensor, other_name: str) -> None:
    if derivs.dtype not in _DTYPES:
        raise ValueError(f"{op}: derivs.dtype must be one of {_DTYPES}, got {derivs.dtype}")
    if other.dtype not in _DTYPES:
        raise ValueError(f"{op}: {other_name}.dtype must be one of {_DTYPES}, got {other.dtype}")
    if derivs.dim() < 1 or derivs.shape[0] < 1:
        raise ValueError(
            f"{op}: derivs must be [order + 1, *shape] with order >= 0, got shape "
            f"{tuple(derivs.shape)}"
        )
    if derivs.shape[1:] != other.shape:
        raise ValueError(
            f"{op}: {other_name}.shape must equal derivs.shape[1:] "
            f"({tuple(derivs.shape[1:])}), got {tuple(other.shape)}"
        )
    if other.device != derivs.device:
        raise ValueError(
            f"{op}: {other_name} must be on derivs' device ({derivs.device}), got {other.device}"
        )
    if other.numel() == 0:
        raise ValueError(f"{op}: {other_name} must have at least one element, got numel 0")
    if not derivs.is_contiguous():
        raise ValueError(f"{op}: derivs must be contiguous, got strides {derivs.stride()}")
    if not other.is_contiguous():
        raise ValueError(
            f"{op}: {other_name} must be contiguous, got strides {other.stride()}; "
            "pass .contiguous()"
        )


def _check_update(derivs: Tensor, new: Tensor, n: float) -> None:
    _check_derivs("taylor_update_", derivs, new, "new")
    if not (math.isfinite(n) and n != 0):
        raise ValueError(f"taylor_update_: n (steps since the last update) must be finite and non-zero, got {n}")


def _check_apply(base: Tensor, derivs: Tensor, k: float) -> None:
    _check_derivs("taylor_apply", derivs, base, "base")
    if not math.isfinite(k):
        raise ValueError(f"taylor_apply: k (steps since the last update) must be finite, got {k}")


if triton is not None:

    @triton.jit
    def _taylor_update_kernel(
        derivs_ptr, new_ptr, numel, inv_n,
        ORDER: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INDEX_64:
            pid = pid.to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        mask = idx < numel
        cur = tl.load(new_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        for i in tl.static_range(ORDER + 1):
            ptr = derivs_ptr + i * numel + idx
            old = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptr, cur.to(derivs_ptr.dtype.element_ty), mask=mask)
            cur = (cur - old) * inv_n

    @triton.jit
    def _taylor_apply_kernel(
        base_ptr, derivs_ptr, out_ptr, numel, k,
        ORDER: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INDEX_64:
            pid = pid.to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        mask = idx < numel
        acc = tl.load(base_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        coef = 1.0
        for i in tl.static_range(ORDER + 1):
            d = tl.load(derivs_ptr + i * numel + idx, mask=mask, other=0.0).to(tl.float32)
            acc += d * coef
            coef = coef * k / (i + 1)
        tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _grid_args(derivs: Tensor, numel: int):
    return (triton.cdiv(numel, _BLOCK),), derivs.numel() + _BLOCK >= _INT32_INDEX_LIMIT


def _taylor_update_triton(derivs: Tensor, new: Tensor, n: float) -> None:
    """Launch the update kernel on derivs' device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("taylor_update_: the Triton path needs `triton`, which failed to import")
    _check_update(derivs, new, n)
    numel = new.numel()
    grid, index_64 = _grid_args(derivs, numel)
    torch.library.wrap_triton(_taylor_update_kernel)[grid](
        derivs, new, numel, 1.0 / n,
        ORDER=derivs.shape[0] - 1, BLOCK=_BLOCK, INDEX_64=index_64,
    )


def _taylor_apply_triton(base: Tensor, derivs: Tensor, k: float) -> Tensor:
    """Launch the apply kernel on base's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("taylor_apply: the Triton path needs `triton`, which failed to import")
    _check_apply(base, derivs, k)
    out = torch.empty_like(base)
    numel = base.numel()
    grid, index_64 = _grid_args(derivs, numel)
    torch.library.wrap_triton(_taylor_apply_kernel)[grid](
        base, derivs, out, numel, float(k),
        ORDER=derivs.shape[0] - 1, BLOCK=_BLOCK, INDEX_64=index_64,
    )
    return out


@kernel_op("cachec::taylor_update", mutates_args={"derivs"})
def _taylor_update_op(derivs: Tensor, new: Tensor, n: float) -> None:
    # Explicit device branch: under AOTAutograd triton_op calls this function
    # directly, so register_kernel("cpu") would be bypassed (torch 2.13).
    _check_update(derivs, new, n)
    if triton is not None and derivs.device.type == "cuda":
        _taylor_update_triton(derivs, new, n)
    else:
        taylor_update_reference_(derivs, new, n)


@_taylor_update_op.register_fake
def _taylor_update_fake(derivs: Tensor, new: Tensor, n: float) -> None:
    _check_update(derivs, new, n)


@kernel_op("cachec::taylor_apply", mutates_args=())
def _taylor_apply_op(base: Tensor, derivs: Tensor, k: float) -> Tensor:
    _check_apply(base, derivs, k)
    if triton is not None and base.device.type == "cuda":
        return _taylor_apply_triton(base, derivs, k)
    return taylor_apply_reference(base, derivs, k)


@_taylor_apply_op.register_fake
def _taylor_apply_fake(base: Tensor, derivs: Tensor, k: float) -> Tensor:
    _check_apply(base, derivs, k)
    return torch.empty_like(base)


def taylor_update_(derivs: Tensor, new: Tensor, n: float) -> None:
    """Shift in a fresh residual `new`, `n` steps after the previous one (in place)."""
    torch.ops.cachec.taylor_update(derivs, new, float(n))


def taylor_apply(base: Tensor, derivs: Tensor, k: float) -> Tensor:
    """base + sum_i derivs[i] * k**i / i!, in base.dtype."""
    return torch.ops.cachec.taylor_apply(base, derivs, float(k))
