"""Units the API reports in: every ``*_mb`` field is decimal megabytes (10^6 bytes) and every
``*_gb`` setting decimal gigabytes (10^9 bytes), as the Hugging Face Hub and disk vendors show
sizes; ``*_bytes`` fields are bytes."""

MB = 1_000_000
GB = 1_000_000_000

# Durations (MODELHOST_KEEP_ALIVE, a request's ``keep_alive``): plain seconds, or numbers with
# units as Ollama (and Go) write them: "30s", "5m", "1h", "1h30m", "500ms". Any negative
# duration means "never"; it reads as NEVER.
NEVER = -1.0
DURATION_HELP = "keep_alive must be a duration such as 5m, 30s or -1"
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# What parse_duration accepts, as JSON Schema (the OpenAPI schema of every ``keep_alive``): a
# number, or a string of plain seconds or of number+unit groups. The server checks it itself
# (a 400 naming the syntax), so the schema only has to promise no more than it accepts.
DURATION_TEXT_PATTERN = r"^-?([0-9]+(\.[0-9]+)?|([0-9]+(\.[0-9]+)?(ms|h|m|s))+)$"
DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number"},
        {"type": "string", "pattern": DURATION_TEXT_PATTERN},
        {"type": "null"},
    ]
}


def parse_duration(value: object) -> float:
    """Seconds in ``value`` (a number of seconds, or a string such as ``5m``); ``NEVER`` (-1)
    for any negative duration. Raises ``ValueError`` (``DURATION_HELP``) for anything else."""
    if isinstance(value, bool) or value is None:
        raise ValueError(DURATION_HELP)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value.strip().lower())
    else:
        raise ValueError(DURATION_HELP)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN, infinities
        raise ValueError(DURATION_HELP)
    return NEVER if seconds < 0 else seconds + 0.0  # + 0.0: "-0" is 0.0


def _parse_duration_text(text: str) -> float:
    """``text`` in seconds: a plain number, or number+unit groups ("1h30m"), signed."""
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in ("+", "-") else text
    if not body or body[0] in ("+", "-"):
        raise ValueError(DURATION_HELP)
    try:
        return sign * float(body)  # plain seconds: "300", "-1", "2.5"
    except ValueError:
        pass
    total, number = 0.0, ""
    index = 0
    while index < len(body):
        char = body[index]
        if char.isdigit() or char == ".":
            number += char
            index += 1
            continue
        unit = "ms" if body.startswith("ms", index) else char
        if unit not in _UNIT_SECONDS or not number:
            raise ValueError(DURATION_HELP)
        try:
            total += float(number) * _UNIT_SECONDS[unit]
        except ValueError:
            raise ValueError(DURATION_HELP) from None
        number = ""
        index += len(unit)
    if number:  # digits with no unit after a unit: "1h30"
        raise ValueError(DURATION_HELP)
    return sign * total
