"""DiTango's decision map as pictures: a PPM (its format, as DiTango writes it) and a PNG.

Rows are steps, columns are (layer, head group) regions in graph order. Colours:
computed green, reused grey, computed on an anchor step or forced (warmup, cooldown,
nothing cached yet) blue. The PNG scales each cell to ``CELL`` pixels with a
one-pixel grid every 10 steps and between layers, so a person can read it; it
is written with zlib alone (no imaging library needed).
"""
from __future__ import annotations

import os
import struct
import zlib

__all__ = ["write_policy_map", "COLOURS", "PPM_NAME"]

PPM_NAME = "ditango_policy_step_layer_group"
COLOURS = {"computed": (46, 160, 67), "reused": (200, 200, 200), "anchor": (31, 90, 200)}
_GRID = (255, 255, 255)
CELL = 8


def _ppm(rows: list[list[str]]) -> bytes:
    height, width = len(rows), len(rows[0])
    body = bytes(c for row in rows for cell in row for c in COLOURS[cell])
    return f"P6\n{width} {height}\n255\n".encode() + body


def _png(rows: list[list[str]], layer_starts: set[int]) -> bytes:
    height, width = len(rows) * CELL, len(rows[0]) * CELL
    raw = bytearray()
    for y in range(height):
        s, within_y = divmod(y, CELL)
        raw.append(0)   # filter: none
        for x in range(width):
            k, within_x = divmod(x, CELL)
            grid = (within_x == 0 and k in layer_starts and k) or (within_y == 0 and s and s % 10 == 0)
            raw += bytes(_GRID if grid else COLOURS[rows[s][k]])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + \
        chunk(b"IEND", b"")


def write_policy_map(output_dir: str, rows: list[list[str]], layer_starts: set[int]) -> tuple[str, str]:
    """Write ``rows`` (per step, per region: "computed", "reused" or "anchor") as
    ``<output_dir>/ditango_policy_step_layer_group.ppm`` and ``.png``; return both paths."""
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, PPM_NAME)
    with open(base + ".ppm", "wb") as f:
        f.write(_ppm(rows))
    with open(base + ".png", "wb") as f:
        f.write(_png(rows, layer_starts))
    return base + ".ppm", base + ".png"
