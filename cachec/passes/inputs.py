"""Classify the placeholders of a dynamo graph."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

_SIN_COS = {torch.sin, torch.cos, torch.ops.aten.sin.default, torch.ops.aten.cos.default}


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def input_name(node: fx.Node) -> str:
    """``l_kwargs_hidden_states_`` -> ``hidden_states`` (the name the user passed)."""
    name = re.sub(r"^l_", "", node.name).rstrip("_")
    return re.sub(r"^(kwargs|args)_", "", name)


def is_module_state(node: fx.Node) -> bool:
    """Parameters and buffers that dynamo lifted to placeholders."""
    return node.name.startswith("l_self_") or isinstance(example_value(node), torch.nn.Parameter)


@dataclass
class GraphInputs:
    placeholders: list[fx.Node]
    user_inputs: list[int] = field(default_factory=list)    # placeholder indices of user tensors
    latent: int | None = None                                 # placeholder index of the latent tokens
    timestep_candidates: list[int] = field(default_factory=list)

    def name(self, index: int) -> str:
        return input_name(self.placeholders[index])


def static_tensor(value) -> bool:
    """A tensor whose sizes and strides are plain ints (no SymInt: not ``dynamic=True``)."""
    return isinstance(value, torch.Tensor) and not any(
        isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride()))


def same_size(a, b) -> bool:
    """Two sizes, ints or SymInts, known equal without adding a guard."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:   # sizes of unrelated symbolic expressions
        return False


def _feeds_sinusoid(node: fx.Node, limit: int = 400) -> bool:
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            if u.target in _SIN_COS or (u.op == "call_method" and u.target in ("sin", "cos")):
                return True
            seen.add(u)
            todo.append(u)
    return False


def find_graph_inputs(gm: fx.GraphModule) -> GraphInputs:
    """Find the latent input and the timestep candidates among the placeholders.

    Guarantees: ``latent`` is the placeholder named ``hidden_states`` if there is
    one, else the first user tensor of rank >= 2. ``timestep_candidates`` are the
    other user inputs that feed a sin/cos (the sinusoidal embedding), of any dtype
    but bool (int64 from UniPC / DPM-Solver pipelines) and shaped (), (B,), (B, 1)
    or (B, seq_len) with B the latent's batch (so not RoPE position ids, shaped
    (seq, 3)). A ``guidance`` input matches too; the runtime tells them apart by
    which one changes from step to step.
    """
    ph = list(gm.graph.find_nodes(op="placeholder"))
    gi = GraphInputs(ph)
    for i, n in enumerate(ph):
        v = example_value(n)
        if isinstance(v, torch.Tensor) and not is_module_state(n):
            gi.user_inputs.append(i)
    by_name = {gi.name(i): i for i in gi.user_inputs}
    if "hidden_states" in by_name:
        gi.latent = by_name["hidden_states"]
    else:
        gi.latent = next((i for i in gi.user_inputs if example_value(ph[i]).dim() >= 2), None)
    batch = example_value(ph[gi.latent]).shape[0] if gi.latent is not None else None
    for i in gi.user_inputs:
        v = example_value(ph[i])
        per_batch = v.dim() < 2 or (v.dim() == 2 and same_size(v.shape[0], batch))   # not RoPE ids (seq, 3)
        if i != gi.latent and per_batch and v.dtype != torch.bool and _feeds_sinusoid(ph[i]):
            gi.timestep_candidates.append(i)
    # a name that says "time" goes first; the runtime switches if another one moves instead
    gi.timestep_candidates.sort(key=lambda i: "time" not in gi.name(i) and "sigma" not in gi.name(i))
    return gi


def reads_back(node: fx.Node) -> bool:
    """Whether ``node`` reads a Python number back from a tensor (``.item()``; ``dynamic=True`` hands
    norm eps and RoPE theta over as tensors read this way)."""
    return getattr(node.target, "__name__", str(node.target)) in ("item", "_local_scalar_dense")


def reads_scalar(node: fx.Node) -> bool:
    """Whether ``node`` reads a Python number back from a tensor (``reads_back``) or makes a
    symbolic number. A compiled segment may take such a value as an input (a symbol), but not
    make it and use it inside."""
    return reads_back(node) or isinstance(example_value(node), (torch.SymInt, torch.SymFloat, torch.SymBool))
