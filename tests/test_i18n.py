"""quill's own texts in Chinese and English: the catalogs are complete, every user-facing string
is marked, and each request is answered in the language it resolves to."""

from __future__ import annotations

import ast
import json
import re
import string
import textwrap
import types
from pathlib import Path

import pluggy
import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from bot import charts, i18n, plugins, prompts
from bot.api import Hit, Place, Request
from bot.app import Quill
from bot.builtin import finetune
from bot.config import REPO_ROOT
from bot.engine import ContextOverflow, reply_room
from bot.i18n import EXTRACT_METHODS, KEYWORDS, LOCALE_DIR, _, error_text, gettext_in, locale_scope, resolve
from bot.models import FinetuneRun
from bot.prompts import BUILTIN_PROMPTS, PromptLoader
from bot.scheduler import ScheduleError, parse_when
from plugins.digest import MOOD_NAMES, chart
from plugins.qa import NOTHING_FOUND, source_label

CATALOGS = {locale: LOCALE_DIR / locale.replace("-", "_") / "LC_MESSAGES" / "quill.po" for locale in ("zh-CN", "zh-TW")}
CJK = re.compile(r"[\u4e00-\u9fff]")
# Where a string reaches a user: the call, the positions and the keywords of its text.
SINKS = {
    "Reply": ({0}, {"text", "title"}),
    "Command": ({1}, {"help"}),
    "Option": ({1}, {"description"}),
    "Section": ({0}, {"title"}),
    # The admin panel: a page's menu title, and the message shown after a form (bot/web/pages.py).
    "WebPage": ({1}, {"title"}),
    "Redirect": ({1}, {"message"}),
}
WORDS = re.compile(r"[A-Za-z]{2,}")


def marked_strings() -> list[tuple[str, str | tuple[str, str]]]:
    """(where, msgid) for every string marked in bot/ and plugins/ (the panel's templates too), as
    Babel extracts them."""
    found = []
    for folder in ("bot", "plugins"):
        for filename, lineno, message, _comments, _context in extract_from_dir(
            REPO_ROOT / folder, EXTRACT_METHODS, keywords=KEYWORDS
        ):
            found.append((f"{folder}/{filename}:{lineno}", message))
    return found


def placeholders(text: str) -> set[str]:
    return {name for _lit, name, _spec, _conv in string.Formatter().parse(text) if name}


@pytest.mark.parametrize("locale", sorted(CATALOGS))
def test_every_marked_string_has_a_chinese_translation_with_the_same_placeholders(locale: str) -> None:
    with CATALOGS[locale].open("rb") as handle:
        catalog = read_po(handle)
    marked = marked_strings()
    assert len(marked) > 150  # the extraction ran over the real tree
    problems = []
    for where, message in marked:
        key = message[0] if isinstance(message, tuple) else message
        entry = catalog.get(key)
        forms = entry.string if entry is not None else None
        forms = (forms,) if isinstance(forms, str) else forms
        if not forms or not all(forms):
            problems.append(f"{where}: no {locale} text for {key!r}")
            continue
        wanted = placeholders(key)
        if any(placeholders(form) != wanted for form in forms):
            problems.append(f"{where}: {locale} placeholders differ for {key!r}")
    assert problems == []


