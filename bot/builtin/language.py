"""/language: which language quill's own texts use, for one person or a whole channel (a core
feature, so a plugin).

A person's own choice (`/language zh-CN`, stored as their `language.locale` user setting) comes
first wherever they write; then a channel's, set by an admin (`/language scope:channel zh-CN`);
unset, each request is answered in its user's language as the transport knows it, else the
message's, else the place's (bot/i18n.py `resolve`).
"""

from __future__ import annotations

from collections.abc import Callable

from bot.api import (
    N_,
    Command,
    LanguageChannel,
    LanguageUser,
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
ME, CHANNEL = "me", "channel"


async def language(ctx: PluginContext, request: Request) -> Reply:
    """Show both settings, or set the person's own (scope:me, the default) or the channel's."""
    wanted = str(request.options.get("locale", ""))
    scope = str(request.options.get("scope", ME))
    if not wanted:
        return Reply(await _shown(ctx, request))
    if scope == CHANNEL and not request.is_admin:
        refusal = _("Only admins set a channel's language. To set only yours: /language {locale}", locale=wanted)
        return Reply(refusal, failed=True)
    model, user = (LanguageChannel, "") if scope == CHANNEL else (LanguageUser, request.author_id)
    if wanted.casefold() == AUTO:
        await ctx.update(model, request.place, user=user, locale="")
        if scope == CHANNEL:
            return Reply(_("quill now answers each person in their own language here."))
        return Reply(
            _(
                "quill now answers you in this channel's language, else your Discord language, else the language "
                "you write in."
            )
        )
    if normalize_locale(wanted) is None:
        raise SettingError(_("quill has no texts in {locale}; it has {known}.", locale=wanted, known=_known()))
    updated = await ctx.update(model, request.place, user=user, locale=wanted)
    with locale_scope(updated.locale):  # said in the language just chosen
        if scope == CHANNEL:
            return Reply(_("quill now answers in {locale} in this channel.", locale=updated.locale))
        return Reply(_("quill now answers you in {locale}, wherever you write to it.", locale=updated.locale))


async def _shown(ctx: PluginContext, request: Request) -> str:
    """The person's language and the channel's, each as set or as automatic."""
    mine = (await ctx.scoped(LanguageUser, request.place, user=request.author_id)).locale
    here = (await ctx.scoped(LanguageChannel, request.place)).locale
    if mine:
        lines = [_("quill answers you in {locale}, as you chose (/language auto undoes it).", locale=mine)]
    else:
        lines = [
            _(
                "You have chosen no language: quill follows this channel's, else your Discord language, else "
                "your message's."
            )
        ]
    if here:
        lines.append(_("quill answers in {locale} in this channel.", locale=here))
    else:
        lines.append(_("quill answers each person in their own language here (no language set)."))
    return "\n".join(lines)


def _known() -> str:
    return ", ".join(available_locales())


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    locale = Option(
        "locale",
        N_("a language (en, zh-CN, 中文) or auto"),
        choices=(*available_locales(), AUTO),
        positional=True,
    )
    scope = Option("scope", N_("me (only you, the default) or channel (admins)"), choices=(ME, CHANNEL), closed=True)
    register(
        Command(
            "language",
            N_("show or set the language of quill's texts, yours or this channel's"),
            language,
            options=(locale, scope),
        )
    )
