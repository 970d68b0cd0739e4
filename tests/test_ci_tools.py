"""A test whose tool is missing skips on a developer's machine and fails under CI (issue 19
#17): CI installs every tool, so a missing one there must show as a failure, not a skip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import need_module, need_tool

TESTS = Path(__file__).parent


def test_a_missing_tool_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-19 not installed: why"):
        need_tool("no-such-tool-19", "why")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_19 cannot be imported"):
        need_module("no_such_module_19", "why", module_level=False)


@pytest.mark.parametrize("value", ["true", "1"])
def test_a_missing_tool_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI must provide it: no-such-tool-19"):
        need_tool("no-such-tool-19", "why")
    with pytest.raises(pytest.fail.Exception, match="CI must provide it: no_such_module_19"):
        need_module("no_such_module_19", "why")


def test_a_present_tool_is_found(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert Path(need_tool("sh", "POSIX")).name == "sh"
    assert need_module("json", "stdlib").dumps([]) == "[]"


def test_no_test_skips_by_hand_on_a_tool_ci_installs():
    """nginx, aria2c, chromium (with playwright) and torchaudio are installed by .ci/run: the
    tests that need them go through need_tool / need_module / missing, never pytest.skip or
    importorskip (fails before: each skipped in silence when its tool was missing)."""
    direct = re.compile(r"pytest\.(skip|importorskip)\(|skipif\(")
    tools = re.compile(r"nginx|aria2|chromium|torchaudio|playwright", re.IGNORECASE)
    offending = []
    for path in sorted(TESTS.glob("test_*.py")):
        if path.name == "test_ci_tools.py":
            continue
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            near = " ".join(lines[max(0, number - 3) : number + 2])
            if direct.search(line) and tools.search(near):
                offending.append(f"{path.name}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)


def test_cuda_skips_say_they_need_a_cuda_gpu():
    """The one skip CI allows says why, in words pytest -ra prints."""
    for name in ("test_runtime.py", "test_streamer.py"):
        text = (TESTS / name).read_text()
        assert 'reason="needs a CUDA GPU"' in text, name
