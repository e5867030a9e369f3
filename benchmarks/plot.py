"""A speedup bar chart as a PNG, in pure Python (zlib + struct): no
matplotlib, so `python -m benchmarks --plot FILE.png` works wherever the suite runs.

One horizontal bar per (case, peer), on a log2 axis: green where rlhf_fast is
faster (speedup = peer median / ours > 1), red where slower, grey text for a
skipped peer. Text uses a built-in 5x7 bitmap font (ASCII; lower case drawn
as upper case, except an "x" after a digit, which reads as "times").
"""

from __future__ import annotations

import math
import struct
import zlib

# 5x7 glyphs, column-major: 5 bytes per character, bit 0 = top row.
_FONT = {
    " ": "0000000000",
    "0": "3e5149453e",
    "1": "00427f4000",
    "2": "4261514946",
    "3": "2141454b31",
    "4": "1814127f10",
    "5": "2745454539",
    "6": "3c4a494930",
    "7": "0171090503",
    "8": "3649494936",
    "9": "064949291e",
    "A": "7e1111117e",
    "B": "7f49494936",
    "C": "3e41414122",
    "D": "7f4141221c",
    "E": "7f49494941",
    "F": "7f09090901",
    "G": "3e4149497a",
    "H": "7f0808087f",
    "I": "00417f4100",
    "J": "2040413f01",
    "K": "7f08142241",
    "L": "7f40404040",
    "M": "7f020c027f",
    "N": "7f0408107f",
    "O": "3e4141413e",
    "P": "7f09090906",
    "Q": "3e4151215e",
    "R": "7f09192946",
    "S": "4649494931",
    "T": "01017f0101",
    "U": "3f4040403f",
    "V": "1f2040201f",
    "W": "3f4038403f",
    "X": "6314081463",
    "Y": "0708700807",
    "Z": "6151494543",
    "x": "4428102844",
    "(": "001c224100",
    ")": "0041221c00",
    ",": "0050300000",
    ".": "0060600000",
    "-": "0808080808",
    "+": "08083e0808",
    "=": "1414141414",
    "/": "2010080402",
    ":": "0036360000",
    "_": "4040404040",
    "[": "007f414100",
    "]": "0041417f00",
    "%": "2313086462",
    "<": "0814224100",
    ">": "0041221408",
    "*": "14083e0814",
    "|": "00007f0000",
    "'": "0005030000",
    "?": "0201510906",
    "!": "00005f0000",
    "#": "147f147f14",
    "&": "3649552250",
}
_GLYPHS = {ch: [int(hexs[2 * k : 2 * k + 2], 16) for k in range(5)] for ch, hexs in _FONT.items()}

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (30, 30, 30), (150, 150, 150), (225, 225, 225)
GREEN, RED, BLUE = (60, 160, 90), (210, 80, 70), (70, 110, 200)


class Canvas:
    """An RGB image as one bytearray (3 bytes per pixel, row-major)."""

    def __init__(self, width: int, height: int, color=WHITE):
        self.w, self.h = width, height
        self.px = bytearray(bytes(color) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.h, max(y0, y1))
        if x1 <= x0:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = 3 * (y * self.w + x0)
            self.px[start : start + len(row)] = row

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2) -> int:
        """Draws s with its top-left at (x, y); returns the x after it."""
        prev = ""
        for ch in s:
            if ch == "x" and not prev.isdigit():
                ch = "X"  # the small x only as "times" (1.5x)
            prev = ch
            cols = _GLYPHS.get(ch) or _GLYPHS.get(ch.upper()) or _GLYPHS["?"]
            for cx, bits in enumerate(cols):
                for cy in range(7):
                    if bits >> cy & 1:
                        self.rect(x + cx * scale, y + cy * scale, x + (cx + 1) * scale, y + (cy + 1) * scale, color)
            x += 6 * scale
        return x

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        stride = 3 * self.w
        raw = b"".join(b"\x00" + bytes(self.px[y * stride : (y + 1) * stride]) for y in range(self.h))
        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _label(r, width: int) -> str:
    s = f"{r.op} {r.mode} {r.shape} {r.dtype} vs {r.baseline}"
    return s if len(s) <= width else s[: width - 2] + ".."


def speedup_chart(records, title: str = "rlhf_fast speedup over each peer (peer median / ours)") -> bytes:
    """PNG bytes of the speedup chart for every record that names a peer."""
    rows = [r for r in records if r.baseline is not None]
    ok = [r.speedup for r in rows if r.status == "ok" and r.speedup]
    lo = 2.0 ** math.floor(math.log2(min(ok + [0.5])))
    hi = 2.0 ** math.ceil(math.log2(max(ok + [2.0]) * 1.05))
    s, label_chars, bar_w, row_h, top = 2, 78, 560, 22, 70
    left = 10 + label_chars * 6 * s + 10
    img = Canvas(left + bar_w + 120, top + row_h * max(len(rows), 1) + 30)

    def xpos(v: float) -> int:
        return left + int(bar_w * (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo)))

    img.text(10, 10, title, BLACK, s)
    e_lo, e_hi = round(math.log2(lo)), round(math.log2(hi))
    every = max(1, math.ceil(60 / (bar_w / (e_hi - e_lo))))  # octaves between labels: >= 60 px apart
    for e in range(e_lo, e_hi + 1):  # gridline at every power of two, labels at every `every`-th (1x always)
        x = xpos(2.0**e)
        img.rect(x, top - 8, x + 1, img.h - 20, BLACK if e == 0 else LIGHT)
        if e % every == 0:
            img.text(x - 12, top - 28, f"{2**e}x" if e >= 0 else f"1/{2**-e}x", BLACK, s)
    for k, r in enumerate(rows):
        y = top + k * row_h
        if r.status != "ok" or not r.speedup:
            img.text(10, y + 4, _label(r, label_chars), GREY, s)
            img.text(xpos(1.0) + 6, y + 4, "skipped", GREY, s)
            continue
        img.text(10, y + 4, _label(r, label_chars), BLACK, s)
        x1, x0 = xpos(r.speedup), xpos(1.0)
        img.rect(min(x0, x1), y + 3, max(x0, x1) + 1, y + row_h - 3, GREEN if r.speedup >= 1 else RED)
        img.text(max(x0, x1) + 6, y + 4, f"{r.speedup:.2f}x", BLUE, s)
    return img.png()


def write_chart(path: str, records, title: str | None = None) -> None:
    data = speedup_chart(records, title) if title else speedup_chart(records)
    with open(path, "wb") as f:
        f.write(data)