def unmarked(node: ast.AST) -> bool:
    """A literal with words that went to a sink without `_()`, `N_()`, `ngettext()` or `Text()`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(WORDS.search(node.value))
    if isinstance(node, ast.JoinedStr):
        return any(unmarked(part) for part in node.values if isinstance(part, ast.Constant))
    if isinstance(node, ast.BinOp):
        return unmarked(node.left) or unmarked(node.right)
    if isinstance(node, ast.IfExp):
        return unmarked(node.body) or unmarked(node.orelse)
    return False


def unmarked_sinks(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SINKS:
            positions, keywords = SINKS[node.func.id]
            args = [a for i, a in enumerate(node.args) if i in positions]
            args += [k.value for k in node.keywords if k.arg in keywords]
            found += [f"{a.lineno}: {ast.unparse(a)}" for a in args if unmarked(a)]
    return found


def test_every_user_facing_string_in_bot_and_plugins_is_marked() -> None:
    problems = []
    for folder in ("bot", "plugins"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            problems += [f"{path.relative_to(REPO_ROOT)}:{p}" for p in unmarked_sinks(path.read_text())]
    assert problems == []


def test_the_check_catches_unmarked_replies_and_passes_marked_ones() -> None:
    source = textwrap.dedent(
        """
        Reply("Nothing found.")
        Reply(f"Removed {name}.", failed=True)
        Reply(text, title="Summary")
        Command("x", "do a thing", handler)
        Reply(_("Nothing found."))
        Reply(f"{a} → {b}")
        Command("y", N_("do another thing"), handler)
        """
    )
    assert [line.split(":")[0] for line in unmarked_sinks(source)] == ["2", "3", "4", "5"]


def test_the_locale_is_the_persons_choice_then_the_channels_then_the_clients_then_the_messages_then_the_places() -> (
    None
):
    def pick(mine: str = "", channel: str = "", client: str = "", text: str = "", place: str = "") -> str:
        return resolve(mine=mine, channel=channel, client=client, text=text, place=place)

    assert pick(mine="en", channel="zh-CN", client="zh-CN", text="怎么部署？", place="zh-CN") == "en"
    assert pick(mine="zh-CN", channel="en", client="en-US", text="hello there friends", place="en-US") == "zh-CN"
    assert pick(channel="zh-CN", client="en-US", text="hello there friends", place="en-US") == "zh-CN"
    assert pick(client="zh-CN", text="how do I deploy this", place="en-US") == "zh-CN"
    assert pick(client="en-GB", text="怎么部署？", place="zh-CN") == "en"
    assert pick(text="怎么部署到测试环境？", place="en-US") == "zh-CN"
    assert pick(text="how do I deploy to staging?", place="zh-CN") == "en"
    assert pick(text="ok", place="zh-CN") == "zh-CN"  # too short to tell
    assert pick(client="fr", text="bonjour à tous") == "en"  # no French texts
    assert pick(text="これは日本語です") == "en"  # kana: not Chinese
    assert pick(client="zh-TW") == "zh-TW"
    assert pick(client="zh-Hant") == "zh-TW"
    assert pick(text="怎麼部署到測試環境？", place="zh-HK") == "zh-CN"  # script alone: Simplified


def test_languages_are_understood_by_their_names_in_english_chinese_and_their_own() -> None:
    codes = {name: i18n.language_code(name) for name in ("中文", "Chinese", "汉语", "英语", "英文", "English")}
    assert codes == {"中文": "zh", "Chinese": "zh", "汉语": "zh", "英语": "en", "英文": "en", "English": "en"}
    assert [i18n.language_code(n) for n in ("日本語", "日文", "français", "法语", "Deutsch", "ＦＲ")] == [
        "ja",
        "ja",
        "fr",
        "fr",
        "de",
        "fr",
    ]
    assert i18n.language_code("klingonese") is None
    assert [i18n.normalize(n) for n in ("中文", "简体中文", "繁體中文", "英文", "zh_TW.UTF-8")] == [
        "zh-CN",
        "zh-CN",
        "zh-TW",
        "en",
        "zh-TW",
    ]
    assert i18n.normalize("日本語") is None  # a language quill has no texts in


def test_numbers_and_plurals_follow_the_locale() -> None:
    assert i18n.ngettext("{count} passage", "{count} passages", 1) == "1 passage"
    assert i18n.ngettext("{count} passage", "{count} passages", 12_000) == "12,000 passages"
    with locale_scope("zh-CN"):
        assert i18n.ngettext("{count} passage", "{count} passages", 3) == "3 个段落"
    assert i18n.current_locale() == "en"  # the scope ends with its block


def test_a_plugin_ships_its_own_catalog_beside_its_module(tmp_path: Path) -> None:
    folder = tmp_path / "locale" / "zh_CN" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    (folder / "greeter.po").write_text(
        'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=utf-8\\n"\n\n'
        'msgid "Hello, {name}!"\nmsgstr "你好，{name}！"\n',
        encoding="utf-8",
    )
    module = types.ModuleType("greeter")
    module.__file__ = str(tmp_path / "greeter.py")
    pm = pluggy.PluginManager("quill")
    try:
        plugins._register(pm, "greeter", lambda: module)
        with locale_scope("zh-CN"):
            assert _("Hello, {name}!", name="Ada") == "你好，Ada！"
            assert _("Nothing new.") == "没有新内容。"  # quill's own catalog still serves
        assert _("Hello, {name}!", name="Ada") == "Hello, Ada!"
    finally:
        i18n._folders.remove(tmp_path / "locale")
        i18n.translations.cache_clear()
        i18n.available.cache_clear()


def request(text: str, **fields: object) -> Request:
    values: dict[str, object] = {
        "transport": "discord",
        "guild_id": "g1",
        "channel_id": "help",
        "author_id": "u1",
        "author_name": "Bea",
        "text": text,
        "place_locale": "en-US",
    }
    values.update(fields)
    return Request(**values)  # type: ignore[arg-type]


async def test_a_chinese_ask_with_no_hit_gets_the_chinese_nothing_found_and_english_stays_english(
    app: Quill,
) -> None:
    chinese = await app.router.handle(request("/ask 午饭时间是几点？"))
    assert chinese.text == gettext_in("zh-CN", NOTHING_FOUND) and CJK.search(chinese.text)
    english = await app.router.handle(request("/ask how long is the lunch break?"))
    assert english.text == NOTHING_FOUND
    usage = await app.router.handle(request("/ask", locale="zh-CN"))
    assert usage.failed and usage.text.startswith("用法：/ask")


async def test_refusals_and_usage_come_in_the_users_language(app: Quill) -> None:
    refused = await app.router.handle(request("/summarize hours:99999999999", locale="zh-CN"))
    assert refused.failed
    assert refused.text.startswith("/summarize：hours 需要1 到 8,760 之间的整数") and "用法：/summarize" in refused.text
    english = await app.router.handle(request("/summarize hours:99999999999", locale="en-US"))
    assert english.text.startswith("/summarize: hours takes a whole number from 1 to 8,760")
    unknown = await app.router.handle(request("/nosuch 你好"))
    assert unknown.text == "没有 /nosuch 这个命令。输入 /help 查看命令列表。"
    admin_only = await app.router.handle(request("/kb-remove 手册", admin_hint="管理员看 QUILL_ADMIN_IDS。"))
    assert admin_only.failed and admin_only.text.startswith("/kb-remove 仅限管理员使用。")


async def test_help_in_zh_cn_lists_every_command_with_a_chinese_description(app: Quill) -> None:
    text = (await app.router.handle(request("/help", locale="zh-CN", is_admin=True))).text
    assert text.startswith("命令：")
    lines = text.splitlines()
    for command in app.router.commands.values():
        [line] = [x for x in lines if x.startswith(f"  /{command.name} ")]
        description = gettext_in("zh-CN", command.help)
        assert description != command.help and CJK.search(description), command.name
        assert line.endswith(description + "  （管理员）" if command.admin else description)
    english = (await app.router.handle(request("/help", locale="en-US"))).text
    assert english.startswith("Commands:") and not CJK.search(english)


async def test_an_admins_language_for_a_channel_comes_before_the_client_and_the_message(app: Quill) -> None:
    assert (await app.router.handle(request("/language scope:channel zh-CN", is_admin=True))).text == (
        "现在，quill 在此频道中使用 zh-CN 回答。"
    )
    nothing = await app.router.handle(request("/ask how long is the lunch break?", locale="en-US"))
    assert nothing.text == gettext_in("zh-CN", NOTHING_FOUND)
    elsewhere = await app.router.handle(request("/ask how long is the lunch break?", channel_id="other"))
    assert elsewhere.text == NOTHING_FOUND
    refused = await app.router.handle(request("/language scope:channel klingon", is_admin=True))
    assert refused.failed and "klingon" in refused.text
    back = await app.router.handle(request("/language scope:channel auto", is_admin=True))
    assert back.text == "现在，quill 在这里用每个人自己的语言回答。"  # said in the language it was asked in
    assert (await app.router.handle(request("/ask how long is the lunch break?"))).text == NOTHING_FOUND


async def test_a_persons_own_language_comes_first_everywhere_and_only_for_them(app: Quill) -> None:
    mine = await app.router.handle(request("/language 中文", author_id="u2"))
    assert not mine.failed and mine.text == "现在，无论你在哪里找 quill，它都用 zh-CN 回答你。"
    for where in ({}, {"channel_id": "other"}, {"guild_id": "g2", "channel_id": "x"}, {"guild_id": "", "is_dm": True}):
        english = request("/ask how long is the lunch break?", author_id="u2", locale="en-US", **where)
        assert (await app.router.handle(english)).text == gettext_in("zh-CN", NOTHING_FOUND), where
    others = await app.router.handle(request("/ask how long is the lunch break?", author_id="u3"))
    assert others.text == NOTHING_FOUND  # an English user in the same channel still gets English
    # Their own choice beats the channel's: English for u4 in a channel set to Chinese.
    await app.router.handle(request("/language scope:channel zh-CN", is_admin=True))
    await app.router.handle(request("/language en", author_id="u4"))
    assert (await app.router.handle(request("/ask 午饭几点？", author_id="u4"))).text == NOTHING_FOUND
    shown = await app.router.handle(request("/language", author_id="u4"))
    assert shown.text.splitlines() == [
        "quill answers you in en, as you chose (/language auto undoes it).",
        "quill answers in zh-CN in this channel.",
    ]
    shown = await app.router.handle(request("/language", author_id="u3", locale="en-US"))
    assert shown.text.splitlines()[0].startswith("你没有选择语言")  # the channel's Chinese, for u3
    # A channel's language is an admin's to set; a person's own is anyone's.
    refused = await app.router.handle(request("/language scope:channel en", author_id="u3"))
    assert refused.failed and refused.text == "只有管理员能设置频道的语言。只为你自己设置：/language en"
    assert (await app.router.handle(request("/language scope:everyone en"))).failed
    back = await app.router.handle(request("/language auto", author_id="u2", channel_id="other"))
    assert back.text.startswith("现在，quill 用此频道的语言回答你")  # said in the language it was asked in
    again = request("/ask how long is the lunch break?", author_id="u2", channel_id="other", locale="en-US")
    assert (await app.router.handle(again)).text == NOTHING_FOUND
    assert await app.memory.get_settings("", "", "language", "u4") == {"language.locale": "en"}
    assert await app.memory.get_settings("", "", "language", "u2") == {}


async def test_a_persons_language_is_their_data_erased_and_exported_with_the_rest(app: Quill) -> None:
    await app.router.handle(request("/language zh-TW", author_id="u5"))
    await app.router.handle(request("/language en", author_id="u6"))
    exported = await app.memory.export_user("u5")
    assert [row["value"] for row in exported["user_setting"]] == ['"zh-TW"']
    erased = await app.router.handle(request("/forget me", author_id="u5"))
    assert not erased.failed and "user_setting" in erased.text
    assert await app.memory.get_settings("", "", "language", "u5") == {}
    assert await app.memory.get_settings("", "", "language", "u6") == {"language.locale": "en"}


@pytest.mark.parametrize(
    ("locale", "first", "apology"),
    [("zh-CN", "没有新内容。", "抱歉，/stream 出错了"), ("en", "Nothing new.", "Sorry, /stream failed")],
)
async def test_a_streamed_reply_and_its_failure_are_in_the_requests_language(
    app: Quill, locale: str, first: str, apology: str
) -> None:
    """The stream runs after the handler returned: its pieces still see the request's locale."""
    from bot.api import Command, Reply, hookimpl
    from bot.router import Router

    async def pieces():
        yield _("Nothing new.")
        raise RuntimeError("boom")

    class Streamer:
        @hookimpl
        def register_commands(self, register):
            register(Command("stream", "stream", lambda ctx, req: _reply(Reply(stream=pieces()))))

    async def _reply(reply: Reply) -> Reply:
        return reply

    app.plugins.register(Streamer(), "streamer")
    router = Router(app.context)
    reply = await router.handle(request("/stream", locale=locale))
    assert reply.stream is not None
    text = "".join([p async for p in reply.stream])
    assert text.startswith(first) and apology in text and reply.failed


