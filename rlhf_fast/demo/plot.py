"""A dependency-free PNG line chart (matplotlib is not a dependency): one
panel per series, stacked, with a 3x5 bitmap font for titles and y ranges.
Pixels go into a bytearray; zlib + the PNG chunk layout does the rest."""
from __future__ import annotations

import math
import struct
import zlib

# 3x5 glyphs, rows top to bottom, '#' = ink. Enough for titles and numbers.
_FONT = {
    "A": "###/#.#/###/#.#/#.#", "B": "##./#.#/##./#.#/##.", "C": "###/#../#../#../###", "D": "##./#.#/#.#/#.#/##.",
    "E": "###/#../##./#../###", "F": "###/#../##./#../#..", "G": "###/#../#.#/#.#/###", "H": "#.#/#.#/###/#.#/#.#",
    "I": "###/.#./.#./.#./###", "J": "..#/..#/..#/#.#/###", "K": "#.#/#.#/##./#.#/#.#", "L": "#../#../#../#../###",
    "M": "#.#/###/###/#.#/#.#", "N": "##./#.#/#.#/#.#/#.#", "O": "###/#.#/#.#/#.#/###", "P": "###/#.#/###/#../#..",
    "Q": "###/#.#/#.#/###/..#", "R": "###/#.#/##./#.#/#.#", "S": "###/#../###/..#/###", "T": "###/.#./.#./.#./.#.",
    "U": "#.#/#.#/#.#/#.#/###", "V": "#.#/#.#/#.#/#.#/.#.", "W": "#.#/#.#/###/###/#.#", "X": "#.#/#.#/.#./#.#/#.#",
    "Y": "#.#/#.#/.#./.#./.#.", "Z": "###/..#/.#./#../###", "0": "###/#.#/#.#/#.#/###", "1": ".#./##./.#./.#./###",
    "2": "###/..#/###/#../###", "3": "###/..#/###/..#/###", "4": "#.#/#.#/###/..#/..#", "5": "###/#../###/..#/###",
    "6": "###/#../###/#.#/###", "7": "###/..#/..#/..#/..#", "8": "###/#.#/###/#.#/###", "9": "###/#.#/###/..#/###",
    ".": ".../.../.../.../.#.", "-": ".../.../###/.../...", " ": ".../.../.../.../...", "(": ".#./#../#../#../.#.",
    ")": ".#./..#/..#/..#/.#.", "/": "..#/..#/.#./#../#..", "_": ".../.../.../.../###", ":": ".../.#./.../.#./...",
}
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


class Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray([255]) * (w * h * 3)

    def set(self, x: int, y: int, rgb) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i : i + 3] = bytes(rgb)

    def line(self, x0, y0, x1, y1, rgb, width: int = 1) -> None:
        x0, y0, x1, y1 = int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:  # Bresenham
            for o in range(width):
                self.set(x0, y0 + o, rgb)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, rgb=(0, 0, 0), scale: int = 2) -> None:
        for ch in s.upper():
            rows = _FONT.get(ch, _FONT[" "]).split("/")
            for r, row in enumerate(rows):
                for c, v in enumerate(row):
                    if v == "#":
                        for a in range(scale):
                            for b in range(scale):
                                self.set(x + c * scale + a, y + r * scale + b, rgb)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w : 3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "NAN"


def line_chart(path: str, x: list, series: dict, title: str = "", width: int = 640, panel_h: int = 170) -> None:
    """series: name -> list of y (same length as x; None skipped). One panel per series."""
    names = list(series)
    top = 28 if title else 6
    c = Canvas(width, top + panel_h * len(names) + 16)
    if title:
        c.text(10, 8, title)
    x0, x1 = 70, width - 14
    xmin, xmax = (min(x), max(x)) if x else (0, 1)
    xmax = xmax if xmax > xmin else xmin + 1
    for k, name in enumerate(names):
        ys = [(xi, yi) for xi, yi in zip(x, series[name]) if yi is not None and math.isfinite(yi)]
        py0, py1 = top + k * panel_h + 22, top + (k + 1) * panel_h - 8
        color = _COLORS[k % len(_COLORS)]
        c.text(x0, py0 - 16, name, color)
        for a, b, cc, d in ((x0, py0, x1, py0), (x0, py1, x1, py1), (x0, py0, x0, py1), (x1, py0, x1, py1)):
            c.line(a, b, cc, d, (120, 120, 120))
        if not ys:
            continue
        lo, hi = min(v for _, v in ys), max(v for _, v in ys)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        c.text(4, py0, _fmt(hi), scale=1 + (len(_fmt(hi)) <= 7))
        c.text(4, py1 - 10, _fmt(lo), scale=1 + (len(_fmt(lo)) <= 7))

        def to_px(xi, yi):
            return x0 + (xi - xmin) / (xmax - xmin) * (x1 - x0), py1 - (yi - lo) / (hi - lo) * (py1 - py0)

        pts = [to_px(xi, yi) for xi, yi in ys]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            c.line(ax, ay, bx, by, color, width=2)
    c.text(x0, c.h - 12, f"STEP {_fmt(xmin)} - {_fmt(xmax)}", scale=1)
    with open(path, "wb") as f:
        f.write(c.png())
