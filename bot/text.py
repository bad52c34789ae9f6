"""Language-aware word sets for checks that must not depend on the model (does this answer share
words with that question, does a summary bullet rest on the message it cites).

English (and other space-separated text) gives lowercased words minus function words; Chinese has
no spaces, so each run of CJK characters gives its character bigrams (Lucene's CJKAnalyzer does
the same), minus those holding a function character (了, 的, 吗, ...).
"""

from __future__ import annotations

import itertools
import re

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_WORD = re.compile(r"[^\W_]+")
HAS_CJK = re.compile(f"[{_CJK}]")

_STOPWORDS = """a about above after again all also am an and any are as at be because been before being below
    between both but by can could did do does doing done down during each few for from further get got
    had has have having he her here hers him his how i if in into is it its itself just let lets like me
    more most my no nor not now of off on once only or other our ours out over own please same she should
    so some such than that the their theirs them then there these they this those through to too under
    until up very was we were what when where which while who whom whose why will with would yes yeah you
    your yours ok okay still really im ive ill dont cant wont thats theres one someone anyone everyone"""
STOPWORDS = frozenset(_STOPWORDS.split())
# Characters that carry grammar, not topic: a bigram holding one says little about the topic.
CJK_FUNCTION = frozenset(
    "的了吗呢吧啊呀么是在我你他她它们这那就也都和与及或而还很有没不要会能可以"  # particles, pronouns
    "个一来去到说过着给让被把对谁什么怎哪为几"  # measure words, light verbs, question words
)


def content_words(text: str) -> set[str]:
    """The words of `text` that carry its topic: English words (a plural or -ing/-ed ending folded
    away, so "releases" meets "release") and Chinese character bigrams."""
    words: set[str] = set()
    for run in _CJK_RUN.findall(text):
        chars = list(run)
        grams = ["".join(p) for p in itertools.pairwise(chars)] or chars
        words.update(g for g in grams if not set(g) & CJK_FUNCTION)
    latin = _CJK_RUN.sub(" ", text.lower().replace("'", ""))
    for word in _WORD.findall(latin):
        if word in STOPWORDS or (len(word) < 2 and not word.isdigit()):
            continue
        words.add(_fold(word))
    return words


def _fold(word: str) -> str:
    for ending in ("ing", "ed", "s"):
        if len(word) > len(ending) + 2 and word.endswith(ending) and not word.endswith("ss"):
            return word[: -len(ending)]
    return word
