"""The digest's chart: one bar per day, as tall as that day's messages and split by mood.

Drawn with Pillow (a 7 MB wheel; this chart takes about 30 ms): matplotlib depends on Pillow
itself and adds a 10 MB wheel and five more packages, for a bar chart. 640 px wide: Discord
scales embed images down to about 400 px, and the labels stay readable at that size.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from bot.api import chart_font

WIDTH, HEIGHT = 640, 320
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 16, 56, 44
COLOURS = {"positive": (67, 160, 71), "neutral": (158, 158, 158), "negative": (229, 57, 53)}
BACKGROUND, INK = (255, 255, 255), (33, 33, 33)


def draw(days: Mapping[str, Mapping[str, int]], title: str, legend: Mapping[str, str] | None = None) -> bytes:
    """A PNG: for each day (label -> messages per mood, in order) a stacked bar, its total on
    top, the day under it, and a legend naming the moods (mood -> its name, in the reader's
    language: the labels are drawn with a font that has Chinese glyphs where needed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    pen = ImageDraw.Draw(image)
    font, small = chart_font(18), chart_font(13)
    pen.text((MARGIN_LEFT, 8), title, fill=INK, font=font)
    x = MARGIN_LEFT
    for mood, colour in COLOURS.items():
        name = (legend or {}).get(mood, mood)
        pen.rectangle((x, 34, x + 12, 46), fill=colour)
        pen.text((x + 16, 33), name, fill=INK, font=small)
        x += 24 + int(pen.textlength(name, font=small))
    base, top = HEIGHT - MARGIN_BOTTOM, MARGIN_TOP + 16
    pen.line((MARGIN_LEFT, base, WIDTH - MARGIN_RIGHT, base), fill=INK)
    peak = max((sum(c.values()) for c in days.values()), default=0) or 1
    slot = (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / max(len(days), 1)
    bar = max(4, min(64, int(slot * 0.6)))
    for i, (day, counts) in enumerate(days.items()):
        centre = MARGIN_LEFT + slot * (i + 0.5)
        left, y = int(centre - bar / 2), base
        for mood, colour in COLOURS.items():
            height = round((base - top) * counts.get(mood, 0) / peak)
            if height:
                pen.rectangle((left, y - height, left + bar - 1, y - 1), fill=colour)
                y -= height
        total = str(sum(counts.values()))
        pen.text((centre - pen.textlength(total, font=small) / 2, y - 16), total, fill=INK, font=small)
        pen.text((centre - pen.textlength(day, font=small) / 2, base + 6), day, fill=INK, font=small)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
