"""DBCache on an eager diffusers model, by forward hooks, with decisions of its own.

The reference for cachec's cached steps on real models, independent of
cachec's graph rewrite and of its decisions:

- a pre-hook on the first chained block notes the hidden states it takes;
- a pre-hook on the first middle block (block ``Fn``) measures the residual of
  the first ``Fn`` blocks, ``R = hidden_in(Fn) - hidden_in(0)``, and decides as
  cache-dit's DBCache does (warmup, nothing cached yet, max continuous cached
  steps, threshold; ``diff = sum|R_prev - R| / sum|R_prev|``, fp32);
- the middle's residuals are stored and reused **by the names the blocks are
  called with** (``hidden_states``, ``encoder_hidden_states``): a pre-hook on
  the block after the middle stores ``its_input[name] - middle_input[name]``
  on computed steps and replaces its inputs by ``middle_input[name] +
  stored[name]`` on cached ones. When the middle runs to the end of the chain
  there is no such block: its last block's outputs are then matched to the
  middle's inputs by shape, which the caller must keep unambiguous.
"""
from __future__ import annotations

import inspect

import torch


def _named(module: torch.nn.Module, args, kwargs) -> dict:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {k: v for k, v in bound.arguments.items() if torch.is_tensor(v)}


def _rebuild(module: torch.nn.Module, args, kwargs, new: dict):
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.arguments.update(new)
    return bound.args, bound.kwargs


def _rel_l1(prev, cur) -> float:
    p = prev.float()
    return float((p - cur.float()).abs().sum() / p.abs().sum())


class HookedDBCache:
    """Runs ``model`` eagerly with DBCache applied by hooks; call ``step(step, branch)`` before
    each transformer call. ``computed[branch]`` lists the steps it computed."""

    def __init__(self, model, chain: list[str], Fn: int, Bn: int, threshold: float, max_warmup_steps: int,
                 max_continuous_cached_steps: int = -1):
        self.model, self.Fn = model, Fn
        self.threshold, self.warmup, self.max_cont = threshold, max_warmup_steps, max_continuous_cached_steps
        self.computed: dict = {}
        self.branch, self.now = None, 0
        self.state: dict = {}
        blocks = [model.get_submodule(name) for name in chain]
        first, mid_first, mid_last = blocks[0], blocks[Fn], blocks[len(blocks) - Bn - 1]
        self.handles = [first.register_forward_pre_hook(self._take_hidden, with_kwargs=True),
                        mid_first.register_forward_pre_hook(self._decide, with_kwargs=True)]
        if Bn:
            self.handles.append(blocks[len(blocks) - Bn].register_forward_pre_hook(self._after_middle, with_kwargs=True))
        else:
            self.handles.append(mid_last.register_forward_hook(self._last_outputs))

    def step(self, step: int, branch: str) -> None:
        self.now, self.branch = step, branch
        b = self.state.setdefault(branch, {"R": None, "cont": 0, "res": None})
        b["call"] = {}

    def remove(self):
        for h in self.handles:
            h.remove()

    def _b(self):
        return self.state[self.branch]

    def _take_hidden(self, mod, args, kwargs):
        self._b()["call"]["h0"] = _named(mod, args, kwargs)["hidden_states"]

    def _decide(self, mod, args, kwargs):
        b, s = self._b(), self.now
        ins = _named(mod, args, kwargs)
        R = ins["hidden_states"] - b["call"]["h0"]
        if s < self.warmup or b["res"] is None:
            compute = True
        elif 0 <= self.max_cont <= b["cont"]:
            compute = True
        elif self.threshold >= 1:
            compute = False
        else:
            compute = self.threshold <= 0 or _rel_l1(b["R"], R) >= self.threshold
        if compute:
            b["R"], b["cont"] = R, 0
            self.computed.setdefault(self.branch, []).append(s)
        else:
            b["cont"] += 1
        b["call"].update(compute=compute, mid_in=ins)

    def _after_middle(self, mod, args, kwargs):
        b = self._b()
        mid_in, ins = b["call"]["mid_in"], _named(mod, args, kwargs)
        names = [n for n in ins if n in mid_in and ins[n].shape == mid_in[n].shape]
        if b["call"]["compute"]:
            b["res"] = {n: ins[n] - mid_in[n] for n in names}
            return None
        return _rebuild(mod, args, kwargs, {n: mid_in[n] + b["res"][n] for n in names})

    def _last_outputs(self, mod, args, out):
        b = self._b()
        outs = out if isinstance(out, tuple) else (out,)
        mid_in = b["call"]["mid_in"]
        pairs = []
        for o in outs:
            same = [n for n, x in mid_in.items() if torch.is_tensor(o) and x.shape == o.shape]
            assert len(same) <= 1, f"outputs pair ambiguously by shape with {same}: give the reference a Bn block"
            pairs.append(same[0] if same else None)
        if b["call"]["compute"]:
            b["res"] = [o if n is None else o - mid_in[n] for o, n in zip(outs, pairs)]
            return None
        new = tuple(r if n is None else mid_in[n] + r for r, n in zip(b["res"], pairs))
        return new if isinstance(out, tuple) else new[0]
