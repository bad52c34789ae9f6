"""/language: which language quill's own texts use in a channel (a core feature, so a plugin).

Unset, each request is answered in its user's language as the transport knows it, else the
message's, else the place's (bot/i18n.py `resolve`); an admin's choice here comes first.
"""

from __future__ import annotations

from collections.abc import Callable

from bot.api import (
    N_,
    Command,
    LanguageChannel,
    Option,
    PluginContext,
    Reply,
    Request,
    SettingError,
    _,
    available_locales,
    hookimpl,
    locale_scope,
    normalize_locale,
)

AUTO = "auto"


async def language(ctx: PluginContext, request: Request) -> Reply:
    """Show or set this channel's language; `auto` goes back to each user's own."""
    wanted = str(request.options.get("locale", ""))
    if not wanted:
        chosen = (await ctx.scoped(LanguageChannel, request.place)).locale
        if chosen:
            return Reply(_("quill answers in {locale} in this channel.", locale=chosen))
        return Reply(_("quill answers each person in their own language here (no language set)."))
    if wanted.casefold() == AUTO:
        await ctx.update(LanguageChannel, request.place, locale="")
        return Reply(_("quill now answers each person in their own language here."))
    if normalize_locale(wanted) is None:
        raise SettingError(_("quill has no texts in {locale}; it has {known}.", locale=wanted, known=_known()))
    updated = await ctx.update(LanguageChannel, request.place, locale=wanted)
    with locale_scope(updated.locale):  # said in the language just chosen
        return Reply(_("quill now answers in {locale} in this channel.", locale=updated.locale))


def _known() -> str:
    return ", ".join(available_locales())


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    locale = Option(
        "locale", N_("a language (en, zh-CN) or auto"), choices=(*available_locales(), AUTO), positional=True
    )
    register(
        Command(
            "language",
            N_("show or set the language quill uses in this channel"),
            language,
            admin=True,
            options=(locale,),
        )
    )
