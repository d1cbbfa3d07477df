"""A toy DiT whose every output can be worked out by hand.

Block i adds ``w[i] * temb(t)`` to the hidden states, with ``temb(t) =
sin(t * freqs)``: the residual of any run of blocks is the sum of their
weights times ``temb(t)``, so the output of a cached step is known exactly.
"""
import torch


class AddBlock(torch.nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, hidden_states, temb):
        return hidden_states + self.w * temb


class ToyDiT(torch.nn.Module):
    def __init__(self, n_blocks: int = 4, dim: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.linspace(1.0, 3.0, dim))
        self.blocks = torch.nn.ModuleList([AddBlock(float(i + 1)) for i in range(n_blocks)])

    def temb(self, timestep):
        return torch.sin(timestep[:, None, None] * self.freqs)

    def forward(self, hidden_states, timestep):
        temb = self.temb(timestep)
        h = hidden_states
        for block in self.blocks:
            h = block(h, temb)
        return (h,)


def expected_output(model: ToyDiT, x, t: float, t_computed: float, Fn: int, Bn: int, cached: bool):
    """One call: Fn and Bn blocks at t; the middle at t, or its residual from ``t_computed``."""
    ws = [b.w.item() for b in model.blocks]
    n = len(ws)
    temb = lambda s: model.temb(torch.tensor([s]))
    mid_t = t_computed if cached else t
    return x + (sum(ws[:Fn]) + sum(ws[n - Bn:])) * temb(t) + sum(ws[Fn:n - Bn]) * temb(mid_t)


def relative_l1(prev, cur) -> float:
    return ((prev - cur).abs().mean() / prev.abs().mean()).item()
