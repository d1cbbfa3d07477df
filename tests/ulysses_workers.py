"""What each rank runs in the Ulysses tests (tests/test_ulysses.py) and bench/ulysses.py.

``spawn(jobs, world)`` starts ``world`` processes with the gloo backend on CPU; each
runs every job ``(key, function name, kwargs)`` in order, as ``fn(rank, world, **kwargs)``,
and the results come back per rank: ``results[rank][key]``. Jobs run in one process
group, so a job whose collectives did not pair up shows as a timeout, never a hang.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_models import _image_ids, _randn, build  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, jobs: list) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for key, name, kwargs in jobs:
            torch._dynamo.reset()
            try:
                results[key] = globals()[name](rank, world, **kwargs)
            except Exception as e:   # reported per job: a test asserts on it
                results[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        torch.save(results, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(jobs: list, world: int = 2, timeout: float = 900.0) -> list[dict]:
    """Run ``jobs`` on ``world`` gloo ranks; returns each rank's results."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), out, jobs), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"the {world} ranks did not finish {[j[0] for j in jobs]} in {timeout} s")
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]


def case_for(model: str, uneven: bool, dtype: torch.dtype = torch.float32):
    """The tiny test model, at token counts a 2-rank group splits evenly, or not (``uneven``)."""
    case = build(model)
    case.model.to(dtype)
    if not uneven:
        return case
    if model == "flux":   # 7 text and 49 image tokens
        return dataclasses.replace(
            case, latent_shape=(49, 16),
            conditioning=lambda b, g: {"encoder_hidden_states": _randn(g, b, 7, 32), "pooled_projections": _randn(g, b, 32)},
            extras=lambda b: {"img_ids": _image_ids(7, 7), "txt_ids": torch.zeros(7, 3), "guidance": torch.full((b,), 3.5)})
    if model == "wan":    # 3 frames of 3x3 patches: 27 tokens
        return dataclasses.replace(case, latent_shape=(4, 3, 6, 6))
    raise ValueError(model)


def _tokens(latent: torch.Tensor) -> int:
    return latent.shape[1] if latent.dim() == 3 else latent[0, 0].numel() // 4


