"""End to end through inductor (slow: marked so it can be deselected with -m 'not inductor')."""
import pytest
import torch

import cachec
from test_models import denoise
from tiny_models import build

pytestmark = pytest.mark.inductor


def test_flux_inductor_segments_match_plain_compile_and_never_recompile():
    """Batch 2: FLUX's single blocks return a strided view, and inductor checks input strides."""
    case = build("flux")
    ts = torch.linspace(1.0, 0.1, 8).tolist()
    plain = torch.compile(case.model, backend="inductor")
    want = denoise(plain, case, ts, batch=2)
    torch._dynamo.reset()
    exact = torch.compile(case.model, backend="cachec", options={"residual_diff_threshold": 0.0})
    got = denoise(exact, case, ts, batch=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g["cond"], w["cond"], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    cached = torch.compile(case.model, backend="cachec",
                           options={"residual_diff_threshold": 0.999, "max_warmup_steps": 2})
    first = denoise(cached, case, ts, batch=2)
    with torch.compiler.set_stance("fail_on_recompile"):
        second = denoise(cached, case, ts, batch=2)
    s = cachec.summary(cached)
    assert s.computed_steps == [0, 1, 5] and s.cached_steps == [2, 3, 4, 6, 7]
    for a, b in zip(first, second):
        torch.testing.assert_close(a["cond"], b["cond"], rtol=0, atol=0)
