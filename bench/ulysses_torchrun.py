"""A diffusers pipeline on several ranks with Ulysses and caching, launched with torchrun.

    torchrun --nproc-per-node 2 bench/ulysses_torchrun.py [--comm fp8] [--steps 8]

Every rank builds the tiny WanPipeline of the tests (CFG: cond and uncond calls per step),
compiles its transformer with cachec (DBCache F1B0 and Ulysses over all ranks), runs the same
call with the same seed, and gets the whole video. Rank 0 prints its cache summary and how far
the video is from the same pipeline run uncompiled in one process. gloo on CPU; on GPUs the same
script runs with nccl (``--backend nccl``, one GPU per rank).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tiny_pipelines import build_wan_pipeline, generate  # noqa: E402

import cachec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comm", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--backend", default="gloo")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    with torch.no_grad():
        reference = generate(build_wan_pipeline(), args.steps) if rank == 0 else None
        pipe = build_wan_pipeline()
        pipe.transformer = torch.compile(pipe.transformer, backend="cachec", options={
            "ulysses_size": world, "ulysses_comm": args.comm, "inner_backend": "eager",
            "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.1, "max_warmup_steps": 2})
        video = generate(pipe, args.steps)
    if rank == 0:
        print(cachec.summary(pipe.transformer))
        print(f"{world} ranks, {args.comm} exchange: max |video - uncompiled single-process video| = "
              f"{(video - reference).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