def test_a_prompt_comes_in_the_requests_language_where_one_is_written_else_the_default(tmp_path: Path) -> None:
    team = tmp_path / "team"
    (team / "zh-CN").mkdir(parents=True)
    (team / "greet.j2").write_text("Say hello to {{ name }}.", encoding="utf-8")
    (team / "zh-CN" / "greet.j2").write_text("向 {{ name }} 问好。", encoding="utf-8")
    (team / "bye.j2").write_text("Say goodbye.", encoding="utf-8")
    loader = PromptLoader(team)
    with locale_scope("zh-CN"):
        assert loader.render("greet", name="小明") == "向 小明 问好。"
        assert loader.render("bye") == "Say goodbye."  # no Chinese one: the default
        assert loader.render("greet", locale="en", name="Ada") == "Say hello to Ada."
    assert loader.render("greet", name="Ada") == "Say hello to Ada."
    assert loader.render("greet", locale="zh-TW", name="Ada") == "Say hello to Ada."  # none for zh-TW
    # A team's override of a built-in prompt applies in every language it has not written.
    (team / "chat_system.j2").write_text("Team chat prompt for {{ bot_name }}.", encoding="utf-8")
    assert loader.render("chat_system", locale="zh-CN", bot_name="quill") == "Team chat prompt for quill."
    with pytest.raises(LookupError, match="nosuch"):
        loader.render("nosuch", locale="zh-CN")