def _token_index(latent: torch.Tensor) -> torch.Tensor:
    """Each latent element's token position: packed [B, tokens, C], or [B, C, F, H, W]
    under Wan's (1, 2, 2) patches."""
    if latent.dim() == 3:
        return torch.arange(latent.shape[1])[None, :, None]
    F, H, W = latent.shape[2:]
    f, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    return f * (H // 2) * (W // 2) + (h // 2) * (W // 2) + w // 2


def schedule(case, steps: int, dtype: torch.dtype = torch.float32, focus: bool = False) -> list[dict]:
    """The inputs of ``steps`` calls, fixed in advance (no feedback from the outputs, so
    two runs see the same inputs and their outputs compare call by call). The latent
    drifts from step to step; with ``focus`` the drift of every other step falls on
    the last half of the image tokens only (what rank 1 holds), so the two ranks'
    own measurements of the change straddle a threshold that their sum does not."""
    kw0 = case.inputs(1.0)
    latent = kw0[case.latent_key]
    gen = torch.Generator().manual_seed(7)
    calls = []
    for k in range(steps):
        t = 1.0 - k * (0.02 if focus else 1 / steps)
        drift = torch.randn(latent.shape, generator=gen)
        if focus and k % 2 == 1:
            drift *= 0.6 * (_token_index(latent) >= _tokens(latent) // 2)
        else:
            drift *= 0.02 if focus else 0.1
        latent = latent + drift
        kw = case.with_latent(case.inputs(t), latent)
        calls.append({k2: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k2, v in kw.items()})
    return calls


def trajectory(rank: int, world: int, model: str, uneven: bool = False, options: dict | None = None,
               steps: int = 3, compiled: bool = True, focus: bool = False, dtype: str = "float32",
               bad_timestep_at: int | None = None, own_group: bool = False, count_syncs: bool = False) -> dict:
    """Run the schedule through the model (uncompiled, or compiled with ``options``);
    returns the outputs, the cache summary and each gate read's local partial sums."""
    import cachec
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    case = case_for(model, uneven, dt)
    calls = schedule(case, steps, dt, focus)
    if bad_timestep_at is not None and rank == world - 1:   # this rank's pipeline went astray
        calls[bad_timestep_at][case.timestep_key] = calls[bad_timestep_at][case.timestep_key] + 0.5
    local = []
    real_all_reduce = dist.all_reduce

    def recording(tensor, *a, **k):   # the gate's partial sums as this rank measured them
        local.append(tensor[:2].tolist())
        return real_all_reduce(tensor, *a, **k)

    if own_group:   # a group object of its own, not the default one (a process group does not pickle)
        options = {**options, "ulysses_group": dist.new_group(list(range(world)))}
    m = torch.compile(case.model, backend="cachec", options=options) if compiled else case.model
    from test_syncs import SyncCounter
    outs, syncs = [], []
    dist.all_reduce = recording
    # cachec's host reads, call by call (opt in: dynamo would trace the counting wrappers of a
    # model that reads tensors itself, HiDream's .numpy() router)
    counting = SyncCounter() if count_syncs else contextlib.nullcontext(SimpleNamespace(count=0))
    try:
        with torch.no_grad(), counting as reads:
            for kw in calls:
                before = reads.count
                outs.append(case.latent_of(m(**kw)).float())
                syncs.append(reads.count - before)
    finally:
        dist.all_reduce = real_all_reduce
    result = {"outs": outs, "local": local, "syncs": syncs}
    if compiled and (options or {}).get("flexcache", 0) is not None:
        s = cachec.summary(m)
        result["computed"], result["cached"] = list(s.computed_steps), list(s.cached_steps)
        result["ulysses"] = s.ulysses
    return result


def bench_model(dtype: torch.dtype = torch.bfloat16):
    """bench/ulysses.py's model: FLUX-shaped (2 double + 4 single blocks) at FLUX's head width
    (2 heads of 128), 256 image and 32 text tokens, in ``dtype``; and its inputs at time ``t``."""
    import diffusers
    from tiny_models import _seeded
    model = _seeded(diffusers.FluxTransformer2DModel, patch_size=1, in_channels=16, num_layers=2,
                    num_single_layers=4, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64,
                    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).to(dtype)
    gen = torch.Generator().manual_seed(0)
    base = dict(hidden_states=torch.randn(1, 256, 16, generator=gen), encoder_hidden_states=torch.randn(
        1, 32, 64, generator=gen), pooled_projections=torch.randn(1, 32, generator=gen))

    def inputs(t: float) -> dict:
        kw = {k: (v + 0.01 * t * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
        return dict(kw, timestep=torch.full((1,), t, dtype=dtype), img_ids=_image_ids(16, 16),
                    txt_ids=torch.zeros(32, 3), guidance=torch.full((1,), 3.5, dtype=dtype), return_dict=False)
    return model, inputs


def ulysses_cost(rank: int, world: int, comm: str, inner: str = "inductor", steps: int = 6) -> dict:
    """Bytes this rank sends through Ulysses' all-to-alls per transformer call, seconds per
    call and the outputs, on ``bench_model`` (bench/ulysses.py); world 1 runs without Ulysses."""
    from cachec.parallel import ulysses as U
    sent, waited = [0], [0.0]
    real = U._exchange

    def counting(out, inp, pg):   # the chunk a rank addresses to itself does not cross
        sent[0] += inp.numel() * inp.element_size() * (world - 1) // world
        start = time.perf_counter()
        real(out, inp, pg)
        waited[0] += time.perf_counter() - start

    model, inputs = bench_model()
    options = {"flexcache": None, "inner_backend": inner}
    if world > 1:
        options.update(ulysses_size=world, ulysses_comm=comm)
    m = torch.compile(model, backend="cachec", options=options)
    calls = [inputs(1.0 - k / (steps + 2)) for k in range(steps + 2)]
    U._exchange = counting
    try:
        with torch.no_grad():
            start = time.perf_counter()
            m(**calls[0])
            compile_s = time.perf_counter() - start
            m(**calls[1])
            sent[0], waited[0], times, outs = 0, 0.0, [], []
            for kw in calls[2:]:
                dist.barrier()
                start = time.perf_counter()
                outs.append(m(**kw)[0].float())
                times.append(time.perf_counter() - start)
    finally:
        U._exchange = real
    times.sort()
    return {"bytes": sent[0] / steps, "seconds": times[len(times) // 2], "compile": compile_s, "outs": outs,
            "exchange": waited[0] / steps}


def pipeline_run(rank: int, world: int, name: str, options: dict | None = None, steps: int = 6) -> dict:
    """A tiny diffusers pipeline, called unchanged, with its transformer compiled with
    ``options`` (None: uncompiled); returns the output and each branch's decisions."""
    import cachec
    import tiny_pipelines as P
    pipe = {"wan": P.build_wan_pipeline, "flux": P.build_flux_pipeline, "pixart": P.build_pixart_sigma_pipeline,
            "sd3": P.build_sd3_pipeline, "qwenimage": P.build_qwenimage_pipeline}[name]()
    if options is not None:
        pipe.transformer = torch.compile(pipe.transformer, backend="cachec", options=options)
    with torch.no_grad():
        out = P.generate(pipe, steps)
    result = {"out": out}
    if options is not None and options.get("flexcache", 0) is not None:
        s = cachec.summary(pipe.transformer)
        result["branches"] = {k: (b.computed_steps, b.cached_steps) for k, b in s.branches.items()}
    return result
