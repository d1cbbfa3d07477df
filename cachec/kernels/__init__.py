"""Triton kernels registered as torch.library ops (namespace `cachec`).

Each op runs its Triton kernel on CUDA tensors and its plain-torch reference
everywhere else; importing this package works without Triton installed (all
calls then take the reference).
"""

from .fp8_a2a import (
    FP8_MAX,
    dequantize_fp8_head_to_seq,
    dequantize_fp8_head_to_seq_reference,
    quantize_fp8_seq_to_head,
    quantize_fp8_seq_to_head_reference,
)
from .relative_l1 import relative_l1, relative_l1_reference
from .taylor import (
    taylor_apply,
    taylor_apply_reference,
    taylor_update_,
    taylor_update_reference_,
)

__all__ = [
    "FP8_MAX",
    "dequantize_fp8_head_to_seq",
    "dequantize_fp8_head_to_seq_reference",
    "quantize_fp8_seq_to_head",
    "quantize_fp8_seq_to_head_reference",
    "relative_l1",
    "relative_l1_reference",
    "taylor_apply",
    "taylor_apply_reference",
    "taylor_update_",
    "taylor_update_reference_",
]
