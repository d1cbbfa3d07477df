"""The bundled trained digits DiT: it loads from its local path and samples the same through cachec."""
import os
import sys

import torch

import cachec

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.insert(0, BENCH)
import digits  # noqa: E402


def test_checkpoint_is_small_and_loads_with_from_pretrained():
    files = os.listdir(digits.CHECKPOINT)
    size = sum(os.path.getsize(os.path.join(digits.CHECKPOINT, f)) for f in files)
    assert "config.json" in files and size < 15e6
    transformer, _ = digits.load_model()
    assert 2e6 < sum(p.numel() for p in transformer.parameters()) < 4e6


def test_sampling_through_cachec_matches_eager_and_sees_separate_cfg():
    transformer, conditioner = digits.load_model()
    labels = list(range(10))
    with torch.no_grad():
        want = digits.sample(transformer, conditioner, labels, steps=6)
        compiled = torch.compile(transformer, backend="cachec",
                                 options={"inner_backend": "eager", "residual_diff_threshold": 0.0})
        got = digits.sample(transformer, conditioner, labels, steps=6, transformer_call=compiled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    s = cachec.summary(compiled)
    assert (s.steps, s.calls, list(s.branches)) == (6, 12, ["cond", "uncond"])
