"""The font of the PNG charts quill draws (a digest's, /finetune status's), in every language
quill has texts in.

Pillow's own font has no Chinese glyphs, so a chart in Chinese is drawn with
`bot/fonts/quill-cjk.ttf`: WenQuanYi Micro Hei (Apache License 2.0), cut down to ASCII and the
characters of quill's Chinese catalogs (144 KB instead of 5 MB). After a translation adds
characters, `python -m bot.charts FONT` cuts it again from the full font (Debian's
fonts-wqy-microhei: /usr/share/fonts/truetype/wqy/wqy-microhei.ttc; `pip install fonttools`,
a translator's tool like OpenCC, not a dependency); tests/test_i18n.py fails while a chart's
label has a character the font lacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.i18n import DEFAULT_LOCALE, LOCALE_DIR, current_locale

FONT = Path(__file__).parent / "fonts" / "quill-cjk.ttf"


def chart_font(size: int) -> Any:
    """A Pillow font of `size` pixels for the current locale's labels: Pillow's own in English,
    the CJK font otherwise."""
    from PIL import ImageFont

    if current_locale() == DEFAULT_LOCALE:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(FONT), size)


def catalog_characters() -> str:
    """ASCII and every character of quill's catalogs' translations: what the font must hold."""
    from babel.messages.pofile import read_po

    found = {chr(c) for c in range(0x20, 0x7F)}
    for po in LOCALE_DIR.glob("*/LC_MESSAGES/*.po"):
        with po.open("rb") as handle:
            for message in read_po(handle):
                forms = message.string if isinstance(message.string, tuple) else (message.string,)
                found.update(*(form or "" for form in forms))
    return "".join(sorted(found))


def main(argv: list[str] | None = None) -> None:
    """Cut FONT (a .ttf, or the first face of a .ttc) down to `catalog_characters()`."""
    import sys

    from fontTools import subset
    from fontTools.ttLib import TTFont

    source = (sys.argv[1:] if argv is None else argv)[0]
    font = TTFont(source, fontNumber=0)
    options = subset.Options()
    options.layout_features, options.name_IDs, options.notdef_outline = [], ["*"], True
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=catalog_characters())
    subsetter.subset(font)
    font.save(str(FONT))
    print(f"{FONT}: {FONT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
