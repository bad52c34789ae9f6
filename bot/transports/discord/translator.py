"""Slash-command descriptions in the Discord client's language, from quill's catalogs.

discord.py asks an `app_commands.Translator` for every command, group and option description
(and name) when it publishes the tree; a zh-CN client then shows the Chinese ones. Names stay
as they are: they are what people type, in every language.
"""

from __future__ import annotations

import discord
from discord import app_commands

from bot.api import normalize_locale
from bot.i18n import DEFAULT_LOCALE, gettext_in
from bot.transports.discord.slash import short

# What discord.py asks for that quill translates.
_DESCRIPTIONS = (
    app_commands.TranslationContextLocation.command_description,
    app_commands.TranslationContextLocation.group_description,
    app_commands.TranslationContextLocation.parameter_description,
)


class CatalogTranslator(app_commands.Translator):
    """Serves descriptions from the same catalogs as quill's replies (bot/i18n.py)."""

    async def translate(
        self, string: app_commands.locale_str, locale: discord.Locale, context: app_commands.TranslationContextTypes
    ) -> str | None:
        """The description in `locale`, or None (Discord shows the English) where there is none."""
        if context.location not in _DESCRIPTIONS:
            return None
        wanted = normalize_locale(locale.value)
        if wanted is None or wanted == DEFAULT_LOCALE:
            return None
        # A description cut to Discord's length keeps the whole English text as its msgid.
        msgid = string.extras.get("msgid", string.message)
        translated = gettext_in(wanted, msgid)
        return short(translated) if translated != msgid else None
