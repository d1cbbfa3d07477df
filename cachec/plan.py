"""The contract between the passes (which cut and compile the graph) and the runtime (which calls it).

Nothing here imports either side: the passes build a ``SplitPlan`` and compile
each segment by the conventions below; the runtime reads the plan and calls the
compiled segments by the same conventions. docs/design.md ("The plan") walks
through them.

Positional conventions of the compiled pieces:

* **gate segment** (the first Fn blocks, one per graph):
  ``run(*segment_inputs, *signal_inputs) -> (*segment_outputs[, residual], sums)``.
  ``residual`` (only when the strategy keeps the Fn residual, ``GateLayout.keeps_residual``)
  is ``hidden_out - hidden_in``, contiguous. ``sums`` is an fp32 ``(K, 2)`` tensor of
  partial sums, one row per signal: ``[sum|reference - current|, sum|reference|]``.
  Partial sums, not ratios, so that ranks that each hold part of the sequence can
  add them before dividing (``ratio``).
* **region, computing** (a gated stretch of blocks or one block):
  ``run(*inputs) -> (*outputs, *residuals)``, one residual ``output - input`` per
  output paired with an input (``Segment.residual_of``), in output order.
* **combination** (a calibrator's cached-step output):
  ``run(out, base, coefs, *terms) -> ()`` writes ``base + sum_k coefs[k] * terms[k]``
  into ``out``; with ``keep=True`` it returns ``(prediction,)``, the sum alone, in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Segment", "SplitPlan", "GateLayout", "split_region_outputs", "l1_sums", "probe_sums", "ratio"]


@dataclass
class Segment:
    # prologue, fn, glue, mid, always, bn or epilogue. Only "mid" segments are
    # gated (the regions). "glue" joins two stretches whose carried shapes differ
    # (text and image tokens concatenated); "always" holds middle blocks whose
    # residual roles could not be proven. Both always run, like the rest.
    kind: str
    blocks: list[str]
    module_name: str = ""                       # submodule name in the split parent
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    # mid segments: for each output, the index of the input it continues (its
    # residual is output - input), or None: no input to pair with, so the output
    # is reused as a value on cached steps
    residual_of: list[Optional[int]] = field(default_factory=list)
    # mid segments: the input and output indices of the hidden-state stream (the
    # one the gate measures), or None where it cannot be followed here
    hidden_in: Optional[int] = None
    hidden_out: Optional[int] = None
    # attention-output regions (PAB): "self" or "cross"; None for regions of blocks
    attention: Optional[str] = None
    # head-group regions (DiTango): (query node name, first head, end head, group index, attention ordinal)
    heads: Optional[tuple] = None


@dataclass
class SplitPlan:
    parent: torch.fx.GraphModule
    segments: list[Segment]
    gate_segment: int          # index of the fn segment whose residual drives the gate
    gate_hidden_name: str      # the node of the hidden states entering block 0 (its input, or inside it)
    gate_hidden_out: Optional[int]   # its output index of the hidden states (None: Fn = 0 and a graph input)
    example_values: dict[str, object]   # original node name -> fake value
    unproven: dict[str, list[str]] = field(default_factory=dict)   # block -> outputs of unproven role
    # regions the probe reaches from the gate, in order: the middle segments whose hidden
    # input is the previous one's hidden output with nothing in between (per-block strategies)
    probe_regions: list[int] = field(default_factory=list)

    @property
    def gate_hidden_in(self) -> Optional[int]:
        """The gate segment's input index of the hidden states entering block 0, or None
        where they are made inside it (the prologue runs there: static shapes)."""
        names = self.segments[self.gate_segment].input_names
        return names.index(self.gate_hidden_name) if self.gate_hidden_name in names else None

    def submodule(self, seg: Segment) -> torch.fx.GraphModule:
        return getattr(self.parent, seg.module_name)

    def example_inputs(self, seg: Segment) -> list:
        return [self.example_values[n] for n in seg.input_names]

    def regions(self) -> list[int]:
        """Indices of the gated segments, in order."""
        return [k for k, s in enumerate(self.segments) if s.kind == "mid"]

    def unpaired(self) -> list[str]:
        """Middle outputs with no input to pair with: reused as values on cached steps."""
        return [o for s in self.segments if s.kind == "mid" for o, j in zip(s.output_names, s.residual_of)
                if j is None]

    def layout(self) -> tuple:
        """What identifies how this graph was cut: graphs cut alike share cached state."""
        return tuple((s.kind, tuple(s.blocks), tuple(s.residual_of)) for s in self.segments)


@dataclass(frozen=True)
class GateLayout:
    """How the gate segment's outputs are laid out (module docstring)."""
    n_outputs: int
    keeps_residual: bool
    # the sums are not fused: the gate computes them after the segment runs (TeaCache under
    # dynamic shapes, where the measured value's shape is known only once it is made)
    eager_sums: bool = False

    def split(self, outs: Sequence) -> tuple[list, Optional[torch.Tensor], torch.Tensor]:
        """(segment outputs, Fn residual or None, partial sums)."""
        n = self.n_outputs
        return list(outs[:n]), (outs[n] if self.keeps_residual else None), outs[-1]


def split_region_outputs(outs: Sequence, n_outputs: int) -> tuple[list, list]:
    """A computing region's (outputs, residuals of the paired ones)."""
    return list(outs[:n_outputs]), list(outs[n_outputs:])


def l1_sums(reference: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``[[sum|reference - current|, sum|reference|]]`` in fp32: one signal's partial sums."""
    r = reference.float()
    return torch.stack([(r - current.float()).abs().sum(), r.abs().sum()]).unsqueeze(0)


def probe_sums(x: torch.Tensor, *pairs: torch.Tensor) -> torch.Tensor:
    """Per-block signals along the trajectory where every block reuses its residual.

    ``pairs`` is ``stored_0, residual_0, stored_1, residual_1, ...``: for block i the
    hidden input it had when it last ran and the residual it stored then. Its probe
    input is ``x_0 = x``, ``x_{i+1} = x_i + residual_i``; row i is
    ``[sum|stored_i - x_i|, sum|stored_i|]`` in fp32. Exact for block i while every
    block before it reuses; see docs/design.md (DBPrune) for why one read per call
    takes this over the block-by-block measurement.
    """
    if not pairs:
        return torch.zeros((0, 2), dtype=torch.float32, device=x.device)
    rows, cur = [], x.float()
    for i in range(0, len(pairs), 2):
        stored, residual = pairs[i].float(), pairs[i + 1]
        rows.append(torch.stack([(stored - cur).abs().sum(), stored.abs().sum()]))
        cur = cur + residual.float()
    return torch.stack(rows)


def ratio(num: float, den: float) -> float:
    """A signal's relative L1 from its partial sums (0 when both are 0)."""
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def forward_of(gm: torch.nn.Module) -> Callable:
    """``gm``'s generated ``forward``, to call without ``nn.Module.__call__`` (hooks, 3-4 us on
    CPU). A lazy graph module generates its code now: its placeholder forward would go back
    through ``__call__`` on every call."""
    recompile = getattr(gm, "real_recompile", None)
    if recompile is not None:
        recompile()
    return gm.forward
