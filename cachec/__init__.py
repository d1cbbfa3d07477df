"""cachec: a torch.compile backend that makes diffusion transformers reuse work across steps.

    pipe.transformer = torch.compile(pipe.transformer, backend="cachec",
                                     options={"Fn_compute_blocks": 1, "residual_diff_threshold": 0.24})
    print(cachec.summary(pipe.transformer))
"""
from .backend import CachecWarning, cachec_backend, refresh, release, request, summary
from .compile_configs import is_enabled, set_compile_configs, set_enabled
from .options import (BackendOptions, DBCacheConfig, DBPruneConfig, FlexCacheConfig, FoCaCalibratorConfig,
                      TaylorSeerCalibratorConfig, TeaCacheConfig, PABConfig, DiTangoConfig, UlyssesConfig, parse_options,
                      steps_mask)
from .runtime.summary import CacheSummary

__all__ = ["cachec_backend", "summary", "refresh", "request", "release", "set_compile_configs", "set_enabled",
           "is_enabled", "DBCacheConfig", "DBPruneConfig", "TeaCacheConfig", "PABConfig", "DiTangoConfig",
           "FlexCacheConfig", "TaylorSeerCalibratorConfig", "UlyssesConfig",
           "FoCaCalibratorConfig", "BackendOptions", "parse_options",
           "steps_mask", "CacheSummary", "CachecWarning"]
__version__ = "0.1.0"
