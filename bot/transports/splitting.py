"""Splitting a long reply into messages that fit a chat service's length limit.

Cuts fall on paragraph breaks where possible, then line breaks, then spaces, and only as a last
resort mid-word. A code block cut in two is closed at the end of one part and reopened (with its
language) at the start of the next, so every part renders as valid Markdown on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

DISCORD_MESSAGE_LIMIT = 2000
FENCE = "```"
CLOSE = "\n" + FENCE
# A reopened fence line longer than this (an odd info string) is reopened as a bare fence.
MAX_FENCE_LINE = 40


def _fence_after(line: str, fence: str | None) -> str | None:
    """The open fence after `line`, given the one open before it (None: outside code)."""
    stripped = line.strip()
    if not stripped.startswith(FENCE):
        return fence
    if fence is not None:
        return None
    if stripped.count(FENCE) > 1:  # ```inline``` opens and closes on one line
        return None
    return stripped if len(stripped) <= MAX_FENCE_LINE else FENCE


@dataclass
class _Cut:
    end: int  # the part ends before this offset of the window
    resume: int  # the next part starts at this offset
    fence: str | None  # the fence open at `end`


def _choose_cut(window: str, fence: str | None) -> _Cut:
    """Where to end a part inside `window` (which is too long to send whole)."""
    floor = len(window) // 4
    best: dict[str, _Cut] = {}
    offset = 0
    lines = window.split("\n")
    for index, line in enumerate(lines[:-1]):  # the last line runs past the window
        line_fence = fence
        end = offset + len(line)
        fence = _fence_after(line, fence)
        if end >= floor:
            cut = _Cut(end, end + 1, fence)
            if fence is None:
                best["line"] = cut
                if lines[index + 1].strip() == "":
                    best["paragraph"] = cut
            else:
                best["code line"] = cut
        if end < floor or not line.strip().startswith(FENCE):
            space = line.rfind(" ", max(0, floor - offset))
            if space > 0:
                best["space"] = _Cut(offset + space, offset + space + 1, line_fence)
        offset = end + 1
    last = lines[-1]
    space = last.rfind(" ", max(0, floor - offset))
    if space > 0 and not last.strip().startswith(FENCE):
        best["space"] = _Cut(offset + space, offset + space + 1, fence)
    for kind in ("paragraph", "line", "code line", "space"):
        if kind in best:
            return best[kind]
    return _Cut(len(window), len(window), fence)


def split_message(text: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[str]:
    """Split `text` into parts of at most `limit` characters without breaking code fences.

    Whitespace-only text gives no parts. A fence left open at the end (a reply cut short) is
    closed, so the last part renders as code too.
    """
    text = text.strip()
    if not text:
        return []
    parts: list[str] = []
    fence: str | None = None  # the fence open where the next part starts
    start = 0
    while start < len(text):
        prefix = f"{fence}\n" if fence else ""
        rest = text[start:]
        end_fence = fence
        for line in rest.split("\n"):
            end_fence = _fence_after(line, end_fence)
        if len(prefix) + len(rest) + (len(CLOSE) if end_fence else 0) <= limit:
            cut = _Cut(len(rest), len(rest), end_fence)
        else:
            cut = _choose_cut(rest[: limit - len(prefix) - len(CLOSE)], fence)
        body = rest[: cut.end].strip("\n")
        if body.strip():
            parts.append(prefix + body + (CLOSE if cut.fence else ""))
        fence = cut.fence
        start += cut.resume
        while start < len(text) and text[start] == "\n":
            start += 1
    return parts
