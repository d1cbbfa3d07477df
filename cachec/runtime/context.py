"""The pipeline's own name for each transformer call: diffusers' ``cache_context``.

21 diffusers pipeline families call the transformer inside
``with transformer.cache_context("cond" | "uncond" | "cond_uncond", **fields)``;
Wan adds ``step_index`` and ``num_inference_steps``. The pipeline calls it on
the original module (``pipe.transformer`` reaches it through torch.compile's
wrapper), so cachec puts a recorder in that module's ``__dict__``: it notes the
name and fields, then enters the original context manager. dynamo never traces
it (the pipeline calls it outside the forward), so nothing recompiles.

The call during which the backend first runs is already inside its context;
``PipelineContext.install`` finds that one in the suspended context-manager
frame that holds the module.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import threading
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["CallContext", "PipelineContext"]

_ATTR = "_cachec_pipeline_context"


@dataclass(frozen=True)
class CallContext:
    """What the pipeline said about one transformer call."""

    name: str
    step_index: Optional[int] = None
    num_inference_steps: Optional[int] = None

    @classmethod
    def of(cls, name, fields: dict) -> "CallContext":
        def whole(v):
            return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
        return cls(str(name), whole(fields.get("step_index")), whole(fields.get("num_inference_steps")))


class PipelineContext:
    """Installed as ``module.cache_context``: records each call's context per thread."""

    def __init__(self, original):
        self.original = original       # the module's own bound cache_context
        self._local = threading.local()
        self.first: Optional[CallContext] = None   # the context the first (compiling) call ran in

    def __call__(self, name, **fields):
        return self._enter(name, fields)

    @contextlib.contextmanager
    def _enter(self, name, fields):
        outer = self.current()
        self._local.context = CallContext.of(name, fields)
        try:
            with self.original(name, **fields):
                yield
        finally:
            self._local.context = outer

    def current(self) -> Optional[CallContext]:
        context = getattr(self._local, "context", None)
        if context is None and self.first is not None:   # the call that compiled: seen once, then gone
            context, self.first = self.first, None
        return context

    @classmethod
    def install(cls, module: Optional[torch.nn.Module]) -> Optional["PipelineContext"]:
        """The module's recorder, installed on first use; None if it has no ``cache_context``."""
        if module is None:
            return None
        found = module.__dict__.get(_ATTR)
        if found is not None:
            return found
        original = getattr(module, "cache_context", None)
        if not callable(original):
            return None
        recorder = cls(original)
        recorder.first = _open_context(module, original)
        module.__dict__[_ATTR] = recorder
        module.__dict__["cache_context"] = recorder
        return recorder


def _open_context(module: torch.nn.Module, original) -> Optional[CallContext]:
    """The context the module is in right now, read from the suspended generator of
    its ``cache_context`` (a ``contextlib.contextmanager``) that holds the module."""
    code = getattr(getattr(getattr(original, "__func__", None), "__wrapped__", None), "__code__", None)
    if code is None:
        return None
    for obj in gc.get_referrers(module):
        frame = obj.gi_frame if inspect.isgenerator(obj) else obj if inspect.isframe(obj) else None
        if frame is not None and frame.f_code is code:
            local = frame.f_locals
            if local.get("self") is module and "name" in local:
                return CallContext.of(local["name"], local.get("kwargs") or {})
    return None
