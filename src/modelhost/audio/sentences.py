"""Split text at sentence boundaries: streamed speech and long-form jobs synthesize one
sentence at a time, so the first audio flows after one sentence and a job resumes at the
next one."""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (or their CJK forms), optionally followed by closing quotes or
# brackets, then whitespace; a blank line ends one too.
_BOUNDARY = re.compile(r"(?:(?<=[.!?…。！？])|(?<=[.!?…。！？][\"'”’)\]]))\s+|\n\s*\n")
# Longer pieces are cut at the last comma, semicolon or space before the limit: one
# synthesis call stays short (models degrade or refuse on very long inputs).
MAX_SENTENCE_CHARS = 400


def sentence_limit(max_input_chars: int) -> int:
    """The longest sentence spoken in one forward: ``MAX_SENTENCE_CHARS``, or less when
    MODELHOST_MAX_INPUT_CHARS (the most one request's text may be) is smaller."""
    return min(MAX_SENTENCE_CHARS, max_input_chars)


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """The sentences of ``text``, stripped, none empty, each at most ``max_chars`` long."""
    pieces = [p.strip() for p in _BOUNDARY.split(text)]
    sentences: list[str] = []
    for piece in pieces:
        if piece:
            sentences.extend(_cut(" ".join(piece.split()), max_chars))
    return sentences


def _cut(sentence: str, max_chars: int) -> list[str]:
    out: list[str] = []
    while len(sentence) > max_chars:
        window = sentence[:max_chars]
        cut = max(window.rfind(", "), window.rfind("; "))
        cut = cut + 1 if cut > 0 else window.rfind(" ")
        if cut <= 0:
            cut = max_chars
        out.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    if sentence:
        out.append(sentence)
    return out
