"""Find block loops: runs of consecutive same-class items of one ModuleList."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

_COMPUTE = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Block:
    name: str        # module path, e.g. "transformer_blocks.3"
    container: str   # "transformer_blocks"
    index: int
    cls: type
    first: int       # position of its first node in the graph
    last: int        # position of its last node


@dataclass(frozen=True)
class BlockLoop:
    container: str
    cls: type
    blocks: tuple[Block, ...]


def module_path(stack_path: str) -> str:
    """Normalise dynamo's module path spelling.

    ``L['self'].__dict__['_modules']['transformer_blocks'].0.attn`` and
    ``L['self'].transformer_blocks[0].attn`` both become
    ``transformer_blocks.0.attn``.
    """
    p = re.sub(r"^L\['self'\]|^L\['[^']*'\]", "", stack_path)
    p = re.sub(r"\.__dict__\['_modules'\]\['([^']*)'\]", r".\1", p)
    p = re.sub(r"\._modules\['([^']*)'\]", r".\1", p)
    p = re.sub(r"\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), p)
    p = re.sub(r"getattr\(([^,]*), '([^']*)'\)", r"\1.\2", p)
    return p.strip(".")


def outermost_item(node: fx.Node):
    """The outermost module on the node's stack that is an indexed container item."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in stack.values():
        parts = module_path(path).split(".")
        for k, part in enumerate(parts):
            if part.isdigit() and k > 0:
                if k == len(parts) - 1:
                    return ".".join(parts[:k]), int(part), cls
                break  # the item is further out: a later stack entry names it exactly
    return None


def find_block_loops(gm: fx.GraphModule) -> list[BlockLoop]:
    """Find every block loop in the graph.

    Expects a flat dynamo graph whose nodes carry ``nn_module_stack``.
    Guarantees: each loop has >= 2 blocks of one class with consecutive indices
    of one container, the blocks' node ranges are contiguous, disjoint and in
    index order. Containers whose items appear out of order or interleaved (an
    item called twice, say) give no loop.
    """
    ranges: dict[tuple[str, int], list] = {}
    broken: set[str] = set()
    last_key = None
    for pos, node in enumerate(gm.graph.nodes):
        if node.op not in _COMPUTE:
            continue
        item = outermost_item(node)
        if item is None:
            continue
        key = item[:2]
        if key in ranges and key != last_key:
            broken.add(item[0])  # the same item again after something else: not a plain loop
        r = ranges.setdefault(key, [pos, pos, item[2]])
        r[1] = pos
        last_key = key
    loops: list[BlockLoop] = []
    by_container: dict[str, list[Block]] = {}
    for (container, index), (first, last, cls) in ranges.items():
        if container not in broken:
            by_container.setdefault(container, []).append(
                Block(f"{container}.{index}", container, index, cls, first, last))
    for container, blocks in by_container.items():
        blocks.sort(key=lambda b: b.first)
        run: list[Block] = []
        for b in blocks + [None]:
            if run and b is not None and b.cls is run[-1].cls and b.index == run[-1].index + 1:
                run.append(b)
                continue
            if len(run) >= 2:
                loops.append(BlockLoop(container, run[0].cls, tuple(run)))
            run = [b] if b is not None else []
    loops.sort(key=lambda lp: lp.blocks[0].first)
    return loops
