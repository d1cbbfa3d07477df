"""Ulysses attention and the sequence gather, as torch.library ops over torch.distributed.

Each rank holds a slice of the token sequence. ``cachec::ulysses_attention`` turns
the query (and key/value) slices into head slices with one all-to-all each,
runs scaled-dot-product attention over the whole sequence for this rank's heads,
and turns the result back into a sequence slice with another all-to-all.

Sequences are described by their *pieces*: the full lengths of the token runs
that were sharded separately and then joined along the sequence (FLUX's text and
image tokens: ``[512, 4096]``). Every piece splits across the ``P`` ranks as
``torch.tensor_split`` does (the first ``n % P`` ranks hold one token more), and a
rank's slice is its share of each piece, in piece order. The lengths of every
rank follow from the pieces, which every rank's graph holds (the backend checks
that they agree before the first call); where they differ between ranks, each
rank's slice is padded to the longest for the exchange and the padding is cut
out again before attention, so it never reaches the result.

Attention does not care in which order the keys arrive, nor the queries (no
mask, no causality: the pass keeps those cases out), so the gathered sequence
is rank-major: rank 0's slice, then rank 1's. Rotary embeddings were applied
before the exchange, per token.

Communication in ``"fp8"``: Q and V cross as float8_e4m3fn with one fp32 scale
per (token, head) (``kernels.quantize_fp8_seq_to_head``, the permute fused in),
K in the input dtype, and the output returns in fp8 with its scales; in ``"bf16"``
(the name for "the input dtype") everything crosses as it is.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..kernels import dequantize_fp8_head_to_seq, quantize_fp8_seq_to_head

COMMS = ("bf16", "fp8")


def group_of(name: str):
    """The process group a graph names (``ProcessGroup.group_name``)."""
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def piece_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """(start, length) of ``rank``'s share of a piece of ``n`` tokens."""
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def rank_lengths(pieces: list[int], world: int) -> list[int]:
    """How many tokens of a sequence made of ``pieces`` each rank holds."""
    return [sum(piece_bounds(n, world, r)[1] for n in pieces) for r in range(world)]


def _valid_positions(lengths: list[int], device) -> Optional[Tensor]:
    """Positions of the real tokens in a rank-major exchange padded to ``max(lengths)``;
    None where nothing is padded."""
    top = max(lengths)
    if all(n == top for n in lengths):
        return None
    return torch.cat([torch.arange(j * top, j * top + n, device=device) for j, n in enumerate(lengths)])


def _exchange(out: Tensor, inp: Tensor, pg) -> None:
    """all_to_all_single along dim 0 (every exchange goes through here: the bench counts its bytes)."""
    dist.all_to_all_single(out, inp, group=pg)


def _exchange_fp8(q: Tensor, scale: Tensor, pg) -> tuple[Tensor, Tensor]:
    """Exchange fp8 values and their fp32 scales (both chunked along dim 0) in one
    all-to-all: each rank's chunk of bytes is its values followed by its scales."""
    world = q.shape[0]
    values, scales = q.view(torch.uint8).reshape(world, -1), scale.view(torch.uint8).reshape(world, -1)
    packed = torch.cat([values, scales], dim=1)
    recv = torch.empty_like(packed)
    _exchange(recv, packed, pg)   # as bytes: not every backend takes float8
    n = values.shape[1]
    return (recv[:, :n].contiguous().view(torch.float8_e4m3fn).view(q.shape),
            recv[:, n:].contiguous().view(torch.float32).view(scale.shape))


def _seq_to_head(x: Tensor, lengths: list[int], pg, fp8: bool) -> Tensor:
    """[B, H, L_rank, D] sequence slice -> [B, H / P, S, D] head slice, rank-major order."""
    world = len(lengths)
    B, H, L, D = x.shape
    top = max(lengths)
    if L < top:
        x = F.pad(x, (0, 0, 0, top - L))
    if fp8:
        q, scale = quantize_fp8_seq_to_head(x.transpose(1, 2), world)     # [P, B, top, H/P, D]
        rq, rscale = _exchange_fp8(q, scale, pg)
        full = dequantize_fp8_head_to_seq(rq, rscale, x.dtype).transpose(1, 2)   # [B, H/P, P * top, D]
    else:
        send = x.reshape(B, world, H // world, top, D).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        _exchange(recv, send, pg)
        full = recv.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * top, D)
    keep = _valid_positions(lengths, x.device)
    return full if keep is None else full.index_select(2, keep)


