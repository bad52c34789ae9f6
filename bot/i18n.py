"""quill's own texts in its users' languages: gettext catalogs read with Babel, and the locale
each request is answered in.

Source strings are English, whole sentences with named placeholders:
`_("Erased {count} messages.", count=n)`, `ngettext("{count} message", "{count} messages", n)`.
Catalogs are `.po` files (`bot/locale/<ll_CC>/LC_MESSAGES/quill.po` for quill itself, a
`locale/` folder beside a plugin's module for that plugin), compiled in memory when first used,
so a plain clone needs no build step. The locale comes from the request (`Request.locale`, set
by the router, bot/router.py) through a context variable, so a handler's `_()` speaks its
user's language without passing it around.

`python -m bot.i18n` extracts the marked strings of `bot/` and `plugins/` into every catalog
(new ones empty, vanished ones dropped) for translators to fill in.
"""

from __future__ import annotations

import gettext
import io
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import babel
import babel.dates
import babel.localedata
import babel.numbers
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from pydantic import BaseModel, Field, field_validator

from bot.plugin_config import ChannelSettings, UserSettings
from bot.types import Text

DEFAULT_LOCALE = "en"
LOCALE_DIR = Path(__file__).parent / "locale"
# The keywords that mark a string for the catalogs (Babel's extraction spec).
KEYWORDS = {"_": None, "N_": None, "Text": None, "ngettext": (1, 2)}
# Where marked strings live: Python sources, and the admin panel's Jinja templates (bot/web/,
# plugins' `templates/` folders), which call `_()` and `ngettext()` the same way.
EXTRACT_METHODS = [("**.py", "python"), ("**/templates/**.html", "jinja2.ext:babel_extract")]

_current: ContextVar[str] = ContextVar("quill_locale", default=DEFAULT_LOCALE)
# Folders holding `<ll_CC>/LC_MESSAGES/*.po`: quill's own first, then each plugin's.
_folders: list[Path] = [LOCALE_DIR]


def N_(message: str) -> str:
    """Mark `message` for the catalogs where it must stay English until shown (a command's help
    is translated when /help or Discord's menu shows it)."""
    return message


@cache
def available() -> tuple[str, ...]:
    """The locales quill has texts for: English and every catalog's language (read once: each
    request's locale is normalized against them)."""
    found = {DEFAULT_LOCALE}
    for folder in _folders:
        if folder.is_dir():
            found |= {_tag(p.name) for p in folder.iterdir() if any(p.glob("LC_MESSAGES/*.po"))}
    return tuple(sorted(found))


def normalize(tag: str | None) -> str | None:
    """The catalog locale for a language tag as Discord, POSIX or a person writes it
    (`zh-CN`, `zh_CN.UTF-8`, `zh-Hans`, `zh-HK`, `en-US`), or None when quill has none for it.
    Traditional Chinese falls back to Simplified where there is no zh-TW catalog."""
    if not tag:
        return None
    tag = tag.split(".")[0].split("@")[0].replace("_", "-").strip()
    if tag.casefold() in {"c", "posix", ""}:
        return None
    try:
        parsed = babel.Locale.parse(tag, sep="-")
    except (ValueError, babel.UnknownLocaleError):
        try:
            parsed = babel.Locale.parse(tag.casefold())
        except (ValueError, babel.UnknownLocaleError):
            code = language_code(tag)
            return normalize(code) if code is not None and code != tag else None
    have = available()
    if parsed.language == "zh":
        traditional = parsed.script == "Hant" or parsed.territory in {"TW", "HK", "MO"}
        for wanted in (["zh-TW"] if traditional else []) + ["zh-CN"]:
            if wanted in have:
                return wanted
        return None
    if parsed.language == "en":
        return DEFAULT_LOCALE
    for wanted in (f"{parsed.language}-{parsed.territory}", parsed.language):
        if wanted in have:
            return wanted
    return None


# Names people use that Babel's locale data lacks: the Chinese for "Chinese" as a spoken or
# written language, and the usual Traditional spellings.
_ALIASES = {"汉语": "zh", "漢語": "zh", "华语": "zh", "華語": "zh", "普通话": "zh", "普通話": "zh", "国语": "zh"}
# Names in these locales are understood for every language, besides each language's own name.
_NAMING_LOCALES = ("en", "zh", "zh_Hant")


def language_code(name: str) -> str | None:
    """The Babel code of a language from its code or its name in English, in Chinese or in
    itself, any case: `中文` and `Chinese` -> `zh`, `英语` and `英文` -> `en`, `日本語` -> `ja`,
    `français` -> `fr`, `繁體中文` -> `zh_Hant`; None when no language has that name."""
    key = unicodedata.normalize("NFKC", name).strip().casefold()
    return _common_names().get(key) or _own_names().get(key)


