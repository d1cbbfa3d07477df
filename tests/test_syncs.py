"""At most one device-to-host read per transformer call, on computed and cached steps alike.

``SyncCounter`` counts the calls that read a tensor's value on the host
(``.item()``, ``.tolist()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``.cpu()``,
``.numpy()``) made from cachec's own code, call by call.
"""
import sys
from pathlib import Path

import pytest
import torch

import cachec
from test_identity import OPTS, inputs, run, schedule
from test_schedule import SHAPE, compile_toy
from toy import ToyDiT

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")
CACHEC = str(Path(cachec.__file__).parent)


class SyncCounter:
    """Counts host reads made by cachec's code while active."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, orig in self.saved.items():
            def counted(t, *args, _orig=orig, **kwargs):
                if sys._getframe(1).f_code.co_filename.startswith(CACHEC):
                    self.count += 1
                return _orig(t, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(torch.Tensor, name, orig)


def per_call_syncs(compiled, ts, xs, names=None) -> list[int]:
    """Host reads of each call of one generation (the model is compiled already);
    with ``names``, calls are named with a step index, as Wan's pipeline does."""
    counts = []
    with SyncCounter() as counter, torch.no_grad():
        for i, t in enumerate(ts):
            for b, x in enumerate(xs):
                before = counter.count
                if names is None:
                    compiled(x, t)
                else:
                    with compiled.cache_context(names[b], step_index=i, num_inference_steps=len(ts)):
                        compiled(x, t)
                counts.append(counter.count - before)
    return counts


GATED = {"residual_diff_threshold": 0.6, "max_continuous_cached_steps": -1}   # the gate decides, on a diff


@pytest.mark.parametrize("dtype, extra", [
    (torch.int64, {}), (torch.bfloat16, {}), (torch.int64, {"enable_taylorseer": True, "taylorseer_order": 2}),
    (torch.bfloat16, GATED), (torch.float32, {**GATED, "enable_taylorseer": True})])
def test_unnamed_calls_read_the_host_at_most_once(dtype, extra):
    _, compiled = compile_toy(**{**OPTS, **extra})
    ts, xs = schedule(dtype, "(B,)", rising=False), inputs(2)
    run(compiled, ts, xs)
    counts = per_call_syncs(compiled, ts, xs)
    s = cachec.summary(compiled)
    assert s.generation == 1 and s.cached_steps and max(counts) == 1, counts


def test_named_calls_with_a_step_index_read_only_for_the_diff():
    """Wan names its calls and gives step_index: warmup and forced steps read nothing;
    a step the gate decides reads the diff, once."""
    _, compiled = compile_toy(**{**OPTS, **GATED})
    ts, xs = schedule(torch.float32, "(B,)", rising=False), inputs(2)
    run(compiled, ts, xs, names=["cond", "uncond"])
    counts = per_call_syncs(compiled, ts, xs, names=["cond", "uncond"])
    s = cachec.summary(compiled)
    assert s.generation == 1 and s.cached_steps
    assert counts[:4] == [0, 0, 0, 0], "warmup steps 0 and 1 need no read at all"
    assert set(counts[4:]) == {1}, counts


class BreakToy(ToyDiT):
    """The timestep embedding graph-breaks, so the blocks' graph never sees the timestep input."""

    def forward(self, hidden_states, timestep):
        temb = self.temb(timestep)
        torch._dynamo.graph_break()
        h = hidden_states
        for block in self.blocks:
            h = block(h, temb)
        return (h,)


def test_a_plain_graph_before_the_chain_adds_no_read():
    torch._dynamo.reset()
    compiled = torch.compile(BreakToy(), backend="cachec", options={"inner_backend": "eager", **OPTS})
    ts, xs = schedule(torch.float32, "(B,)", rising=False), inputs(2)
    run(compiled, ts, xs)
    counts = per_call_syncs(compiled, ts, xs)
    s = cachec.summary(compiled)
    assert "seen in an earlier graph" in s.timestep_input and list(s.branches) == ["cond", "uncond"]
    assert s.computed_steps == [0, 1, 4, 7] and max(counts) == 1, counts


def test_sync_counter_sees_a_read():
    """The counter itself: a read from cachec's code counts, one from elsewhere does not."""
    from cachec.runtime import gate
    with SyncCounter() as counter:
        gate._read([torch.tensor(1.0), torch.tensor(2.0)])
        torch.tensor(3.0).item()
    assert counter.count == 1


def test_cfg_that_stops_partway_costs_one_extra_read_once():
    """The gate measures against the branch it predicts before the timestep is read, from what
    followed the same place last time; when CFG stops one call is predicted wrong and measured
    again, and the calls after it are predicted right."""
    from test_identity import run_cfg_for
    _, compiled = compile_toy(**{**OPTS, **GATED})
    ts, xs = schedule(torch.float32, "(B,)", rising=False), inputs(2)
    run_cfg_for(compiled, ts, xs, cfg_steps=6)
    counts = []
    with SyncCounter() as counter:
        for i, t in enumerate(ts):
            for x in xs if i < 6 else xs[:1]:
                before = counter.count
                run_cfg_for(compiled, [t], [x], cfg_steps=1)
                counts.append(counter.count - before)
    assert counts[:12] == [1] * 12 and sorted(counts[12:]) == [1, 1, 1, 2], counts
