"""Serving: cache state per request, for threads and for requests interleaved in one thread.

The reference for every generation is the same generation run alone on the same
compiled model. The two requests of each test differ in inputs (50x apart) and
in timesteps, and the gate decides on a diff, so a residual, a step count or a
decision leaked from one request into the other changes both the decisions and
the outputs. Threads are driven in lock-step (A's call, then B's, call by call),
so the interleaving that leaks is the one every run exercises.
"""
import copy
import threading

import pytest
import torch
from torch._dynamo.utils import counters

import cachec
import tiny_pipelines as tp
from test_schedule import SHAPE, compile_toy

GATED = dict(residual_diff_threshold=0.3, max_warmup_steps=2, max_continuous_cached_steps=3)
N = 10


def request_inputs(r: int) -> tuple[list, list[torch.Tensor]]:
    """Request r's timesteps and CFG inputs: each request its own of both."""
    hi = 1.0 - 0.1 * r
    ts = [torch.tensor([t]) for t in torch.linspace(hi, 0.05, N).tolist()]
    gen = torch.Generator().manual_seed(100 + r)
    return ts, [torch.randn(SHAPE, generator=gen) * 50 ** b * (1 + r) for b in range(2)]


def calls(ts, xs):
    """The calls of one generation in order: (timestep, input) per step and branch."""
    return [(t, x) for t in ts for x in xs]


def decisions(s: cachec.CacheSummary) -> dict:
    return {n: (b.computed_steps, b.cached_steps, b.residual_diffs) for n, b in s.branches.items()}


def alone(compiled, r: int) -> tuple[list, dict]:
    """Request r run on its own: its outputs and its decisions."""
    cachec.refresh(compiled)
    with torch.no_grad():
        outs = [compiled(x, t)[0] for t, x in calls(*request_inputs(r))]
    return outs, decisions(cachec.summary(compiled))


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def lockstep(jobs: list) -> list:
    """Runs each job (a list of thunks) in its own thread, one thunk at a time in turn:
    job 0's first, job 1's first, job 0's second, ... Returns what each thread returned."""
    turn = threading.Condition()
    state = {"next": 0}
    results, errors = [None] * len(jobs), []

    def work(k: int):
        try:
            out = []
            for thunk in jobs[k]:
                with turn:
                    turn.wait_for(lambda: state["next"] == k)
                try:
                    out.append(thunk())
                finally:
                    with turn:
                        state["next"] = (k + 1) % len(jobs)
                        turn.notify_all()
            results[k] = out
        except BaseException as e:   # reraised in the test
            errors.append(e)
            with turn:
                state["next"] = -1
                turn.notify_all()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    if errors:
        raise errors[0]
    return results


def test_threads_never_share_cache_state():
    model, compiled = compile_toy(**GATED)
    refs = [alone(compiled, r) for r in (0, 1)]
    assert refs[0][1] != refs[1][1], "the test needs requests whose decisions differ"
    graphs = unique_graphs()

    def call(t, x):
        with torch.no_grad():   # grad mode is per thread
            return compiled(x, t)[0]

    def job(r):
        thunks = [lambda t=t, x=x: call(t, x) for t, x in calls(*request_inputs(r))]
        # the thread reads its own summary after its last call
        return thunks + [lambda: decisions(cachec.summary(compiled))]

    for _ in range(2):   # a second round: each thread starts afresh, nothing left from the first
        results = lockstep([job(0), job(1)])
        for r, res in enumerate(results):
            outs, dec = res[:-1], res[-1]
            assert dec == refs[r][1], r
            assert all(torch.equal(a, b) for a, b in zip(outs, refs[r][0])), r
    assert unique_graphs() == graphs


def test_requests_interleave_call_by_call_in_one_thread():
    model, compiled = compile_toy(**GATED)
    refs = [alone(compiled, r) for r in (0, 1)]
    graphs = unique_graphs()
    outs = {0: [], 1: []}
    steps = {r: calls(*request_inputs(r)) for r in (0, 1)}
    with torch.no_grad():
        for i in range(len(steps[0])):
            for r in (0, 1):
                with cachec.request(compiled, f"req{r}"):
                    t, x = steps[r][i]
                    outs[r].append(compiled(x, t)[0])
    for r in (0, 1):
        assert decisions(cachec.summary(compiled, request=f"req{r}")) == refs[r][1]
        with cachec.request(compiled, f"req{r}"):
            assert decisions(cachec.summary(compiled)) == refs[r][1]
        assert all(torch.equal(a, b) for a, b in zip(outs[r], refs[r][0])), r
    assert unique_graphs() == graphs
    # the thread's own state was never touched by the keyed requests: it still holds request 1 alone
    assert decisions(cachec.summary(compiled)) == refs[1][1]


def test_request_scope_opened_before_the_first_call():
    """A request may open before the model has ever compiled: the first call then runs in it."""
    model, compiled = compile_toy(**GATED)
    ts, xs = request_inputs(0)
    with torch.no_grad(), cachec.request(compiled, "first"):
        for t, x in calls(ts, xs):
            compiled(x, t)
    s = cachec.summary(compiled, request="first")
    assert s.calls == 2 * N and list(s.branches) == ["cond", "uncond"]