def _names(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Casefolded names to codes, the first name given winning; a Chinese name in 语 also
    answers in 文 (英语 is as often written 英文, "English writing")."""
    found: dict[str, str] = {}
    for name, code in pairs:
        key = unicodedata.normalize("NFKC", name).casefold()
        found.setdefault(key, code)
        if key.endswith(("语", "語")):
            found.setdefault(key[:-1] + "文", code)
    return found


@cache
def _common_names() -> dict[str, str]:
    """Every language's code and its names in English and Chinese (three locales' data: quick)."""
    pairs = [(name, code) for naming in _NAMING_LOCALES for code, name in babel.Locale.parse(naming).languages.items()]
    pairs += [(code, code) for code in babel.Locale.parse("en").languages]
    return _names(pairs + list(_ALIASES.items()))


@cache
def _own_names() -> dict[str, str]:
    """Each ISO 639-1 language's name in itself (日本語, français): read from ~160 locales' data,
    about a second, so only when a name is not a common one."""
    codes = [code for code in babel.localedata.locale_identifiers() if len(code) == 2]
    return _names((babel.Locale.parse(code).get_display_name() or code, code) for code in codes)


def system_locale() -> str | None:
    """The console's locale from the environment (LC_ALL, LC_MESSAGES, LANG), if quill has it."""
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        if value := os.environ.get(name):
            return normalize(value)
    return None


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_LATIN_WORDS = re.compile(r"[A-Za-z]{2,}")


def detect(text: str) -> str | None:
    """The locale a message is written in, where quill has texts for it: Chinese script (without
    kana, which is Japanese) is zh-CN; a Latin text that lingua reads as English is English;
    anything else says nothing."""
    if _HAN.search(text):
        return None if _KANA.search(text) else normalize("zh-CN")
    if len(_LATIN_WORDS.findall(text)) < 2:
        return None
    language = _detector().detect_language_of(text)
    return DEFAULT_LOCALE if language is not None and language.name == "ENGLISH" else None


@cache
def _detector() -> Any:
    """A small lingua detector (English against the languages most often mistaken for it):
    built in well under a second, unlike the translator's 75 languages."""
    from lingua import Language, LanguageDetectorBuilder

    languages = [Language.ENGLISH, Language.FRENCH, Language.GERMAN, Language.SPANISH, Language.PORTUGUESE]
    languages += [Language.ITALIAN, Language.DUTCH, Language.INDONESIAN]
    return LanguageDetectorBuilder.from_languages(*languages).with_low_accuracy_mode().build()


def add_catalog_folder(folder: Path) -> None:
    """Serve a plugin's own catalogs (`folder/<ll_CC>/LC_MESSAGES/*.po`) after quill's."""
    if folder.is_dir() and folder not in _folders:
        _folders.append(folder)
        translations.cache_clear()
        available.cache_clear()


def _tag(directory: str) -> str:
    return directory.replace("_", "-")


def _compiled(po: Path) -> gettext.GNUTranslations:
    """A `.po` file compiled in memory (no build step, no `.mo` files to keep in step)."""
    with po.open("rb") as handle:
        catalog = read_po(handle)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


@cache
def translations(locale: str) -> gettext.NullTranslations:
    """Every catalog of `locale`, quill's first, each falling back to the next, then English."""
    if locale == DEFAULT_LOCALE:
        return gettext.NullTranslations()
    folder_name = locale.replace("-", "_")
    found = [_compiled(po) for folder in _folders for po in sorted((folder / folder_name).glob("LC_MESSAGES/*.po"))]
    if not found:
        return gettext.NullTranslations()
    for later in found[1:]:
        found[0].add_fallback(later)
    return found[0]


def current_locale() -> str:
    """The locale of the request being answered (English outside one)."""
    return _current.get()


@contextmanager
def locale_scope(locale: str | None) -> Iterator[None]:
    """Answer in `locale` inside the block (the router wraps each handler and stream piece)."""
    token = _current.set(locale or DEFAULT_LOCALE)
    try:
        yield
    finally:
        _current.reset(token)


def _(message: str | Text, /, **values: Any) -> str:
    """`message` in the current locale, its `{placeholders}` filled from `values` (or from the
    Text's own values, translated in turn); numbers are written the locale's way."""
    if isinstance(message, Text):
        message, values = message.template, {**message.values, **values}
    translated = translations(current_locale()).gettext(message)
    return translated.format(**_shown(values)) if values else translated


def ngettext(singular: str, plural: str, n: int, /, **values: Any) -> str:
    """The plural form of the current locale for `n`; `{count}` is `n` unless given."""
    translated = translations(current_locale()).ngettext(singular, plural, n)
    return translated.format(**_shown({"count": n, **values}))


def gettext_in(locale: str, message: str) -> str:
    """`message` in `locale`, for code that serves several at once (Discord's command menu)."""
    return translations(locale).gettext(message)


def error_text(exc: BaseException) -> str:
    """An error's message as a user reads it: translated when it was raised with a `Text`."""
    first = exc.args[0] if len(exc.args) == 1 else None
    return _(first) if isinstance(first, Text) else str(exc)


def format_number(number: float) -> str:
    """`8,760` in English, the locale's own grouping elsewhere."""
    return babel.numbers.format_decimal(number, locale=_babel_locale())


def format_datetime(moment: datetime, format: str = "medium") -> str:
    """A date and time as the locale writes them (`Dec 1, 2026, 9:00:00 AM`, `2026年12月1日 09:00:00`)."""
    return babel.dates.format_datetime(moment, format=format, tzinfo=moment.tzinfo, locale=_babel_locale())


