"""A toy DiT whose every output can be worked out by hand.

Block i computes ``h + w[i] * (temb(t) + h / 10)`` with ``temb(t) = sin(t * freqs)``:
its residual depends on the hidden states as well as on ``t``, so a residual
leaked from another CFG branch, generation or role changes the output.
``reference_outputs`` restates DBCache eagerly on these blocks for a given
list of computed steps: the reference every schedule test compares with.

The toy takes a timestep of any dtype and of shape (), (B,), (B, 1) or
(B, tokens) (per-token, as Wan 2.2 TI2V passes it), and is a diffusers
``CacheMixin``, so tests can name its calls with ``cache_context`` as pipelines do.
"""
import math

import torch
from diffusers.models.cache_utils import CacheMixin


class AddBlock(torch.nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, hidden_states, temb):
        return hidden_states + self.w * (temb + 0.1 * hidden_states)


class ToyDiT(torch.nn.Module, CacheMixin):
    def __init__(self, n_blocks: int = 4, dim: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.linspace(1.0, 3.0, dim))
        self.blocks = torch.nn.ModuleList([AddBlock(float(i + 1)) for i in range(n_blocks)])

    def temb(self, timestep):
        t = timestep.float().reshape(timestep.shape[0] if timestep.dim() else 1, -1, 1)
        return torch.sin(t * self.freqs)

    def forward(self, hidden_states, timestep):
        temb = self.temb(timestep)
        h = hidden_states
        for block in self.blocks:
            h = block(h, temb)
        return (h,)


def _run(blocks, h, temb):
    for b in blocks:
        h = b(h, temb)
    return h


def fn_residual(model: ToyDiT, x, t, Fn: int = 1) -> torch.Tensor:
    """What the gate measures: the first Fn blocks' output minus their input."""
    with torch.no_grad():
        return _run(model.blocks[:Fn], x, model.temb(_t(t))) - x


def _t(t):
    return t if torch.is_tensor(t) else torch.tensor([t])


def reference_outputs(model: ToyDiT, x, ts, computed, Fn=1, Bn=0, order=0):
    """DBCache on the toy, eagerly, for one branch with input ``x`` at every step.

    The first ``Fn`` and last ``Bn`` blocks always run. On a computed step the
    middle runs and its residual (output - input) is stored; on any other step
    the middle's output is its input plus the stored residual, or with
    TaylorSeer (``order`` >= 1) plus ``sum_i d[i] k^i / i!`` over the
    derivative table ``d[i+1] = (d[i]_new - d[i]_old) / n``, taken from step 3 on as
    cache-dit does (docs/design.md, "Calibrators").
    """
    n = len(model.blocks)
    first, mid, last = model.blocks[:Fn], model.blocks[Fn:n - Bn], model.blocks[n - Bn:]
    outs, table, last_computed = [], [], None
    with torch.no_grad():
        for s, t in enumerate(ts):
            temb = model.temb(_t(t))
            h = _run(first, x, temb)
            if s in computed:
                out = _run(mid, h, temb)
                new = [out - h]
                for i in range(min(order, len(table)) if s >= 3 else 0):
                    new.append((new[i] - table[i]) / (s - last_computed))
                table, last_computed = new, s
            else:
                k = s - last_computed
                out = h + sum(d * k ** i / math.factorial(i) for i, d in enumerate(table))
            outs.append(_run(last, out, temb))
    return outs


def relative_l1(prev, cur) -> float:
    return ((prev - cur).abs().mean() / prev.abs().mean()).item()
