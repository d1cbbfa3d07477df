"""How the kernels register as torch.library ops."""
from __future__ import annotations

import importlib.util

import torch


def kernel_op(name: str, mutates_args):
    """``torch.library.triton_op`` where Triton is installed, so inductor sees the kernel;
    ``torch.library.custom_op`` without it (the ops then run their torch reference), because
    ``triton_op`` logs "Triton not available" once per op at import on such a machine."""
    if importlib.util.find_spec("triton") is not None:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)
