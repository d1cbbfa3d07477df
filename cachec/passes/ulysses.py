"""Ulysses context parallelism as a graph rewrite.

1. **Shard.** The token sequences block 0 takes from the prologue (the carried
   inputs of ``find_block_chain``: image or video tokens, and FLUX-style joint
   text tokens, which the blocks carry too; cross-attention text that every
   block reads unchanged stays whole, as diffusers' own context parallelism
   does for Wan) are cut along the sequence (dim 1) right where the prologue
   makes them. Each rank keeps its share (``parallel.piece_bounds``).
2. **Propagate.** Walking the graph from there, every op that reads a sharded
   tensor either keeps working on slices (token-wise ops; the pass rewrites the
   sequence length baked into views and the bounds of slices and splits at piece
   boundaries) or, where a rule cannot prove that, reads the gathered sequence
   instead (``cachec::ulysses_gather``: always right, only slower; the summary
   lists those ops). A whole-sequence tensor that meets a sharded one token by
   token (rotary tables, per-token modulation) is cut to the same slice.
3. **Attention.** ``scaled_dot_product_attention`` on sharded queries becomes
   ``cachec::ulysses_attention`` (all-to-all to head slices and back).
4. **Gather.** Whatever leaves the graph sharded is gathered.

Every rule reasons about the full shapes dynamo recorded; the rewritten graph's
shapes are then propagated afresh with fake tensors. A sequence is described by
its pieces (``parallel.ulysses``): the full lengths of the token runs joined
along it, so ``cat([text, image])`` and the slices that take the two apart
again map onto every rank's ``[its text, its image]``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..parallel.ulysses import piece_bounds
from .chain import BlockChain
from .inputs import example_value

_POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "floordiv", "neg", "pos", "silu", "gelu", "relu", "tanh", "sigmoid",
    "exp", "sin", "cos", "sqrt", "rsqrt", "pow", "abs", "dropout", "clamp", "clip", "where", "softplus", "erf",
    "log", "maximum", "minimum", "mish", "leaky_relu", "hardswish", "square", "reciprocal", "sign", "addcmul",
    "lerp", "iadd", "imul", "isub", "itruediv", "contiguous", "clone", "detach", "float", "half", "bfloat16",
    "double", "to", "type_as", "type", "add_", "mul_", "sub_", "div_", "addcmul_", "copy_", "masked_fill",
    "nan_to_num", "gelu_", "silu_",
}
_DATA_SELF_ONLY = {"to", "type_as", "type", "dropout", "float", "half", "bfloat16", "double", "contiguous",
                   "clone", "detach"}
_INPLACE = {"iadd", "imul", "isub", "itruediv", "setitem"}
_LIKE = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like"}


@dataclass(frozen=True)
class Seq:
    """A tensor sharded along ``dim``; the sequence there is ``pieces`` joined."""
    dim: int
    pieces: tuple[int, ...]

    @property
    def full(self) -> int:
        return sum(self.pieces)

    def at(self, dim: int) -> "Seq":
        return Seq(dim, self.pieces)


@dataclass
class UlyssesInfo:
    """What the rewrite did, for the summary and the cross-rank check."""
    world: int
    rank: int
    comm: str
    sharded: list[str] = field(default_factory=list)      # "name [pieces]" per shard point
    attention: int = 0                                    # attention calls made Ulysses
    cross_attention: int = 0                              # of which with whole keys/values
    gathered: list[str] = field(default_factory=list)     # ops that read a gathered sequence

    def signature(self) -> tuple:
        return (self.world, self.comm, tuple(self.sharded), self.attention, tuple(self.gathered))


def _name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _ndim(n) -> int:
    v = example_value(n) if isinstance(n, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _shape(n: fx.Node) -> tuple:
    return tuple(example_value(n).shape)


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(n: fx.Node, pos: int, name: str, default=None):
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(name, default)


def _set_arg(n: fx.Node, pos: int, name: str, value) -> None:
    if len(n.args) > pos:
        args = list(n.args)
        args[pos] = value
        n.args = tuple(args)
    else:
        n.kwargs = {**n.kwargs, name: value}


def _sizes(n: fx.Node) -> tuple[list, bool]:
    """The size list of view/reshape/expand/permute, given as varargs or as one sequence."""
    if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)):
        return list(n.args[1]), True
    if len(n.args) <= 1 and "size" in n.kwargs:
        return list(n.kwargs["size"]), True
    if len(n.args) <= 1 and "shape" in n.kwargs:
        return list(n.kwargs["shape"]), True
    return list(n.args[1:]), False


def _set_sizes(n: fx.Node, sizes: list, packed: bool) -> None:
    if len(n.args) <= 1 and not packed:
        return
    if len(n.args) <= 1:
        key = "size" if "size" in n.kwargs else "shape"
        n.kwargs = {**n.kwargs, key: sizes}
    elif packed:
        n.args = (n.args[0], type(n.args[1])(sizes))
    else:
        n.args = (n.args[0], *sizes)


class _Rewrite:
    def __init__(self, gm: fx.GraphModule, world: int, rank: int, group_name: str, comm: str):
        self.gm, self.graph = gm, gm.graph
        self.world, self.rank, self.group, self.comm = world, rank, group_name, comm
        self.sh: dict[fx.Node, object] = {}          # node -> Seq, or a tuple of Seq/None
        self.localized: dict[tuple, fx.Node] = {}
        self.gathers: dict[fx.Node, fx.Node] = {}
        self.info = UlyssesInfo(world, rank, comm)

    # -- what a rank holds -------------------------------------------------------------------------------
    def local(self, pieces) -> int:
        return sum(piece_bounds(p, self.world, self.rank)[1] for p in pieces)

    def _insert(self, where: fx.Node, after: bool, target, args: tuple, meta_from: fx.Node,
                stands_for: fx.Node) -> fx.Node:
        ctx = self.graph.inserting_after(where) if after else self.graph.inserting_before(where)
        with ctx:
            node = self.graph.call_function(target, args)
        node.meta = {k: v for k, v in meta_from.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        # the rules reason about full shapes: a cut or gathered tensor stands for the whole one
        node.meta["example_value"] = node.meta["val"] = example_value(stands_for)
        return node

    def cut(self, src: fx.Node, dim: int, pieces: tuple) -> fx.Node:
        """``src`` (whole along ``dim``) cut to this rank's share of each piece, joined."""
        key = (src, dim, pieces)
        if key in self.localized:
            return self.localized[key]
        parts, offset, last = [], 0, src
        for p in pieces:
            start, length = piece_bounds(p, self.world, self.rank)
            last = self._insert(last, True, torch.narrow, (src, dim, offset + start, length), src, src)
            parts.append(last)
            offset += p
        if len(parts) > 1:
            last = self._insert(last, True, torch.cat, (parts, dim), src, src)
        self.localized[key] = last
        return last

    def gather(self, node: fx.Node, before: fx.Node) -> fx.Node:
        if node not in self.gathers:
            seq = self.sh[node]
            self.gathers[node] = self._insert(before, False, torch.ops.cachec.ulysses_gather.default,
                                              (node, seq.dim, self.group, list(seq.pieces)), before, node)
        return self.gathers[node]

    # -- the walk ----------------------------------------------------------------------------------------
    def shard(self, chain: BlockChain) -> None:
        nodes = list(self.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        lo, hi = chain.blocks[0].first, chain.blocks[-1].last
        # token streams: the latent's, and any other the blocks continue (a tensor of its shape is
        # carried on into block 1); per-block tables that block 0 alone reads are not sequences
        first = chain.blocks[0]
        continued = {_shape(a) for a in chain.carried_in[1] if first.first <= pos[a] <= first.last} \
            if len(chain.carried_in) > 1 else None
        for a in chain.carried_in[0]:
            if _ndim(a) != 3 or (a is not chain.hidden_in and continued is not None and _shape(a) not in continued):
                continue
            pieces = (_shape(a)[1],)
            if self.local(pieces) < 1:
                raise ValueError(f"ulysses_size={self.world}: the {pieces[0]} tokens of '{a.name}' leave rank "
                                 f"{self.rank} none; use fewer ranks or more tokens")
            users = [u for u in a.users if lo <= pos.get(u, -1) <= hi]
            cut = self.cut(a, 1, pieces)
            for u in users:
                u.replace_input_with(a, cut)
            self.sh[cut] = Seq(1, pieces)
            self.info.sharded.append(f"{a.name} {list(pieces)}")
        if not self.sh:
            raise ValueError("ulysses: block 0 takes no [batch, tokens, channels] sequence to shard")
        for n in nodes[lo:]:
            if n.op == "output":
                n.args = fx.node.map_arg(n.args, lambda a: self.gather(a, n) if isinstance(self.sh.get(a), Seq) else a)
                continue
            if not any(a in self.sh for a in n.all_input_nodes):
                continue
            if not self.rule(n):
                self.fallback(n)

    def fallback(self, n: fx.Node) -> None:
        name = _name(n)
        target = n.args[0] if n.args else None
        if (name.endswith("_") or name in _INPLACE) and target in self.sh:
            raise ValueError(f"ulysses: {n.format_node()} writes in place into a sharded tensor in a way the pass "
                             f"cannot keep per rank (the write would land in a gathered copy and be lost)")
        for a in list(n.all_input_nodes):
            if a in self.sh:
                if not isinstance(self.sh[a], Seq):
                    raise ValueError(f"ulysses: {n.format_node()} reads the tuple {a.name} of sharded tensors whole")
                n.replace_input_with(a, self.gather(a, n))
        self.info.gathered.append(f"{_name(n)} ({n.name})")

    def rule(self, n: fx.Node) -> bool:
        name = _name(n)
        if n.op not in ("call_function", "call_method"):
            return False
        if name == "getitem" and n.target is operator.getitem:
            return self.getitem(n)
        if name == "setitem":
            return self.setitem(n)
        if name == "scaled_dot_product_attention":
            return self.attention(n)
        if name in _POINTWISE:
            return self.pointwise(n, name)
        if name in _LIKE:
            return self.keep(n, n.args[0])
        handler = getattr(self, f"op_{name}", None)
        return bool(handler and handler(n))

    def keep(self, n: fx.Node, src, dim: Optional[int] = None) -> bool:
        seq = self.sh.get(src)
        if not isinstance(seq, Seq):
            return False
        self.sh[n] = seq if dim is None else seq.at(dim)
        return True

    def pointwise(self, n: fx.Node, name: str) -> bool:
        R = _ndim(n)
        if R < 0:
            return False
        data = [n.args[0]] if name in _DATA_SELF_ONLY else list(n.all_input_nodes)
        if name.endswith("_") or name in _INPLACE:   # in place: self decides
            if n.args[0] not in self.sh:
                return False
        tensors = [a for a in data if isinstance(a, fx.Node) and _ndim(a) >= 0]
        seqs = {self.sh[a].at(self.sh[a].dim + R - _ndim(a)) for a in tensors
                if isinstance(self.sh.get(a), Seq)}
        if len(seqs) != 1 or any(a in self.sh and not isinstance(self.sh[a], Seq) for a in tensors):
            return False
        seq = next(iter(seqs))
        to_cut = []   # checked before any change: a rule that gives up leaves the node as it was
        for a in tensors:
            p = seq.dim - (R - _ndim(a))
            if a in self.sh or p < 0 or _shape(a)[p] == 1:
                continue
            if _shape(a)[p] != seq.full:
                return False
            to_cut.append((a, p))
        for a, p in to_cut:
            n.replace_input_with(a, self.cut(a, p, seq.pieces))
        self.sh[n] = seq
        return True

    # -- ops that keep token rows apart ------------------------------------------------------------------
    def _last_dims(self, n: fx.Node, k: int) -> bool:
        x = n.args[0]
        seq = self.sh.get(x)
        if not isinstance(seq, Seq) or seq.dim >= _ndim(x) - k or any(a in self.sh for a in n.all_input_nodes[1:]):
            return False
        return self.keep(n, x)

    def op_linear(self, n):
        return self._last_dims(n, 1)

    def op_layer_norm(self, n):
        return self._last_dims(n, len(_arg(n, 1, "normalized_shape")))

    op_rms_norm = op_layer_norm

    def op_softmax(self, n):
        seq = self.sh.get(n.args[0])
        dim = _arg(n, 1, "dim")
        return isinstance(seq, Seq) and dim is not None and _norm(dim, _ndim(n)) != seq.dim and self.keep(n, n.args[0])

    def _reduce(self, n, keepdim) -> bool:
        """A reduction over dims other than the sequence (an RMS norm's mean over channels)."""
        x, seq = n.args[0], self.sh.get(n.args[0])
        dim = _arg(n, 1, "dim")
        if not isinstance(seq, Seq) or dim is None or not isinstance(example_value(n), torch.Tensor):
            return False
        dims = {_norm(d, _ndim(x)) for d in (dim if isinstance(dim, (list, tuple)) else (dim,))}
        if seq.dim in dims:
            return False
        return self.keep(n, x, seq.dim if keepdim else seq.dim - sum(d < seq.dim for d in dims))

    def op_mean(self, n):   # mean(x, dim, keepdim), and sum, amax, ... alike
        return self._reduce(n, _arg(n, 2, "keepdim", False))

    op_sum = op_amax = op_amin = op_prod = op_logsumexp = op_nansum = op_mean

    def op_var(self, n):   # var(x, dim, unbiased/correction..., keepdim): keepdim only by keyword here
        return len(n.args) <= 2 and self._reduce(n, n.kwargs.get("keepdim", False))

    op_std = op_var

    def op_view_as_complex(self, n):   # [..., 2] real -> [...] complex: drops the last dim
        x, seq = n.args[0], self.sh.get(n.args[0])
        return isinstance(seq, Seq) and seq.dim < _ndim(x) - 1 and self.keep(n, x)

    def op_view_as_real(self, n):      # adds a last dim of 2
        return self.keep(n, n.args[0])

    def op_repeat_interleave(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        dim = _arg(n, 2, "dim")
        if not isinstance(seq, Seq) or dim is None or not isinstance(_arg(n, 1, "repeats"), int):
            return False
        return _norm(dim, _ndim(x)) != seq.dim and self.keep(n, x)

    # -- shape ops ---------------------------------------------------------------------------------------
    def op_view(self, n):
        x = n.args[0]
        seq = self.sh.get(x)
        if not isinstance(seq, Seq) or isinstance(_arg(n, 1, "dtype"), torch.dtype):
            return False
        src, out = _shape(x), _shape(n)
        d = seq.dim
        prefix, suffix = math.prod(src[:d]), math.prod(src[d + 1:])
        j = next((j for j in range(len(out)) if out[j] == src[d] and math.prod(out[:j]) == prefix
                  and math.prod(out[j + 1:]) == suffix), None)
        sizes, packed = _sizes(n)
        if j is None or len(sizes) != len(out):
            return False
        if sizes[j] != -1:
            if sizes[j] != seq.full:
                return False
            sizes[j] = self.local(seq.pieces)
            _set_sizes(n, sizes, packed)
        self.sh[n] = seq.at(j)
        return True

    op_reshape = op_view

    def op_expand(self, n):
        x = n.args[0]
        seq = self.sh.get(x)
        if not isinstance(seq, Seq):
            return False
        sizes, packed = _sizes(n)
        j = seq.dim + len(sizes) - _ndim(x)
        if sizes[j] not in (-1, seq.full):
            return False
        if sizes[j] == seq.full:
            sizes[j] = self.local(seq.pieces)
            _set_sizes(n, sizes, packed)
        self.sh[n] = seq.at(j)
        return True

    def op_unflatten(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        dim, sizes = _norm(_arg(n, 1, "dim"), _ndim(x)), _arg(n, 2, "sizes")
        if not isinstance(seq, Seq) or dim == seq.dim:
            return False
        return self.keep(n, x, seq.dim if dim > seq.dim else seq.dim + len(sizes) - 1)

    def op_flatten(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        if not isinstance(seq, Seq):
            return False
        nd = _ndim(x)
        start, end = _norm(_arg(n, 1, "start_dim", 0), nd), _norm(_arg(n, 2, "end_dim", -1), nd)
        d = seq.dim
        if start <= d <= end:
            if any(_shape(x)[k] != 1 for k in range(start, end + 1) if k != d):
                return False
            return self.keep(n, x, start)
        return self.keep(n, x, d - (end - start) if d > end else d)

    def op_permute(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        if not isinstance(seq, Seq):
            return False
        dims = [_norm(d, _ndim(x)) for d in (_sizes(n)[0] if "dims" not in n.kwargs else n.kwargs["dims"])]
        return self.keep(n, x, dims.index(seq.dim))

    def op_transpose(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        if not isinstance(seq, Seq):
            return False
        a, b = (_norm(_arg(n, i, k), _ndim(x)) for i, k in ((1, "dim0"), (2, "dim1")))
        d = seq.dim
        return self.keep(n, x, b if d == a else a if d == b else d)

    op_swapaxes = op_swapdims = op_transpose

    def op_unsqueeze(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        if not isinstance(seq, Seq):
            return False
        k = _norm(_arg(n, 1, "dim"), _ndim(n))
        return self.keep(n, x, seq.dim + 1 if k <= seq.dim else seq.dim)

    def op_squeeze(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        dim = _arg(n, 1, "dim")
        if not isinstance(seq, Seq) or isinstance(dim, (list, tuple)):
            return False
        if dim is None:   # every size-1 dim goes; named, so a rank holding one token keeps its sequence dim
            ones = [k for k, size in enumerate(_shape(x)) if size == 1]
            if seq.dim in ones:
                return False
            n.args, n.kwargs = (x, tuple(ones)), {}
            return self.keep(n, x, seq.dim - sum(k < seq.dim for k in ones))
        k = _norm(dim, _ndim(x))
        if k == seq.dim:   # a no-op on the whole sequence; on a rank holding one token it would not be
            if seq.full == 1:
                return False
            n.replace_all_uses_with(x)
            return self.keep(n, x)
        return self.keep(n, x, seq.dim - 1 if k < seq.dim and _shape(x)[k] == 1 else seq.dim)

    def op_repeat(self, n):   # tiling that leaves the sequence dim alone
        x, seq = n.args[0], self.sh.get(n.args[0])
        if not isinstance(seq, Seq):
            return False
        sizes, _ = _sizes(n)
        j = seq.dim + len(sizes) - _ndim(x)
        return sizes[j] == 1 and self.keep(n, x, j)

    def _pieces_of(self, seq: Seq, sizes: list) -> Optional[list[tuple]]:
        """``sizes`` along the sequence as runs of whole pieces, or None."""
        groups, rest = [], list(seq.pieces)
        for s in sizes:
            group, total = [], 0
            while rest and total < s:
                total += rest[0]
                group.append(rest.pop(0))
            if total != s or not group:
                return None
            groups.append(tuple(group))
        return groups if not rest else None

    def _split(self, n, dim_pos: int, sizes) -> bool:
        x, seq = n.args[0], self.sh.get(n.args[0])
        if not isinstance(seq, Seq):
            return False
        k = _norm(_arg(n, dim_pos, "dim", 0), _ndim(x))
        count = len(example_value(n))
        if k != seq.dim:
            self.sh[n] = tuple(seq for _ in range(count))
            return True
        if not isinstance(sizes, (list, tuple)):
            return False
        groups = self._pieces_of(seq, list(sizes))
        if groups is None:
            return False
        _set_arg(n, 1, "split_size" if _name(n) == "split" else "split_sizes",
                 [self.local(g) for g in groups])
        self.sh[n] = tuple(Seq(seq.dim, g) for g in groups)
        return True

    def op_split(self, n):
        return self._split(n, 2, _arg(n, 1, "split_size", _arg(n, 1, "split_size_or_sections")))

    def op_split_with_sizes(self, n):
        return self._split(n, 2, _arg(n, 1, "split_sizes"))

    def op_chunk(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        if not isinstance(seq, Seq) or _norm(_arg(n, 2, "dim", 0), _ndim(x)) == seq.dim:
            return False
        self.sh[n] = tuple(seq for _ in range(len(example_value(n))))
        return True

    def op_unbind(self, n):
        x, seq = n.args[0], self.sh.get(n.args[0])
        if not isinstance(seq, Seq):
            return False
        k = _norm(_arg(n, 1, "dim", 0), _ndim(x))
        if k == seq.dim:
            return False
        self.sh[n] = tuple(seq.at(seq.dim - 1 if k < seq.dim else seq.dim) for _ in range(_shape(x)[k]))
        return True

    def op_cat(self, n):
        tensors = list(_arg(n, 0, "tensors"))
        if not tensors:
            return False
        R = _ndim(n)
        k = _norm(_arg(n, 1, "dim", 0), R)
        seqs = [self.sh.get(t) for t in tensors]
        if any(s is not None and not isinstance(s, Seq) for s in seqs):
            return False
        if any(s is not None and s.dim == k for s in seqs):   # joined along the sequence: pieces add up
            if any(s is None or s.dim != k for s in seqs):
                return False
            self.sh[n] = Seq(k, tuple(p for s in seqs for p in s.pieces))
            return True
        if len({s for s in seqs if s is not None}) != 1:
            return False
        seq = next(s for s in seqs if s is not None)
        new = [t if s is not None else self.cut(t, seq.dim, seq.pieces) for t, s in zip(tensors, seqs)]
        _set_arg(n, 0, "tensors", new)
        self.sh[n] = seq
        return True

    op_concat = op_concatenate = op_cat

    def op_stack(self, n):
        tensors = list(_arg(n, 0, "tensors"))
        seqs = {self.sh.get(t) for t in tensors} - {None}
        if len(seqs) != 1 or not isinstance(next(iter(seqs)), Seq):
            return False
        seq = next(iter(seqs))
        k = _norm(_arg(n, 1, "dim", 0), _ndim(n))
        new = [t if t in self.sh else self.cut(t, seq.dim, seq.pieces) for t in tensors]
        _set_arg(n, 0, "tensors", new)
        self.sh[n] = seq.at(seq.dim + 1 if k <= seq.dim else seq.dim)
        return True

    # -- indexing ----------------------------------------------------------------------------------------
    def _index(self, x: fx.Node, index, seq: Seq) -> Optional[tuple[int, tuple]]:
        """(output position of the sequence dim, index rewritten for this rank) or None."""
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in items):
            return None
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        if Ellipsis in items:
            e = items.index(Ellipsis)
            items[e:e + 1] = [slice(None)] * (_ndim(x) - consumed)
        else:
            items += [slice(None)] * (_ndim(x) - consumed)
        dim_in = out = 0
        for p, it in enumerate(items):
            if it is None:
                out += 1
                continue
            if dim_in == seq.dim:
                if not isinstance(it, slice) or it.step not in (None, 1):
                    return None
                start, stop, _ = it.indices(seq.full)
                if (start, stop) == (0, seq.full):
                    return out, tuple(items), seq.pieces
                bounds = [0]
                for q in seq.pieces:
                    bounds.append(bounds[-1] + q)
                if start not in bounds or stop not in bounds or start >= stop:
                    return None
                a, b = bounds.index(start), bounds.index(stop)
                local_start = self.local(seq.pieces[:a])
                items[p] = slice(local_start, local_start + self.local(seq.pieces[a:b]))
                return out, tuple(items), seq.pieces[a:b]
            if isinstance(it, int):
                dim_in += 1
                continue
            dim_in += 1
            out += 1
        return None

    def getitem(self, n: fx.Node) -> bool:
        x, index = n.args
        seq = self.sh.get(x)
        if isinstance(seq, tuple):
            if isinstance(index, int) and seq[index] is not None:
                self.sh[n] = seq[index]
            return True   # an element that is not sharded stays as it is
        found = self._index(x, index, seq) if isinstance(seq, Seq) else None
        if found is None:
            return False
        out, items, pieces = found
        n.args = (x, items if isinstance(index, tuple) or len(items) > 1 else items[0])
        self.sh[n] = Seq(out, tuple(pieces))
        return True

    def setitem(self, n: fx.Node) -> bool:
        x, index, value = n.args
        seq = self.sh.get(x)
        if not isinstance(seq, Seq):
            return False
        found = self._index(x, index, seq)
        if found is None or tuple(found[2]) != seq.pieces:
            return False
        out = found[0]
        if isinstance(value, fx.Node) and _ndim(value) >= 0:
            vseq = self.sh.get(value)
            items = index if isinstance(index, tuple) else (index,)
            view_ndim = _ndim(x) - sum(isinstance(i, int) for i in items) + sum(i is None for i in items)
            p = out - (view_ndim - _ndim(value))   # the value broadcasts against x[index] from the right
            if isinstance(vseq, Seq):
                if vseq.dim != p or vseq.pieces != seq.pieces:
                    return False
            elif p >= 0 and _shape(value)[p] == seq.full and seq.full != 1:
                n.replace_input_with(value, self.cut(value, p, seq.pieces))
            elif p >= 0 and _shape(value)[p] != 1:
                return False
        return True

    # -- attention ---------------------------------------------------------------------------------------
    def attention(self, n: fx.Node) -> bool:
        q, k, v = (_arg(n, i, key) for i, key in enumerate(("query", "key", "value")))
        mask, dropout = _arg(n, 3, "attn_mask"), _arg(n, 4, "dropout_p", 0.0)
        causal, scale = _arg(n, 5, "is_causal", False), n.kwargs.get("scale")
        gqa = n.kwargs.get("enable_gqa", False)
        sq, sk, sv = (self.sh.get(t) for t in (q, k, v))
        if not isinstance(sq, Seq) or sq.dim != 2 or _ndim(q) != 4 or dropout or causal:
            return False
        # a mask of keys only (text padding: its query dim is 1), whole on every rank
        if mask is not None and (mask in self.sh or _ndim(mask) != 4 or _shape(mask)[2] != 1
                                 or _shape(mask)[1] not in (1, _shape(q)[1])):
            return False
        if sk is None and sv is None:
            kv_pieces = []
        elif isinstance(sk, Seq) and sk == sv and sk.dim == 2:
            kv_pieces = list(sk.pieces)
        else:
            return False
        heads, kv_heads = _shape(q)[1], _shape(k)[1]
        if heads % self.world or kv_heads % self.world:
            raise ValueError(f"ulysses_size={self.world} must divide the attention heads: {n.name} has {heads} query "
                             f"and {kv_heads} key/value heads")
        with self.graph.inserting_before(n):
            new = self.graph.call_function(torch.ops.cachec.ulysses_attention.default,
                                           (q, k, v, self.group, list(sq.pieces), kv_pieces, self.comm, scale, gqa,
                                            mask))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        self.graph.erase_node(n)
        self.sh[new] = sq
        self.info.attention += 1
        self.info.cross_attention += not kv_pieces
        return True


def shard_graph(gm: fx.GraphModule, chain: BlockChain, world: int, rank: int, group_name: str,
                comm: str) -> UlyssesInfo:
    """Rewrite ``gm`` in place for ``rank`` of ``world`` (module docstring) and refresh its
    fake values; returns what it did."""
    for node in gm.graph.nodes:
        val = example_value(node)
        if isinstance(val, torch.Tensor) and any(not isinstance(s, int) for s in val.shape):
            raise ValueError("ulysses: this graph has symbolic shapes (dynamic=True, or a recompile after a "
                             "new resolution): Ulysses shards static shapes only; compile with dynamic=False")
    rw = _Rewrite(gm, world, rank, group_name, comm)
    rw.shard(chain)
    if rw.info.attention == 0:
        raise ValueError("ulysses: no scaled_dot_product_attention in the blocks reads the sharded tokens")
    gm.graph.lint()
    gm.recompile()
    inputs = [example_value(p) for p in gm.graph.find_nodes(op="placeholder")]
    with torch.no_grad():
        # the mode of dynamo's values (TracingContext's, which detect_fake_mode prefers, is another)
        mode = next(v.fake_mode for v in inputs if hasattr(v, "fake_mode"))
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*inputs)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
    return rw.info