def _head_to_seq(out: Tensor, lengths: list[int], rank: int, pg, fp8: bool) -> Tensor:
    """[B, H / P, S, D] rank-major -> this rank's [B, H, L_rank, D] (the inverse exchange)."""
    world = len(lengths)
    B, HL, S, D = out.shape
    top = max(lengths)
    if any(n < top for n in lengths):   # pad every rank's run to ``top`` for equal chunks
        out = torch.cat([F.pad(c, (0, 0, 0, top - c.shape[2])) for c in out.split(lengths, dim=2)], dim=2)
    send = out.reshape(B, HL, world, top, D).permute(2, 0, 1, 3, 4).contiguous()   # chunk j -> rank j
    if fp8:
        rows = send.numel() // D
        q, scale = quantize_fp8_seq_to_head(send.view(1, rows, 1, D), 1)
        rq, rscale = _exchange_fp8(q.view(world, rows // world, D), scale.view(world, rows // world), pg)
        recv = dequantize_fp8_head_to_seq(rq.view(1, 1, rows, 1, D), rscale.view(1, 1, rows, 1),
                                          out.dtype).view(world, B, HL, top, D)
    else:
        recv = torch.empty_like(send)
        _exchange(recv, send, pg)
    # chunk j: rank j's heads of this rank's tokens
    return recv.permute(1, 0, 2, 3, 4).reshape(B, world * HL, top, D)[:, :, :lengths[rank]].contiguous()


def rank_major(pieces: list[int], world: int, device) -> Tensor:
    """Positions, in the original order, of the tokens of a sequence gathered rank by rank
    (rank 0's share of every piece, then rank 1's, ...)."""
    runs = []
    for r in range(world):
        offset = 0
        for n in pieces:
            start, length = piece_bounds(n, world, r)
            runs.append(torch.arange(offset + start, offset + start + length, device=device))
            offset += n
    return torch.cat(runs)


@torch.library.custom_op("cachec::ulysses_attention", mutates_args=())
def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group_name: str, pieces: list[int],
                      kv_pieces: list[int], comm: str, scale: Optional[float] = None,
                      enable_gqa: bool = False, attn_mask: Optional[Tensor] = None) -> Tensor:
    """Scaled-dot-product attention of a sequence sharded across ``group_name``'s ranks.

    q [B, H, L_rank, D] is this rank's slice of a sequence made of ``pieces``; k
    and v are slices of ``kv_pieces`` in the same way, or (``kv_pieces`` empty) the
    whole key/value sequence on every rank (cross-attention to unsharded text).
    ``attn_mask``, whole on every rank, masks keys only (its query dim is 1: text
    padding); its key positions follow the keys into rank-major order.
    Returns this rank's slice of the attention output, [B, H, L_rank, Dv].
    """
    pg = group_of(group_name)
    world, rank = pg.size(), dist.get_rank(pg)
    fp8 = comm == "fp8"
    lengths = rank_lengths(pieces, world)
    qf = _seq_to_head(q, lengths, pg, fp8)
    if kv_pieces:
        kv_lengths = rank_lengths(kv_pieces, world)
        kf = _seq_to_head(k, kv_lengths, pg, False)   # K crosses in the input dtype
        vf = _seq_to_head(v, kv_lengths, pg, fp8)
    else:   # every rank holds all keys: keep this rank's heads
        hk = k.shape[1] // world
        kf, vf = k[:, rank * hk:(rank + 1) * hk], v[:, rank * hk:(rank + 1) * hk]
    if attn_mask is not None:
        if attn_mask.dim() == 4 and attn_mask.shape[1] == q.shape[1] and q.shape[1] > 1:   # per head
            hl = q.shape[1] // world
            attn_mask = attn_mask[:, rank * hl:(rank + 1) * hl]
        if kv_pieces:
            attn_mask = attn_mask.index_select(-1, rank_major(kv_pieces, world, attn_mask.device))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
    return _head_to_seq(out, lengths, rank, pg, fp8)


@ulysses_attention.register_fake
def _(q, k, v, group_name, pieces, kv_pieces, comm, scale=None, enable_gqa=False, attn_mask=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("cachec::ulysses_gather", mutates_args=())
def ulysses_gather(x: Tensor, dim: int, group_name: str, pieces: list[int]) -> Tensor:
    """The whole sequence from every rank's slice of it, in the original token order."""
    pg = group_of(group_name)
    world = pg.size()
    lengths = rank_lengths(pieces, world)
    top = max(lengths)
    x = x.movedim(dim, 0)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, top - x.shape[0])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=pg)
    runs = [part[:n].split([piece_bounds(p, world, r)[1] for p in pieces]) for r, (part, n)
            in enumerate(zip(parts, lengths))]
    full = torch.cat([runs[r][i] for i in range(len(pieces)) for r in range(world)])
    return full.movedim(0, dim).contiguous()


@ulysses_gather.register_fake
def _(x, dim, group_name, pieces):
    shape = list(x.shape)
    shape[dim] = sum(pieces)
    return x.new_empty(shape)

