"""FP8 (e4m3fn) quantize / dequantize around a Ulysses sequence->head all-to-all.

Sender side, on each rank's sequence shard x [B, S, H, D]:
    q, scale = quantize_fp8_seq_to_head(x, world)
    q     [world, B, S, H // world, D]  float8_e4m3fn
    scale [world, B, S, H // world]     float32
chunk r along dim 0 holds heads r*H/world .. (r+1)*H/world - 1 of every local
token, i.e. exactly what rank r must receive, so both tensors go straight into
all_to_all_single (view q as uint8 if the collective lacks fp8).

Receiver side, after the all-to-all chunk j along dim 0 came from rank j (the
j-th sequence shard):
    x = dequantize_fp8_head_to_seq(q, scale, out_dtype)
    q [world, B, S_local, H_local, D] -> x [B, world * S_local, H_local, D]
with x[b, j * S_local + s] = q[j, b, s] * scale[j, b, s]; the permute back is
fused into the kernel's addressing.

Scaling: one fp32 scale per (token, head) row over D, scale = absmax / 448;
values are multiplied by 448 / absmax (0 for an all-zero row, so zero rows
store scale 0 and dequantize to exact zeros, never NaN), clamped to +-448 and
rounded to nearest-even e4m3. Rows containing inf/NaN come back NaN from the
reference; the kernel makes no promise for them.

Round-trip error bound (tested): with a = row absmax, y = x * 448 / a and
x' = dequant(quant(x)) in fp32,
  * e4m3 normals (|y| >= 2**-6) have 3 mantissa bits, so rounding moves y by at
    most half a unit in the last place, 2**-4 * |y|;
  * subnormals are spaced 2**-9, so there the error is at most 2**-10 in y,
    i.e. 2**-10 / 448 * a < 2**-18.8 * a in x;
  * the fp32 roundings of 448/a, x*(448/a), a/448 and q*scale add < 5 * 2**-24
    relative to a,
giving |x' - x| <= 2**-4 * |x| + 2**-18 * a per element (<= 0.0625 a + tiny),
and the row's absmax element round-trips to within fp32 rounding.

The Triton path needs fp8e4nv conversions (sm_89+); other CUDA devices take the
torch reference.
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

__all__ = [
    "quantize_fp8_seq_to_head",
    "dequantize_fp8_head_to_seq",
    "quantize_fp8_seq_to_head_reference",
    "dequantize_fp8_head_to_seq_reference",
    "FP8_MAX",
]

FP8_MAX = 448.0
_FP8 = torch.float8_e4m3fn
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per program target a 2048-element tile (16 rows at D = 128).
_TILE = 2048
_MAX_D = 2048
# Offsets reaching this switch the kernels to int64 indexing (tests lower it
# to run that path on small tensors).
_INT32_INDEX_LIMIT = 2**31


def quantize_fp8_seq_to_head_reference(x: Tensor, world: int) -> tuple[Tensor, Tensor]:
    """Torch definition of quantize_fp8_seq_to_head."""
    B, S, H, D = x.shape
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # Tensor / tensor on purpose: `448 / amax` is reciprocal(amax) * 448 and
    # `amax / 448` may become amax * (1/448), both a rounding away from the
    # kernel's IEEE divisions.
    fmax = torch.full_like(amax, FP8_MAX)
    inv = torch.where(amax > 0, fmax / amax, torch.zeros_like(amax))
    y = (xf * inv.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(_FP8)
    scale = amax / fmax
    hl = H // world
    q = y.view(B, S, world, hl, D).permute(2, 0, 1, 3, 4).contiguous()
    scale = scale.view(B, S, world, hl).permute(2, 0, 1, 3).contiguous()
    return q, scale


def dequantize_fp8_head_to_seq_reference(
    q: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Torch definition of dequantize_fp8_head_to_seq."""
    W, B, SL, HL, D = q.shape
    x = q.float() * scale.unsqueeze(-1)
    return x.permute(1, 0, 2, 3, 4).reshape(B, W * SL, HL, D).to(out_dtype)


def _check_quantize(x: Tensor, world: int) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"quantize_fp8_seq_to_head: x.dtype must be one of {_DTYPES}, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(
            f"quantize_fp8_seq_to_head: x must be [B, S, H, D], got shape {tuple(x.shape)}"
        )
    if world < 1:
        raise ValueError(f"quantize_fp8_seq_to_head: world must be >= 1, got {world}")
    B, S, H, D = x.shape
    if H % world != 0:
        raise ValueError(
            f"quantize_fp8_seq_to_head: world ({world}) must divide the head count x.shape[2] ({H})"
        )
    if x.numel() == 0:
        raise ValueError(f"quantize_fp8_seq_to_head: x must be non-empty, got shape {tuple(x.shape)}")
    if D > _MAX_D:
        raise ValueError(f"quantize_fp8_seq_to_head: head dim x.shape[3] must be <= {_MAX_D}, got {D}")


