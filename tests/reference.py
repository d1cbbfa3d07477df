"""DBCache on an eager diffusers model, by forward hooks, with decisions of its own.

The reference for cachec's cached steps on real models, independent of
cachec's graph rewrite and of its decisions:

- a pre-hook on the first chained block notes the hidden states it takes;
- a pre-hook on the first middle block (block ``Fn``) measures the residual of
  the first ``Fn`` blocks, ``R = hidden_in(Fn) - hidden_in(0)``, and decides as
  cache-dit's DBCache does (warmup, nothing cached yet, max continuous cached
  steps, threshold; ``diff = sum|R_prev - R| / sum|R_prev|``, fp32);
- each run of middle blocks (one, or one per stretch where text and image
  tokens are joined between them) stores and reuses its residuals **by the
  names the blocks are called with** (``hidden_states``,
  ``encoder_hidden_states``): a pre-hook on the block right after the run
  stores ``its_input[name] - run_input[name]`` on computed steps and replaces
  its inputs by ``run_input[name] + stored[name]`` on cached ones. Where no
  block follows the run directly (the chain ends, or glue joins two stretches),
  the run's last block's outputs are matched to the run's inputs by shape,
  which the caller must keep unambiguous.
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
    each transformer call. ``computed[branch]`` lists the steps it computed.

    ``runs`` lists the middle runs as ``(first block, last block, block right after or None)``;
    by default one run from block ``Fn`` to the block before the last ``Bn``.
    """

    def __init__(self, model, chain: list[str], Fn: int, Bn: int, threshold: float, max_warmup_steps: int,
                 max_continuous_cached_steps: int = -1, runs=None):
        self.model = model
        self.threshold, self.warmup, self.max_cont = threshold, max_warmup_steps, max_continuous_cached_steps
        self.computed: dict = {}
        self.branch, self.now = None, 0
        self.state: dict = {}
        if runs is None:
            n = len(chain)
            runs = [(chain[Fn], chain[n - Bn - 1], chain[n - Bn] if Bn else None)]
        block = model.get_submodule
        self.handles = [block(chain[0]).register_forward_pre_hook(self._take_hidden, with_kwargs=True),
                        block(chain[Fn]).register_forward_pre_hook(self._decide, with_kwargs=True)]
        for k, (first, last, after) in enumerate(runs):
            self.handles.append(block(first).register_forward_pre_hook(self._run_input(k), with_kwargs=True))
            if after is not None:
                self.handles.append(block(after).register_forward_pre_hook(self._after_run(k), with_kwargs=True))
            else:
                self.handles.append(block(last).register_forward_hook(self._last_outputs(k)))

    @classmethod
    def like(cls, model, summary, threshold, max_warmup_steps, max_continuous_cached_steps=-1):
        """The middle runs cachec's summary reports (its plan, not its decisions)."""
        chain, segs = summary.blocks, [(k, b) for k, b in summary.segments if k != "prologue"]
        runs = []
        for i, (kind, blocks) in enumerate(segs):
            if kind == "mid":
                nxt = segs[i + 1] if i + 1 < len(segs) else ("epilogue", [])
                runs.append((blocks[0], blocks[-1], nxt[1][0] if nxt[1] else None))
        return cls(model, chain, summary.Fn, summary.Bn, threshold, max_warmup_steps, max_continuous_cached_steps, runs)

    def step(self, step: int, branch: str) -> None:
        self.now, self.branch = step, branch
        b = self.state.setdefault(branch, {"R": None, "cont": 0, "res": {}})
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
        R = _named(mod, args, kwargs)["hidden_states"] - b["call"]["h0"]
        if s < self.warmup or not b["res"]:
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
        b["call"]["compute"] = compute

    def _run_input(self, k):
        def hook(mod, args, kwargs):
            self._b()["call"][k] = _named(mod, args, kwargs)
        return hook

    def _after_run(self, k):
        def hook(mod, args, kwargs):
            b = self._b()
            run_in, ins = b["call"][k], _named(mod, args, kwargs)
            names = [n for n in ins if n in run_in and ins[n].shape == run_in[n].shape]
            if b["call"]["compute"]:
                b["res"][k] = {n: ins[n] - run_in[n] for n in names}
                return None
            return _rebuild(mod, args, kwargs, {n: run_in[n] + b["res"][k][n] for n in names})
        return hook

    def _last_outputs(self, k):
        def hook(mod, args, out):
            b = self._b()
            outs = out if isinstance(out, tuple) else (out,)
            run_in = b["call"][k]
            pairs = []
            for o in outs:
                same = [n for n, x in run_in.items() if torch.is_tensor(o) and x.shape == o.shape]
                assert len(same) <= 1, f"outputs pair ambiguously by shape with {same}: give the run a next block"
                pairs.append(same[0] if same else None)
            if b["call"]["compute"]:
                b["res"][k] = [o if n is None else o - run_in[n] for o, n in zip(outs, pairs)]
                return None
            new = tuple(r if n is None else run_in[n] + r for r, n in zip(b["res"][k], pairs))
            return new if isinstance(out, tuple) else new[0]
        return hook