def test_a_plugin_ships_its_own_prompts_beside_its_module(tmp_path: Path) -> None:
    (tmp_path / "prompts" / "zh-CN").mkdir(parents=True)
    (tmp_path / "prompts" / "greeter_system.j2").write_text("Greet warmly.", encoding="utf-8")
    (tmp_path / "prompts" / "zh-CN" / "greeter_system.j2").write_text("热情地问好。", encoding="utf-8")
    module = types.ModuleType("greeter")
    module.__file__ = str(tmp_path / "greeter.py")
    try:
        plugins._register(pluggy.PluginManager("quill"), "greeter", lambda: module)
        loader = PromptLoader(BUILTIN_PROMPTS)
        assert loader.render("greeter_system") == "Greet warmly."
        assert loader.render("greeter_system", locale="zh-CN") == "热情地问好。"
        assert loader.render("chat_system", bot_name="quill").startswith("You are quill")  # quill's own still served
    finally:
        prompts._plugin_folders.remove(tmp_path / "prompts")
        prompts._environment.cache_clear()
        i18n.available.cache_clear()


def test_finetune_status_lines_come_in_the_readers_language() -> None:
    figures = {
        "groups": {"groups": 5, "exchanges": 12, "train": 3, "heldout": 2},
        "losses": [2.5, 1.25],
        "heldout": {"base": 2.0, "adapter": 1.5, "examples": 4},
        "decision": {"deploy": True, "reason": "held-out NLL fell -25.0%"},
    }
    run = FinetuneRun(
        id=3, status="deployed", base_model="m", dataset_path="d/7", dataset_sha256="x", n_train=12, n_heldout=4
    )
    run.nll_before, run.nll_after, run.figures = 2.0, 1.5, json.dumps(figures)
    english = [finetune.describe(run), *finetune.details(run)]
    assert english == [
        "deployed (served now), held-out NLL/token 2.000 -> 1.500; dataset d/7 (12 train, 4 held out)",
        "  groups of distinct questions: 5 among 12 exchanges (3 train, 2 held out)",
        "  train loss: 2 steps, 2.500 -> 1.250 (lowest 1.250)",
        "  held-out NLL/answer token: base 2.000, adapter 1.500 (-25.0%; 4 exchanges)",
        "  deploy: held-out NLL fell -25.0%",
    ]
    with locale_scope("zh-CN"):
        chinese = [finetune.describe(run), *finetune.details(run)]
    assert chinese == [
        "已部署（正在使用），留出集每词元 NLL 2.000 -> 1.500；数据集 d/7（12 条训练，4 条留出）",
        "  不同问题的组数：12 条问答中有 5 组（3 组训练，2 组留出）",
        "  训练损失：2 步，2.500 -> 1.250（最低 1.250）",
        "  留出集每个回答词元的 NLL：基础模型 2.000，适配器 1.500（-25.0%；4 条问答）",
        "  部署：held-out NLL fell -25.0%",  # the gate's reason is stored as written, in English
    ]


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("en", "Bad time '25:00'; use 24-hour HH:MM, e.g. 09:30."),
        ("zh-CN", "时间 '25:00' 有误；请用 24 小时制 HH:MM，例如 09:30。"),
        ("zh-TW", "時間 '25:00' 有誤；請用 24 小時制 HH:MM，例如 09:30。"),
    ],
)
def test_errors_raised_deep_in_the_core_are_translated_where_they_are_shown(locale: str, expected: str) -> None:
    with pytest.raises(ScheduleError) as raised:
        parse_when("daily 25:00", "UTC")
    assert str(raised.value) == "Bad time '25:00'; use 24-hour HH:MM, e.g. 09:30."  # the log's, English
    with locale_scope(locale):
        assert error_text(raised.value) == expected
    with pytest.raises(ContextOverflow) as overflow:
        reply_room(5000, 4096)
    with locale_scope(locale):
        shown = error_text(overflow.value)
    assert ("5,000" in shown and "4,096" in shown) and (bool(CJK.search(shown)) == (locale != "en"))


