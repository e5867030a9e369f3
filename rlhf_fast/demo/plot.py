"""A dependency-free PNG line chart (matplotlib is not a dependency): one
panel per series, stacked, with a 3x5 bitmap font for titles and y ranges.
Pixels go into a bytearray; zlib + the PNG chunk layout does the rest."""

from __future__ import annotations

import math
import struct
import zlib

# 3x5 glyphs, rows top to bottom, '#' = ink. Enough for titles and numbers.
_FONT = {
    "A": "###/#.#/###/#.#/#.#",
    "B": "##./#.#/##./#.#/##.",
    "C": "###/#../#../#../###",
    "D": "##./#.#/#.#/#.#/##.",
    "E": "###/#../##./#../###",
    "F": "###/#../##./#../#..",
    "G": "###/#../#.#/#.#/###",
    "H": "#.#/#.#/###/#.#/#.#",
    "I": "###/.#./.#./.#./###",
    "J": "..#/..#/..#/#.#/###",
    "K": "#.#/#.#/##./#.#/#.#",
    "L": "#../#../#../#../###",
    "M": "#.#/###/###/#.#/#.#",
    "N": "##./#.#/#.#/#.#/#.#",
    "O": "###/#.#/#.#/#.#/###",
    "P": "###/#.#/###/#../#..",
    "Q": "###/#.#/#.#/###/..#",
    "R": "###/#.#/##./#.#/#.#",
    "S": "###/#../###/..#/###",
    "T": "###/.#./.#./.#./.#.",
    "U": "#.#/#.#/#.#/#.#/###",
    "V": "#.#/#.#/#.#/#.#/.#.",
    "W": "#.#/#.#/###/###/#.#",
    "X": "#.#/#.#/.#./#.#/#.#",
    "Y": "#.#/#.#/.#./.#./.#.",
    "Z": "###/..#/.#./#../###",
    "0": "###/#.#/#.#/#.#/###",
    "1": ".#./##./.#./.#./###",
    "2": "###/..#/###/#../###",
    "3": "###/..#/###/..#/###",
    "4": "#.#/#.#/###/..#/..#",
    "5": "###/#../###/..#/###",
    "6": "###/#../###/#.#/###",
    "7": "###/..#/..#/..#/..#",
    "8": "###/#.#/###/#.#/###",
    "9": "###/#.#/###/..#/###",
    ".": ".../.../.../.../.#.",
    "-": ".../.../###/.../...",
    " ": ".../.../.../.../...",
    "(": ".#./#../#../#../.#.",
    ")": ".#./..#/..#/..#/.#.",
    "/": "..#/..#/.#./#../#..",
    "_": ".../.../.../.../###",
    ":": ".../.#./.../.#./...",
    ",": ".../.../.../.#./#..",
    ">": "#../.#./..#/.#./#..",
    "=": ".../###/.../###/...",
    "+": ".../.#./###/.#./...",
    "%": "#.#/..#/.#./#../#.#",
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


def line_chart(
    path: str,
    x: list,
    series: dict,
    title: str = "",
    width: int = 720,
    panel_h: int = 170,
    subtitle: str = "",
    x_label: str = "step",
    marks: dict | None = None,
) -> None:
    """series: name -> list of y (same length as x; None skipped). One panel per
    series, each titled by its name (put the unit there), with the top, middle
    and bottom y values written on the axis and grid lines at them; x ticks at
    0, 25, 50, 75 and 100 % of the range, labelled with x_label. marks: series
    name -> [(label, y)] drawn as labelled dashed horizontal lines (e.g. the
    held-out score before and after training)."""
    marks = marks or {}
    names = list(series)
    top = 8 + 20 * bool(title) + 16 * bool(subtitle)
    c = Canvas(width, top + panel_h * len(names) + 30)
    if title:
        c.text(10, 8, title)
    if subtitle:
        c.text(10, 8 + 20 * bool(title), subtitle, (60, 60, 60), scale=1 + (len(subtitle) * 8 < width - 20))
    x0, x1 = 70, width - 14
    xmin, xmax = (min(x), max(x)) if x else (0, 1)
    xmax = xmax if xmax > xmin else xmin + 1
    grid, ink = (225, 225, 225), (120, 120, 120)
    whole = all(float(xi).is_integer() for xi in x)
    for k, name in enumerate(names):
        ys = [(xi, yi) for xi, yi in zip(x, series[name]) if yi is not None and math.isfinite(yi)]
        py0, py1 = top + k * panel_h + 22, top + (k + 1) * panel_h - 8
        color = _COLORS[k % len(_COLORS)]
        c.text(x0, py0 - 16, name, color)
        values = [v for _, v in ys] + [v for _, v in marks.get(name, [])]
        if values:
            lo, hi = min(values), max(values)
            if hi - lo < 1e-12:
                lo, hi = lo - 0.5, hi + 0.5

            def to_py(yi, lo=lo, hi=hi):
                return py1 - (yi - lo) / (hi - lo) * (py1 - py0)

            for v in (hi, (lo + hi) / 2, lo):
                y = to_py(v)
                c.line(x0, y, x1, y, grid)
                label = _fmt(v)
                c.text(4, int(y) - 5, label, scale=1 + (len(label) <= 7))
        for a, b, cc, d in ((x0, py0, x1, py0), (x0, py1, x1, py1), (x0, py0, x0, py1), (x1, py0, x1, py1)):
            c.line(a, b, cc, d, ink)
        for f in (0.25, 0.5, 0.75):  # x grid
            xv = xmin + f * (xmax - xmin)
            xp = x0 + ((round(xv) if all(float(xi).is_integer() for xi in x) else xv) - xmin) / (xmax - xmin) * (
                x1 - x0
            )
            c.line(xp, py0 + 1, xp, py1 - 1, grid)
        if not values:
            continue
        for label, v in marks.get(name, []):
            y = to_py(v)
            for xs in range(x0, x1, 8):  # dashed
                c.line(xs, y, min(xs + 4, x1), y, (90, 90, 90))
            below = y < (py0 + py1) / 2  # keep the label inside the panel
            c.text(x1 - 8 * len(label) - 4, int(y) + (4 if below else -14), label, (60, 60, 60))
        pts = [(x0 + (xi - xmin) / (xmax - xmin) * (x1 - x0), to_py(yi)) for xi, yi in ys]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            c.line(ax, ay, bx, by, color, width=2)
    base = c.h - 28
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        xv = xmin + f * (xmax - xmin)
        xv = round(xv) if whole else xv  # steps: tick at the nearest whole step
        xp = x0 + (xv - xmin) / (xmax - xmin) * (x1 - x0)
        c.line(xp, base - 6, xp, base - 2, ink)
        label = str(xv) if whole else _fmt(xv)
        c.text(int(xp) - 4 * len(label), base, label)
    c.text((x0 + x1) // 2 - 4 * len(x_label), base + 14, x_label)
    with open(path, "wb") as f:
        f.write(c.png())