def format_date(moment: datetime, format: str = "medium") -> str:
    """A date as the locale writes it (`Dec 1, 2026`, `2026年12月1日`)."""
    return babel.dates.format_date(moment, format=format, locale=_babel_locale())


def language_label(code: str, english: str) -> str:
    """A language's name as the current locale writes it (`fr`: 法语), `english` in English."""
    if current_locale() == DEFAULT_LOCALE:
        return english
    return babel.Locale.parse(_babel_locale()).languages.get(code.lower(), english)


def _babel_locale() -> str:
    return current_locale().replace("-", "_")


def _shown(values: dict[str, Any]) -> dict[str, Any]:
    """Values as they go into a sentence: nested Texts translated, whole numbers grouped."""
    shown: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Text):
            value = _(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            value = format_number(value)
        shown[name] = value
    return shown


class _LocaleSetting(BaseModel):
    """A language for quill's own texts, stored as its catalog locale (empty: automatic)."""

    locale: str = Field("", max_length=20, description="The language of quill's own texts (empty: automatic).")

    @field_validator("locale")
    @classmethod
    def _known(cls, value: str) -> str:
        if not value:
            return ""
        known = normalize(value)
        if known is None:
            raise ValueError(f"quill has no texts in {value!r}; it has {', '.join(available())}")
        return known


class LanguageChannel(_LocaleSetting, ChannelSettings):
    """The language quill answers in here, set by an admin (`/language scope:channel`)."""

    namespace = "language"


class LanguageUser(_LocaleSetting, UserSettings):
    """The language quill answers one person in, wherever they are, set by them (`/language`)."""

    namespace = "language"


def resolve(*, mine: str | None, channel: str | None, client: str | None, text: str, place: str | None) -> str:
    """The locale to answer in: the person's own choice (/language), the channel's (an admin's
    /language scope:channel), the person's client (a Discord client's language, QUILL_LOCALE),
    the message's language, the place's (a guild's preferred locale, the system's), English."""
    for candidate in (mine, channel, client):
        if found := normalize(candidate):
            return found
    fallback = normalize(place) or DEFAULT_LOCALE
    # A text with no Chinese where the place is English anyway needs no detector.
    if fallback == DEFAULT_LOCALE and not _HAN.search(text):
        return DEFAULT_LOCALE
    return detect(text) or fallback


def main(argv: list[str] | None = None) -> None:
    """Extract the marked strings of bot/ and plugins/ into every catalog of quill's; with
    `--zh-tw`, write the Traditional Chinese catalog from the Simplified one by OpenCC's
    s2twp (Taiwan usage; `pip install opencc`, a translator's tool, not a dependency)."""
    import sys

    from babel.messages.catalog import Catalog
    from babel.messages.extract import extract_from_dir
    from babel.messages.pofile import write_po

    template = Catalog(project="quill", fuzzy=False)
    root = LOCALE_DIR.parent.parent
    for folder in ("bot", "plugins"):
        for filename, lineno, message, comments, context in extract_from_dir(
            root / folder, EXTRACT_METHODS, keywords=KEYWORDS, comment_tags=("TRANSLATORS:",)
        ):
            template.add(message, None, [(f"{folder}/{filename}", lineno)], auto_comments=comments, context=context)
    for po in sorted(LOCALE_DIR.glob("*/LC_MESSAGES/quill.po")):
        with po.open("rb") as handle:
            catalog = read_po(handle)
        catalog.update(template, no_fuzzy_matching=True)
        catalog.obsolete.clear()
        with po.open("wb") as handle:
            write_po(handle, catalog, width=0, include_lineno=False)
        print(f"{po.relative_to(root)}: {len(catalog)} messages")
    if "--zh-tw" in (sys.argv[1:] if argv is None else argv):
        catalogs = [LOCALE_DIR / name / "LC_MESSAGES" / "quill.po" for name in ("zh_CN", "zh_TW")]
        _traditional(*catalogs)


def _traditional(simplified: Path, traditional: Path) -> None:
    """The zh-TW catalog as OpenCC converts the zh-CN one."""
    import opencc
    from babel.messages.pofile import write_po

    convert = opencc.OpenCC("s2twp").convert
    with simplified.open("rb") as handle:
        catalog = read_po(handle)
    catalog.locale = babel.Locale.parse("zh_TW")
    catalog.header_comment = (
        "# Traditional Chinese texts of quill, made from zh_CN by OpenCC s2twp (python -m bot.i18n --zh-tw)."
    )
    for message in catalog:
        if message.id and message.string:
            forms = message.string
            message.string = tuple(convert(f) for f in forms) if isinstance(forms, tuple) else convert(forms)
    traditional.parent.mkdir(parents=True, exist_ok=True)
    with traditional.open("wb") as handle:
        write_po(handle, catalog, width=0, include_lineno=False)
    print(f"{traditional}: {len(catalog)} messages from {simplified.name} by OpenCC s2twp")


if __name__ == "__main__":
    main()