async def test_a_chinese_user_gets_the_schedule_error_in_chinese(app: Quill) -> None:
    reply = await app.router.handle(request("/schedule add 日报 daily 25:00 /digest", is_admin=True, locale="zh-CN"))
    assert reply.failed and "时间 '25:00' 有误" in reply.text
    reply = await app.router.handle(request("/schedule add daily-report daily 25:00 /digest", is_admin=True))
    assert reply.failed and "Bad time '25:00'" in reply.text


CHART_LABELS = [
    *MOOD_NAMES.values(),
    *finetune.CHART_BARS.values(),
    "Messages per day, by mood",
    "fine-tune run {id}: {status}",
    "train loss per step ({count} steps)",
    "last {loss}",
    "NLL per answer token: base | adapter",
    *finetune.STATUSES.values(),
]


@pytest.mark.parametrize("locale", sorted(CATALOGS))
def test_every_chart_label_can_be_drawn_in_chinese(locale: str) -> None:
    """Pillow's own font has no Chinese glyphs: the charts' font must hold every character of
    their translated labels (else `python -m bot.charts FONT` cuts it again)."""
    from fontTools.ttLib import TTFont

    have = set(TTFont(charts.FONT)["cmap"].getBestCmap())
    for label in CHART_LABELS:
        translated = gettext_in(locale, label)
        assert translated != label, label
        missing = {c for c in translated if ord(c) not in have}
        assert not missing, (label, missing)
    with locale_scope(locale):
        font = charts.chart_font(13)
    # A glyph the font has differs from the box drawn for one it lacks.
    assert drawn("每", font) != drawn("\U000f0000", font)