class HookedDBPrune:
    """DBPrune restated eagerly on any model: each middle block's forward is wrapped.

    ``returns(block)`` names what the block returns, in order: "h" (continues its
    ``hidden_states`` input), "e" (continues ``encoder_hidden_states``) or "v" (a
    value made inside, reused as it was). Before the first middle block runs, each
    middle block i gets its signal from the probe ``x_0`` = that block's hidden input,
    ``x_{i+1} = x_i + R_i`` (R: the hidden residual it stored), against the hidden
    input it stored, ``sum|s_i - x_i| / sum|s_i|``; a block skips when the signal is
    under ``threshold`` and it has not been skipped ``max_continuous`` times in a row.
    Warmup steps and a branch's first step run every block. ``ran[branch][step]``
    lists the middle blocks that ran.
    """

    def __init__(self, model, chain: list[str], Fn: int, Bn: int, threshold: float, warmup: int,
                 max_continuous: int, returns):
        self.model, self.threshold, self.warmup, self.max_cont = model, threshold, warmup, max_continuous
        self.middle = chain[Fn:len(chain) - Bn]
        self.returns = returns
        self.ran: dict = {}
        self.state: dict = {}
        self.branch, self.now = None, 0
        self.originals = {}
        for name in self.middle:
            block = model.get_submodule(name)
            self.originals[name] = block.forward
            block.forward = self._wrapped(name, block.forward)

    def step(self, step: int, branch: str) -> None:
        self.now, self.branch = step, branch

    def remove(self) -> None:
        for name, fwd in self.originals.items():
            self.model.get_submodule(name).forward = fwd

    @staticmethod
    def _args(fwd, args, kwargs) -> dict:
        import inspect
        return inspect.signature(fwd).bind(*args, **kwargs).arguments

    def _decide(self, x: torch.Tensor) -> set:
        st = self.state.setdefault(self.branch, {})
        if self.now < self.warmup or not st:
            return set()
        skip, probe = set(), x.float()
        for name in self.middle:
            s = st.get(name)
            if s is None:
                continue
            d = float((s["input"].float() - probe).abs().sum() / s["input"].float().abs().sum())
            if d < self.threshold and not (0 <= self.max_cont <= s["continuous"]):
                skip.add(name)
            probe = probe + s["residual"]["h"].float()
        return skip

    def _wrapped(self, name, fwd):
        def forward(*args, **kwargs):
            a = self._args(fwd, args, kwargs)
            roles = self.returns(name)
            if name == self.middle[0]:
                self.skip = self._decide(a["hidden_states"])
                self.ran.setdefault(self.branch, {})[self.now] = []
            st = self.state[self.branch]
            inputs = {"h": a["hidden_states"], "e": a.get("encoder_hidden_states")}
            if name in self.skip:
                s = st[name]
                s["continuous"] += 1
                outs = [s["values"][k] if r == "v" else inputs[r] + s["residual"][r] for k, r in enumerate(roles)]
            else:
                self.ran[self.branch][self.now].append(name)
                out = fwd(*args, **kwargs)
                outs = list(out) if isinstance(out, tuple) else [out]
                st[name] = {"input": inputs["h"], "continuous": 0,
                            "residual": {r: o - inputs[r] for r, o in zip(roles, outs) if r != "v"},
                            "values": {k: o for k, (r, o) in enumerate(zip(roles, outs)) if r == "v"}}
            return tuple(outs) if len(outs) > 1 else outs[0]
        return forward