def _check_dequantize(q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> None:
    op = "dequantize_fp8_head_to_seq"
    if q.dtype != _FP8:
        raise ValueError(f"{op}: q.dtype must be {_FP8}, got {q.dtype}")
    if q.dim() != 5:
        raise ValueError(f"{op}: q must be [world, B, S_local, H_local, D], got shape {tuple(q.shape)}")
    if scale.dtype != torch.float32:
        raise ValueError(f"{op}: scale.dtype must be torch.float32, got {scale.dtype}")
    if scale.shape != q.shape[:-1]:
        raise ValueError(
            f"{op}: scale.shape must be q.shape[:-1] ({tuple(q.shape[:-1])}), got {tuple(scale.shape)}"
        )
    if scale.device != q.device:
        raise ValueError(f"{op}: scale must be on q's device ({q.device}), got {scale.device}")
    if out_dtype not in _DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of {_DTYPES}, got {out_dtype}")
    if q.numel() == 0:
        raise ValueError(f"{op}: q must be non-empty, got shape {tuple(q.shape)}")
    if q.shape[-1] > _MAX_D:
        raise ValueError(f"{op}: head dim q.shape[4] must be <= {_MAX_D}, got {q.shape[-1]}")
    # Both arrive from an all-to-all output buffer, which is contiguous.
    if not q.is_contiguous():
        raise ValueError(f"{op}: q must be contiguous, got strides {q.stride()}")
    if not scale.is_contiguous():
        raise ValueError(f"{op}: scale must be contiguous, got strides {scale.stride()}")


if triton is not None:

    @triton.jit
    def _quantize_kernel(
        x_ptr, q_ptr, scale_ptr,
        rows, S, H, H_LOCAL, B, D,
        xs0, xs1, xs2, xs3,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INDEX_64:
            pid = pid.to(tl.int64)
        r = pid * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, BLOCK_D)
        rmask = r < rows
        mask = rmask[:, None] & (d < D)[None, :]
        h = r % H
        t = r // H
        s = t % S
        b = t // S
        x_off = b * xs0 + s * xs1 + h * xs2
        x = tl.load(x_ptr + x_off[:, None] + d[None, :] * xs3, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        # div_rn: IEEE division like torch; plain `/` is approximate on CUDA.
        inv = tl.where(amax > 0, tl.math.div_rn(tl.full([ROWS], 448.0, tl.float32), amax), 0.0)
        y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
        # Triton 3.9's interpreter casts fp32 -> fp8e4nv by rounding half up,
        # losing mantissa carries and truncating subnormals (17 -> 18,
        # 0.001 -> 0; torch gives 16 and 2**-9). Rounding to the e4m3 grid in
        # fp32 first makes the cast exact on every backend, so the kernel
        # matches torch bit for bit on GPU and under TRITON_INTERPRET=1.
        bits = y.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        mag = bits & 0x7FFFFFFF
        # Normals: keep 3 of fp32's 23 mantissa bits, ties to even.
        normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000
        # Subnormals (|y| < 2**-6) sit on a 2**-9 grid; adding 1.5 * 2**23
        # rounds |y| * 2**9 to an integer, ties to even. The sign is put back
        # afterwards so that values rounding to zero keep it, as torch does.
        ay = mag.to(tl.float32, bitcast=True)
        sub = (((ay * 512.0 + 12582912.0) - 12582912.0) * 0.001953125).to(tl.uint32, bitcast=True)
        y = (tl.where(ay >= 0.015625, normal, sub) | sign).to(tl.float32, bitcast=True)
        g = h // H_LOCAL
        q_row = ((g * B + b) * S + s) * H_LOCAL + (h - g * H_LOCAL)
        tl.store(q_ptr + q_row[:, None] * D + d[None, :], y.to(tl.float8e4nv), mask=mask)
        scale = tl.math.div_rn(amax, tl.full([ROWS], 448.0, tl.float32))
        tl.store(scale_ptr + q_row, scale, mask=rmask)

    @triton.jit
    def _dequantize_kernel(
        q_ptr, scale_ptr, out_ptr,
        rows, B, S_LOCAL, H_LOCAL, D, WS,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INDEX_64:
            pid = pid.to(tl.int64)
        # r walks output rows [B, WS = world * S_LOCAL, H_LOCAL] in order.
        r = pid * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, BLOCK_D)
        rmask = r < rows
        mask = rmask[:, None] & (d < D)[None, :]
        h = r % H_LOCAL
        t = r // H_LOCAL
        tok = t % WS
        b = t // WS
        j = tok // S_LOCAL
        src = ((j * B + b) * S_LOCAL + (tok - j * S_LOCAL)) * H_LOCAL + h
        q = tl.load(q_ptr + src[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + src, mask=rmask, other=0.0)
        out = q * sc[:, None]
        tl.store(out_ptr + r[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _tile(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, _TILE // block_d), block_d


def _quantize_triton(x: Tensor, world: int) -> tuple[Tensor, Tensor]:
    """Launch the quantize kernel on x's device (CUDA sm_89+, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("quantize_fp8_seq_to_head: the Triton path needs `triton`, which failed to import")
    _check_quantize(x, world)
    B, S, H, D = x.shape
    hl = H // world
    q = torch.empty((world, B, S, hl, D), dtype=_FP8, device=x.device)
    scale = torch.empty((world, B, S, hl), dtype=torch.float32, device=x.device)
    rows = B * S * H
    rows_per_prog, block_d = _tile(D)
    x_extent = 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
    index_64 = max(x_extent, q.numel()) + rows_per_prog * block_d >= _INT32_INDEX_LIMIT
    torch.library.wrap_triton(_quantize_kernel)[(triton.cdiv(rows, rows_per_prog),)](
        x, q, scale,
        rows, S, H, hl, B, D,
        *x.stride(),
        ROWS=rows_per_prog, BLOCK_D=block_d, INDEX_64=index_64,
    )
    return q, scale


def _dequantize_triton(q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Launch the dequantize kernel on q's device (CUDA sm_89+, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("dequantize_fp8_head_to_seq: the Triton path needs `triton`, which failed to import")
    _check_dequantize(q, scale, out_dtype)
    W, B, SL, HL, D = q.shape
    out = torch.empty((B, W * SL, HL, D), dtype=out_dtype, device=q.device)
    rows = B * W * SL * HL
    rows_per_prog, block_d = _tile(D)
    index_64 = q.numel() + rows_per_prog * block_d >= _INT32_INDEX_LIMIT
    torch.library.wrap_triton(_dequantize_kernel)[(triton.cdiv(rows, rows_per_prog),)](
        q, scale, out,
        rows, B, SL, HL, D, W * SL,
        ROWS=rows_per_prog, BLOCK_D=block_d, INDEX_64=index_64,
    )
    return out


def _use_triton(t: Tensor) -> bool:
    if triton is None or t.device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(t.device) >= (8, 9)


@kernel_op("cachec::quantize_fp8_seq_to_head", mutates_args=())
def _quantize_op(x: Tensor, world: int) -> tuple[Tensor, Tensor]:
    # Explicit device branch: under AOTAutograd triton_op calls this function
    # directly, so register_kernel("cpu") would be bypassed (torch 2.13).
    _check_quantize(x, world)
    if _use_triton(x):
        return _quantize_triton(x, world)
    return quantize_fp8_seq_to_head_reference(x, world)


@_quantize_op.register_fake
def _quantize_fake(x: Tensor, world: int) -> tuple[Tensor, Tensor]:
    _check_quantize(x, world)
    B, S, H, D = x.shape
    q = x.new_empty((world, B, S, H // world, D), dtype=_FP8)
    scale = x.new_empty((world, B, S, H // world), dtype=torch.float32)
    return q, scale


@kernel_op("cachec::dequantize_fp8_head_to_seq", mutates_args=())
def _dequantize_op(q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    _check_dequantize(q, scale, out_dtype)
    if _use_triton(q):
        return _dequantize_triton(q, scale, out_dtype)
    return dequantize_fp8_head_to_seq_reference(q, scale, out_dtype)


@_dequantize_op.register_fake
def _dequantize_fake(q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    _check_dequantize(q, scale, out_dtype)
    W, B, SL, HL, D = q.shape
    return q.new_empty((B, W * SL, HL, D), dtype=out_dtype)


def quantize_fp8_seq_to_head(x: Tensor, world: int) -> tuple[Tensor, Tensor]:
    """x [B, S, H, D] -> (q [world, B, S, H/world, D] e4m3fn, scale [world, B, S, H/world] fp32)."""
    return torch.ops.cachec.quantize_fp8_seq_to_head(x, world)


def dequantize_fp8_head_to_seq(
    q: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """q [world, B, S_local, H_local, D] -> [B, world * S_local, H_local, D] in out_dtype."""
    return torch.ops.cachec.dequantize_fp8_head_to_seq(q, scale, out_dtype)