def drawn(text: str, font: object) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("L", (40, 40))
    ImageDraw.Draw(image).text((4, 4), text, fill=255, font=font)
    return image.tobytes()


def test_the_digest_chart_is_drawn_with_the_readers_labels() -> None:
    days = {"周一 12-01": {"positive": 3, "neutral": 2, "negative": 1}, "周二 12-02": {"neutral": 4}}
    with locale_scope("zh-CN"):
        legend = {label: _(name) for label, name in MOOD_NAMES.items()}
        chinese = chart.draw(days, _("Messages per day, by mood"), legend)
    assert legend == {"positive": "正面", "neutral": "中性", "negative": "负面"}
    english = chart.draw(days, "Messages per day, by mood", {label: _(n) for label, n in MOOD_NAMES.items()})
    assert chinese.startswith(b"\x89PNG") and english.startswith(b"\x89PNG") and chinese != english


def test_an_answers_sources_are_named_in_the_readers_language() -> None:
    doc = Hit(kind="doc", text="", score=1.0, name="常见问题", heading="午饭")
    said = Hit(kind="message", text="", score=1.0, message_id="#7", author="Bea")
    place = Place("console", "", "help")
    assert [source_label(doc, place), source_label(said, place)] == ["document “常见问题” › 午饭", "Bea, message #7"]
    with locale_scope("zh-CN"):
        assert [source_label(doc, place), source_label(said, place)] == ["文档“常见问题” › 午饭", "Bea，消息 #7"]
