"""How many new tokens Whisper's decoder has room for, read from the model's config.

Both Whisper paths cap ``max_new_tokens`` with it: ``predict`` (``inference``) and
``/v1/audio/transcriptions`` (``transcription``). It is arithmetic on the config, so it
imports nothing, and neither path has to import the Whisper adapter for it.
"""

from __future__ import annotations

from typing import Any

# Tokens Whisper's generate puts before the first new one, at most: <|startoftranscript|>,
# the language, the task and <|notimestamps|> (fewer for English-only models or timestamps:
# counting four never asks for more than the decoder has room for).
FORCED_TOKENS = 4


def decoder_room(config: Any, prompt_tokens: int = 0) -> int:
    """How many new tokens the decoder has room for: the config's ``max_target_positions``
    (448 for OpenAI's checkpoints; smaller ones exist) minus the forced start tokens and a
    ``prompt_tokens``-long prompt. Below 1 when the prompt leaves no room."""
    limit = int(getattr(config, "max_target_positions", None) or 448)
    return limit - FORCED_TOKENS - prompt_tokens
