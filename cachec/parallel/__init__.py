"""Ulysses context parallelism on torch.distributed, with FP8 communication.

``passes.ulysses`` rewrites the graph (shards the tokens entering the block chain,
turns attention into ``cachec::ulysses_attention``, gathers the outputs); the ops
it inserts live in ``parallel.ulysses``.
"""
from .ulysses import COMMS, group_of, piece_bounds, rank_lengths, ulysses_attention, ulysses_gather

__all__ = ["COMMS", "group_of", "piece_bounds", "rank_lengths", "ulysses_attention", "ulysses_gather"]
