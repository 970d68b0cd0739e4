"""Settings from the environment and the command line's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from modelhost.cli import app
from modelhost.config import DEFAULT_URL_ALLOW, Settings
from modelhost.errors import SourceNotAllowed


def test_environment_is_read_once_into_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELHOST_HOME", str(tmp_path))
    monkeypatch.setenv("MODELHOST_URL_ALLOW", " Example.org, 127.0.0.1:9000 ,")
    monkeypatch.setenv("MODELHOST_MAX_DOWNLOADS", "5")
    monkeypatch.setenv("MODELHOST_CACHE_LIMIT_GB", "1.5")
    settings = Settings()
    assert settings.home == tmp_path
    assert settings.url_allow == ("example.org", "127.0.0.1:9000")
    assert settings.max_downloads == 5
    assert settings.cache_limit_bytes == int(1.5 * 10**9)  # GB: 10^9 bytes, as every *_GB
    assert settings.database_url == f"sqlite:///{tmp_path / 'state.db'}"


def test_defaults(monkeypatch):
    for name in ("MODELHOST_HOME", "MODELHOST_URL_ALLOW", "MODELHOST_HOST", "MODELHOST_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.home == Path.home() / ".cache" / "modelhost"
    assert settings.url_allow == () and settings.url_allow_defaults is True
    assert settings.effective_url_allow == DEFAULT_URL_ALLOW
    assert "huggingface.co" in settings.effective_url_allow
    assert settings.api_key is None and settings.cache_limit_bytes is None


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"host": "0.0.0.0"}, "set MODELHOST_API_KEY"),
        ({"device": "gpu7"}, "device must be one of"),
        ({"device": "cuda:x"}, "device must be one of"),
        ({"max_downloads": 0}, "greater than or equal to 1"),
    ],
)
def test_invalid_settings_are_refused(values, fragment):
    with pytest.raises(ValidationError, match=fragment):
        Settings(**values)


def test_non_loopback_bind_with_key_is_allowed():
    assert Settings(host="0.0.0.0", api_key="k").host == "0.0.0.0"


def test_serve_refuses_public_bind_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("MODELHOST_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert "MODELHOST_API_KEY" in result.output


def _policy_of(settings: Settings):
    from modelhost.api.app import build_services

    return build_services(settings).jobs.engine.policy


def test_url_allow_adds_to_the_public_hosts(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELHOST_URL_ALLOW", "127.0.0.1:9000")
    settings = Settings(home=tmp_path)
    assert settings.effective_url_allow == (*DEFAULT_URL_ALLOW, "127.0.0.1:9000")
    policy = _policy_of(settings)
    assert policy.check("http://127.0.0.1:9000/m.bin").host == "127.0.0.1"
    # torchvision's and torchaudio's weights host stays allowed next to the listed one.
    assert policy.check("https://download.pytorch.org/models/resnet50.pth").port == 443
    assert policy.check("https://huggingface.co/x/resolve/main/a").host == "huggingface.co"
    with pytest.raises(SourceNotAllowed, match="Host 127.0.0.1:9001 is not in MODELHOST_URL"):
        policy.check("http://127.0.0.1:9001/m.bin")


def test_url_allow_defaults_false_drops_the_public_hosts(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELHOST_URL_ALLOW", "127.0.0.1:9000")
    monkeypatch.setenv("MODELHOST_URL_ALLOW_DEFAULTS", "false")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    settings = Settings(home=tmp_path)
    assert settings.effective_url_allow == ("127.0.0.1:9000",)
    policy = _policy_of(settings)
    assert policy.check("http://127.0.0.1:9000/m.bin").port == 9000
    for url in (
        "https://download.pytorch.org/models/resnet50.pth",
        "https://huggingface.co/x/resolve/main/a",
        "https://github.com/a/b/archive/main.zip",
    ):
        with pytest.raises(SourceNotAllowed, match="is not in MODELHOST_URL_ALLOW"):
            policy.check(url)
