"""Text to search terms, the same for every database: what gets indexed and what a question asks.

Neither SQLite's unicode61 tokenizer nor PostgreSQL's parser segments Chinese, Japanese or
Korean: a whole clause becomes one token, and a Latin word written inside it is glued on
(`adam优化器`). So terms are made here, in Python, and stored beside the text (`terms` columns);
the databases only index those space-separated terms (FTS5 on SQLite, a 'simple' tsvector on
PostgreSQL), so both find exactly the same passages.

- Runs of CJK script and of other letters/digits are split apart.
- Han text is segmented into words with jieba (search mode), kana and hangul into character
  bigrams as Lucene's CJKAnalyzer does; `bench/retrieval.py --cjk bigram` measures bigrams for
  Han too (jieba won on the shipped evaluation set, see README "Knowledge base").
- Latin words are case-folded and stemmed (Snowball English), so "deploys" finds "deploy".
- Stop words are dropped per language (English and Chinese lists below).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from typing import Literal

import jieba
import snowballstemmer

CjkMode = Literal["jieba", "bigram"]

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_KANA_HANGUL = "\u3040-\u30ff\u31f0-\u31ff\uac00-\ud7af"
_CJK = _HAN + _KANA_HANGUL
# A CJK run, or a run of other letters and digits (underscore excluded).
_TOKEN = re.compile(rf"([{_CJK}]+)|((?:(?![{_CJK}])[^\W_])+)")
_HAN_RUN = re.compile(rf"[{_HAN}]+")

ENGLISH_STOPWORDS = frozenset(
    """a about above after again all am an and any are as at be been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her
    here hers him his how i if in into is it its itself just me more most my no nor not now of off on
    once only or other our ours out over own same she should so some such than that the their theirs
    them then there these they this those through to too under until up very was we were what when
    where which while who whom why will with would you your yours please tell know""".split()  # noqa: SIM905
)
# Function words and question words of Mandarin (simplified and traditional), as jieba cuts them.
CHINESE_STOPWORDS = frozenset(
    """的 了 是 在 和 与 及 或 也 都 就 把 被 让 给 对 从 向 于 而 但 并 等 吗 呢 吧 啊 呀 嘛 么 之 其 此
    这 那 哪 这个 那个 哪个 这些 那些 哪些 什么 怎么 怎样 怎么样 如何 为什么 为何 多少 几 是否 是不是 有没有
    我 你 您 他 她 它 我们 你们 他们 她们 它们 咱们 自己 请问 请 一下 可以 能 能否 会 要 应该 需要 有 没有
    没 不 很 太 更 最 还 又 再 才 已经 一个 一种 一些 个 种 吗？ 呢？ 們 麼 這 那麼 這個 哪裡 哪里 为 為 着 過 过
    这是 那是 就是 还是 也是 都是 不是 這是 什麼 什 時候 时候 时 的话 关于 告诉 知道 说 一 上 下 中 里""".split()  # noqa: SIM905
)
MAX_QUERY_TERMS = 24
# How Han text is cut: what the stored terms were made with, so one mode per process. Only
# bench/retrieval.py changes it (to measure bigrams against jieba on a scratch database).
CJK_MODE: CjkMode = "jieba"

jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary loading at INFO to stderr
_stemmer = snowballstemmer.stemmer("english")


@functools.lru_cache(maxsize=65_536)
def _latin(word: str) -> str:
    """A case-folded word's stem ("" for a stop word or a lone letter)."""
    if len(word) < 2 or word in ENGLISH_STOPWORDS:
        return ""
    return word if word.isdigit() else _stemmer.stemWord(word)


def _bigrams(run: str) -> Iterator[str]:
    if len(run) == 1:
        yield run
    for i in range(len(run) - 1):
        yield run[i : i + 2]


def _cjk(run: str, mode: CjkMode) -> Iterator[str]:
    """Terms of a run of CJK characters: Han words (jieba), or bigrams between stop words."""
    if mode == "jieba":
        pos = 0
        for han in _HAN_RUN.finditer(run):
            yield from _bigrams(run[pos : han.start()]) if han.start() > pos else ()
            yield from (w for w in jieba.cut_for_search(han.group(), HMM=False) if w not in CHINESE_STOPWORDS)
            pos = han.end()
        if pos < len(run):
            yield from _bigrams(run[pos:])
        return
    for piece in _split_on_stopwords(run):
        yield from _bigrams(piece)


_STOP_SPLIT = re.compile("|".join(sorted(map(re.escape, CHINESE_STOPWORDS), key=len, reverse=True)))


def _split_on_stopwords(run: str) -> list[str]:
    return [p for p in _STOP_SPLIT.split(run) if p]


def terms(text: str) -> list[str]:
    """Every search term of `text` in order, repeats kept (term frequency counts in ranking)."""
    mode = CJK_MODE
    out: list[str] = []
    for cjk, other in _TOKEN.findall(text.casefold()):
        if cjk:
            out.extend(_cjk(cjk, mode))
        elif stem := _latin(other):
            out.append(stem)
    return out


def index_text(text: str) -> str:
    """The terms of `text` as the databases index them: one string, separated by spaces."""
    return " ".join(terms(text))


def query_terms(question: str) -> list[str]:
    """The distinct terms of a question, in order, at most MAX_QUERY_TERMS."""
    return list(dict.fromkeys(terms(question)))[:MAX_QUERY_TERMS]


def language(text: str) -> str:
    """ "zh" for a text mostly in CJK script, else "en": which fusion weight a question gets."""
    cjk = sum(len(run) for run, _ in _TOKEN.findall(text) if run)
    letters = sum(len(run) + len(other) for run, other in _TOKEN.findall(text))
    return "zh" if letters and cjk * 2 >= letters else "en"
