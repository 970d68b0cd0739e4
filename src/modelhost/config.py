"""Settings: one object, read once from the environment (``MODELHOST_*``), CLI flags override."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Hosts the ``url`` source may fetch from when MODELHOST_URL_ALLOW is not set: the public
# model hosts and the CDNs they redirect to.
DEFAULT_URL_ALLOW = (
    "huggingface.co",
    "cdn-lfs.huggingface.co",
    "cdn-lfs-us-1.huggingface.co",
    "cdn-lfs.hf.co",
    "cdn-lfs-us-1.hf.co",
    "cas-bridge.xethub.hf.co",
    "download.pytorch.org",
    "github.com",
    "codeload.github.com",
    "objects.githubusercontent.com",
    "raw.githubusercontent.com",
)

DEVICES = ("auto", "cpu", "cuda", "mps")


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything configurable about a modelhost server (see README, Configuration)."""

    model_config = SettingsConfigDict(
        env_prefix="MODELHOST_", extra="ignore", populate_by_name=True
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".cache" / "modelhost")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    url_allow: Annotated[tuple[str, ...], NoDecode] = DEFAULT_URL_ALLOW
    models_config: Path | None = None
    db_url: str | None = None
    device: str = "auto"
    max_downloads: int = Field(default=2, ge=1, le=64)
    cache_limit_gb: float | None = Field(default=None, gt=0)

    # Loaded models (runtime).
    max_loaded: int | None = Field(default=None, ge=1)
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    cpu_memory_limit_gb: float | None = Field(default=None, gt=0)
    load_on_demand: bool = False

    # Where torchvision's weight files are fetched from (a mirror replaces download.pytorch.org).
    torchvision_mirror: str | None = None
    # Where torchaudio's bundle weights are fetched from (replaces .../torchaudio/models).
    torchaudio_mirror: str | None = None
    # PyTorch Hub: repositories (owner/repo) whose hubconf.py may run, and an archive mirror.
    torch_hub_allow: Annotated[tuple[str, ...], NoDecode] = ()
    torch_hub_mirror: str | None = None

    # The Hugging Face Hub, read as huggingface_hub reads it.
    hf_endpoint: str = Field(
        default="https://huggingface.co",
        validation_alias=AliasChoices("HF_ENDPOINT", "hf_endpoint"),
    )
    hf_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "hf_token"),
        repr=False,
    )
    hf_hub_cache: Path | None = Field(
        default=None, validation_alias=AliasChoices("HF_HUB_CACHE", "hf_hub_cache")
    )
    # Air-gapped: the huggingface source installs from the HF_HUB_CACHE only, never the network.
    hf_hub_offline: bool = Field(
        default=False, validation_alias=AliasChoices("HF_HUB_OFFLINE", "hf_hub_offline")
    )

    # The ``local`` source imports directories under these roots only (none: the source is off).
    import_roots: Annotated[tuple[Path, ...], NoDecode] = ()

    # Fetch engine tuning; the defaults suit real hosts, tests shorten them.
    fetch_retries: int = Field(default=6, ge=0)
    fetch_backoff_s: float = Field(default=0.5, ge=0)
    fetch_backoff_max_s: float = Field(default=30.0, ge=0)
    fetch_read_timeout_s: float = Field(default=30.0, gt=0)
    fetch_parallel_files: int = Field(default=4, ge=1, le=32)

    @field_validator("url_allow", "torch_hub_allow", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @field_validator("import_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(p.strip()) for p in value.split(",") if p.strip())
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        base = value.split(":", 1)[0]
        if base not in DEVICES or (":" in value and not value.split(":", 1)[1].isdigit()):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N, not {value!r}")
        return value

    @model_validator(mode="after")
    def _non_loopback_needs_key(self) -> Settings:
        if not _is_loopback_host(self.host) and not self.api_key:
            raise ValueError(
                f"binding to {self.host} exposes the server beyond this machine: "
                "set MODELHOST_API_KEY (or bind to 127.0.0.1)"
            )
        return self

    @field_validator("hf_endpoint")
    @classmethod
    def _strip_endpoint(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def hub_cache_dir(self) -> Path:
        """The huggingface_hub cache to import verified files from."""
        if self.hf_hub_cache is not None:
            return self.hf_hub_cache
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'state.db'}"

    @property
    def cache_limit_bytes(self) -> int | None:
        return None if self.cache_limit_gb is None else int(self.cache_limit_gb * 1024**3)
