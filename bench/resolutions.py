"""Many resolutions in one run: compiles, compile time and time per step, static against dynamic.

    python bench/resolutions.py [--inner inductor] [--steps 8] [--threads 2]

The tiny FLUX of the tests (2 double + 3 single blocks) generates at five resolutions
(4x4 to 12x12 packed latent tokens: 16 to 144 image tokens), two generations each, one
transformer call per step, under four systems: plain ``torch.compile`` and cachec
(``residual_diff_threshold=0.24``, warmup 2), each with the default ``dynamic=None``
(dynamo's automatic dynamic shapes: static first, dynamic after a shape changes) and with
``dynamic=True``. Each system starts from ``torch._dynamo.reset()``; inductor's on-disk
caches stay warm across systems, as in a serving process that restarts.

Columns: frames dynamo compiled (``compiles``, from its compile-start callback), the wall
time of the calls that compiled (``compile s``), the median time of the other calls per
resolution (``ms/step``, averaged over resolutions), and whether any generation past the
first at a resolution compiled again (``recompiled warm``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tiny_models import TEXT_LEN, _image_ids, _tiny_flux_transformer  # noqa: E402

import cachec  # noqa: E402

GRIDS = (4, 6, 8, 10, 12)   # packed latent grid side: 16, 36, 64, 100, 144 image tokens


def inputs(side: int, t: float, gen: torch.Generator) -> dict:
    return dict(hidden_states=torch.randn(1, side * side, 16, generator=gen),
                encoder_hidden_states=torch.randn(1, TEXT_LEN, 32, generator=gen),
                pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.full((1,), t),
                img_ids=_image_ids(side, side), txt_ids=torch.zeros(TEXT_LEN, 3),
                guidance=torch.full((1,), 3.5), return_dict=False)


class Compiles:
    """Frames dynamo starts compiling while active."""

    def __enter__(self):
        from torch._dynamo.callback import callback_handler
        self.count = 0

        def on_start(_):
            self.count += 1
        self._cb = callback_handler.register_start_callback(on_start)
        return self

    def __exit__(self, *exc):
        from torch._dynamo.callback import callback_handler
        callback_handler.remove_start_callback(self._cb)


def run(system: str, dynamic, inner: str, steps: int, bar) -> dict:
    torch._dynamo.reset()
    model = _tiny_flux_transformer()
    if system == "cachec":
        compiled = torch.compile(model, backend="cachec", dynamic=dynamic,
                                 options={"inner_backend": inner, "residual_diff_threshold": 0.24,
                                          "max_warmup_steps": 2, "num_inference_steps": steps})
    else:
        compiled = torch.compile(model, backend=inner, dynamic=dynamic)
    compile_s, per_res, warm_recompiles = 0.0, [], 0
    with Compiles() as compiles, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for side in GRIDS:
            steady = []
            for g in range(2):
                gen = torch.Generator().manual_seed(g)
                for t in torch.linspace(1.0, 0.1, steps).tolist():
                    before = compiles.count
                    start = time.perf_counter()
                    compiled(**inputs(side, t, gen))
                    took = time.perf_counter() - start
                    if compiles.count > before:
                        compile_s += took
                        warm_recompiles += g > 0
                    else:
                        steady.append(took)
                    bar.update(1)
            per_res.append(statistics.median(steady) * 1e3)
    return dict(compiles=compiles.count, compile_s=compile_s, ms_step=statistics.mean(per_res),
                per_res=per_res, warm=warm_recompiles)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    systems = [(s, d) for s in ("torch.compile", "cachec") for d in (None, True)]
    rows = []
    with tqdm(total=len(systems) * len(GRIDS) * 2 * args.steps, desc="calls") as bar:
        for system, dynamic in systems:
            rows.append((system, dynamic, run(system, dynamic, args.inner, args.steps, bar)))
    print(f"\ntiny FLUX, {len(GRIDS)} resolutions ({', '.join(str(g * g) for g in GRIDS)} image tokens), "
          f"2 generations of {args.steps} steps each, inner backend {args.inner}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"{'system':<15} {'dynamic':<8} {'compiles':>8} {'compile s':>10} {'ms/step':>8} {'recompiled warm':>16}  "
          f"ms/step per resolution")
    for system, dynamic, r in rows:
        print(f"{system:<15} {str(dynamic):<8} {r['compiles']:>8} {r['compile_s']:>10.1f} {r['ms_step']:>8.2f} "
              f"{r['warm']:>16}  {' '.join(f'{v:.2f}' for v in r['per_res'])}")


if __name__ == "__main__":
    main()
