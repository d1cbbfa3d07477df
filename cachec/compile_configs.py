"""Dynamo's recompile limits for DiT serving, and a warning when a cached model hits one.

Past ``torch._dynamo.config.recompile_limit`` compiled versions of one frame (8 by
default), or ``accumulated_recompile_limit`` over all frames (256), dynamo stops
compiling that frame and runs it eagerly: the model goes on uncompiled and
uncached. It logs that once; cachec turns the log record for a compiled model's
forward into one ``CachecWarning`` that says which limit was hit and how to raise it.

A DiT in serving recompiles for each new resolution until automatic dynamic shapes
take over (one static compile, then one dynamic), for each CFG batch size, LoRA
adapter state or grad mode it meets, so 8 per frame runs out fast. ``set_compile_configs``
raises the limits to ``SERVING_LIMITS`` (docs/design.md, "Compile configs").
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, Optional

import torch

__all__ = ["set_compile_configs", "SERVING_LIMITS", "watch_recompile_limit", "set_enabled", "is_enabled"]

# per frame: 2 compiles (static, then dynamic) x 2 CFG batch sizes x up to 16 adapter or mode
# states; over all frames: the transformer's forward and its graph-break resumes, the VAE, ...
SERVING_LIMITS = {"recompile_limit": 64, "accumulated_recompile_limit": 1024}

_LOGGER = "torch._dynamo.convert_frame"   # where dynamo logs "torch._dynamo hit config.<limit> (<value>)"


def set_compile_configs(recompile_limit: Optional[int] = SERVING_LIMITS["recompile_limit"],
                        accumulated_recompile_limit: Optional[int] = SERVING_LIMITS["accumulated_recompile_limit"],
                        ) -> dict[str, int]:
    """Set dynamo's recompile limits (process-wide, as ``torch._dynamo.config`` is); None
    leaves one as it is. Returns the previous values, to restore them.

    Call it once before compiling when a process serves many resolutions, batch sizes or
    LoRA adapters with one compiled transformer; the same keys in
    ``torch.compile(..., options={...})`` do it when the model first compiles.
    """
    wanted = {"recompile_limit": recompile_limit, "accumulated_recompile_limit": accumulated_recompile_limit}
    check_limits(wanted)
    config = torch._dynamo.config
    before = {k: getattr(config, k) for k in wanted}
    for k, v in wanted.items():
        if v is not None:
            setattr(config, k, v)
    return before


def check_limits(limits: dict[str, Any]) -> None:
    for k, v in limits.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{k}={v!r} is invalid: expected None or an int >= 1")


class _RecompileLimitWatch(logging.Filter):
    """On dynamo's "hit config.<limit>" record for one of ``codes``, warns once for the model
    whose state it watches (weakly: a dead model's watch does nothing). Never drops a record."""

    def __init__(self, state, codes: set[str], model: str, category: type):
        super().__init__()
        self.state, self.codes, self.model, self.category = weakref.ref(state), codes, model, category

    def filter(self, record: logging.LogRecord) -> bool:
        state = self.state()
        args = record.args if isinstance(record.args, tuple) else ()
        if (state is None or len(args) < 4 or "hit config." not in str(record.msg)
                or args[2] not in self.codes or "recompile_limit" in state.warned):
            return True
        state.warned.add("recompile_limit")
        limit, value, _, reason = args[:4]
        warnings.warn(
            f"cachec: dynamo hit {limit} ({value}) compiling {self.model}.forward: from now on it runs "
            f"eagerly, without compiling and without caching (last recompile reason: {reason}). Raise it "
            f"with cachec.set_compile_configs({limit}=N), or options={{'{limit}': N}} in torch.compile; "
            f"TORCH_LOGS=recompiles shows why it recompiles.", self.category, stacklevel=2)
        return True


def _code_names(fn) -> set[str]:
    """How dynamo names the frames of ``fn`` and of what it wraps (decorators keep ``__wrapped__``)."""
    names = set()
    while fn is not None and len(names) < 8:
        code = getattr(fn, "__code__", None)
        if code is not None:
            names.add(f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})")
        fn = getattr(fn, "__wrapped__", None)
    return names


def watch_recompile_limit(state, module: torch.nn.Module, category: type) -> None:
    """Install the watch for ``module``'s forward (once per state); drop watches of dead models."""
    logger = logging.getLogger(_LOGGER)
    for f in list(logger.filters):
        if isinstance(f, _RecompileLimitWatch) and f.state() is None:
            logger.removeFilter(f)
    if any(isinstance(f, _RecompileLimitWatch) and f.state() is state for f in logger.filters):
        return
    logger.addFilter(_RecompileLimitWatch(state, _code_names(type(module).forward), type(module).__name__, category))


# The process-wide switch (FlexCache's global disable): with it off, every cachec compile is a
# plain compile with the inner backend. The one piece of process state cachec keeps, on purpose:
# an operator turns caching off for a whole server without touching its code.
ENABLE_ENV = "CACHEC_ENABLE"
_switch = {"enabled": None, "logged": False}   # None: read the environment variable
_log = logging.getLogger("cachec")


def set_enabled(enabled: Optional[bool]) -> None:
    """Turn caching on or off for every model this process compiles from now on (models already
    compiled keep what they were compiled with). ``None`` goes back to the environment variable
    ``CACHEC_ENABLE`` (``0``, ``false``, ``off`` or ``no`` turn caching off)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_enabled({enabled!r}) is invalid: expected True, False or None (the environment "
                         f"variable {ENABLE_ENV} decides)")
    _switch["enabled"] = enabled


def is_enabled() -> bool:
    """Whether cachec caches: ``set_enabled``'s value, else ``CACHEC_ENABLE`` (default on)."""
    if _switch["enabled"] is not None:
        return _switch["enabled"]
    import os
    value = os.environ.get(ENABLE_ENV, "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value not in ("1", "true", "on", "yes", ""):
        raise ValueError(f"{ENABLE_ENV}={value!r} is invalid: expected 0/1 (or false/true, off/on, no/yes)")
    return True


def log_disabled_once() -> None:
    """Say once per process, in the log, that the switch turned caching off."""
    if not _switch["logged"]:
        _switch["logged"] = True
        how = "cachec.set_enabled(False)" if _switch["enabled"] is False else f"{ENABLE_ENV}=0"
        _log.warning("cachec: caching is off for this process (%s): every backend='cachec' compile is a plain "
                     "compile with its inner backend", how)