@pytest.mark.parametrize("bad", [None, ["unhashable"]])
def test_request_key_must_be_hashable(bad):
    model, compiled = compile_toy(**GATED)
    with pytest.raises(ValueError, match="hashable"):
        with cachec.request(compiled, bad):
            pass


def held_bytes(compiled) -> int:
    """Bytes of tensor storage reachable from cachec's request states of ``compiled``,
    each storage counted once. Walks cachec's runtime objects and Python containers
    (not modules or compiled graphs, which are the model's own)."""
    from cachec.backend import _find_state
    seen, storages = set(), {}
    todo = list(_find_state(compiled).states())
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(obj, dict):
            todo += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo += list(obj)
        elif type(obj).__module__.startswith("cachec.runtime") and hasattr(obj, "__dict__"):
            todo += list(vars(obj).values())
    return sum(storages.values())


def test_memory_of_finished_requests_is_released():
    """1,000 keyed requests with a known step count: their buffers go at their last call,
    their states when the next request opens; nothing grows."""
    model, compiled = compile_toy(num_inference_steps=4, **GATED)
    ts, xs = request_inputs(0)
    ts = ts[:4]
    held = {}
    with torch.no_grad():
        for k in range(1000):
            with cachec.request(compiled, k):
                for t, x in calls(ts, xs):
                    compiled(x, t)
            if k + 1 in (10, 1000):
                held[k + 1] = held_bytes(compiled)
    assert held[10] == held[1000] == 0
    from cachec.backend import _find_state
    assert len(_find_state(compiled).requests) == 1
    s = cachec.summary(compiled, request=999)   # the last request's summary survives its release
    assert s.calls == 8 and s.branches["cond"].computed_steps


def test_thread_state_holds_one_generation_and_release_frees_it():
    """Without a known step count a thread keeps one generation's buffers (the next
    generation replaces them); ``cachec.release`` frees them and the summary stays."""
    model, compiled = compile_toy(**GATED)
    ts, xs = request_inputs(0)
    held = {}
    with torch.no_grad():
        for k in range(100):
            cachec.refresh(compiled)
            for t, x in calls(ts[:3], xs):
                compiled(x, t)
            if k + 1 in (10, 100):
                held[k + 1] = held_bytes(compiled)
    assert held[10] == held[100] > 0
    before = decisions(cachec.summary(compiled))
    cachec.release(compiled)
    assert held_bytes(compiled) == 0
    assert decisions(cachec.summary(compiled)) == before
    with pytest.raises(KeyError, match="no open request"):
        cachec.release(compiled, request="never-opened")


def test_real_pipeline_frees_buffers_before_the_vae_decodes():
    """Wan's pipeline names each call with its step index and step count: the buffers go
    with the last transformer call, before the VAE decodes; the summary stays."""
    pipe = tp.build_wan_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="cachec", options={"inner_backend": "eager",
                                                                                  **GATED})
    at_decode = []
    decode = pipe.vae.decode

    def watched(*args, **kwargs):
        at_decode.append(held_bytes(pipe.transformer))
        return decode(*args, **kwargs)
    pipe.vae.decode = watched
    tp.generate(pipe, 8)
    assert at_decode == [0]
    s = cachec.summary(pipe.transformer)
    assert s.steps == 8 and s.branches["cond"].cached_steps


def test_threads_through_a_real_pipeline():
    """Two FLUX pipelines share one compiled transformer (each has its own scheduler: a
    diffusers scheduler holds the state of the call it serves). Run in two threads, each
    equals its generation run alone, decisions and image."""
    pipe = tp.build_flux_pipeline(dtype=torch.float32)
    pipe.transformer = torch.compile(pipe.transformer, backend="cachec",
                                     options={"inner_backend": "eager", "residual_diff_threshold": 0.2,
                                              "max_warmup_steps": 2})
    other = type(pipe)(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    prompts = {0: dict(prompt="a cat", seed=0), 1: dict(prompt="a dog on a red carpet", seed=5)}

    def one(p, r):
        img = tp.generate(p, 8, seed=prompts[r]["seed"], prompt=prompts[r]["prompt"])
        return img, decisions(cachec.summary(p.transformer))

    refs = [one(pipe, 0), one(other, 1)]
    assert refs[0][1] != refs[1][1]
    graphs = unique_graphs()
    results, errors = [None, None], []

    def work(p, r):
        try:
            results[r] = one(p, r)
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(p, r)) for r, p in enumerate((pipe, other))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    for r in (0, 1):
        assert results[r][1] == refs[r][1], r
        assert torch.equal(results[r][0], refs[r][0]), r
    assert unique_graphs() == graphs


def test_many_open_requests_warn_once_and_release_by_key():
    """Requests whose end is unknown stay open: past 256 of them cachec says so, once."""
    model, compiled = compile_toy(**GATED)
    ts, xs = request_inputs(0)
    with torch.no_grad():
        compiled(xs[0], ts[0])   # the thread's own request
    own = held_bytes(compiled)
    with pytest.warns(cachec.CachecWarning, match="257 requests are open"):
        for k in range(300):
            with cachec.request(compiled, k):
                compiled(xs[0], ts[0])
    from cachec.backend import _find_state
    state = _find_state(compiled)
    assert len(state.requests) == 300 and held_bytes(compiled) > own > 0
    for k in range(300):
        cachec.release(compiled, request=k)
    assert not state.requests and held_bytes(compiled) == own
