"""Settings: one object, read once from the environment (``MODELHOST_*``), CLI flags override."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from modelhost.units import GB, MB, parse_duration

# Hosts the ``url`` source may always fetch from: the public model hosts and the CDNs they
# redirect to. MODELHOST_URL_ALLOW adds to them; MODELHOST_URL_ALLOW_DEFAULTS=false drops them.
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
# convert: pickled state dicts are converted to safetensors by an isolated worker process;
# refuse: no pickle is ever downloaded; allow: pickles are stored as they are, with the
# request's allow_pickle, and loaded with torch.load(weights_only=True) in the server.
PicklePolicy = Literal["convert", "refuse", "allow"]
# The Hugging Face mirror under /hf: off (every /hf route answers 404 saying so); cache
# (installed huggingface models are served; the default); pull (pull-through of what is not
# installed: not built yet, such requests answer 501).
MirrorMode = Literal["off", "cache", "pull"]


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
    # Extra hosts the url source may fetch from, added to DEFAULT_URL_ALLOW (unless
    # url_allow_defaults is false, then they are the whole list).
    url_allow: Annotated[tuple[str, ...], NoDecode] = ()
    url_allow_defaults: bool = True
    # Host headers the server answers (DNS rebinding): ``host`` (any port) or ``host:port``.
    # Empty means the loopback names and the bind address (see ``effective_allowed_hosts``).
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # Origins (scheme://host[:port]) a browser page may change state from; CORS headers too.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    models_config: Path | None = None
    db_url: str | None = None
    device: str = "auto"
    max_downloads: int = Field(default=2, ge=1, le=64)
    cache_limit_gb: float | None = Field(default=None, gt=0)
    # Disk space (MB) a download must leave free on the home's filesystem; checked before
    # any byte moves, so a download that cannot fit is refused instead of filling the disk.
    disk_reserve_mb: float = Field(default=512, ge=0)

    # Pickled weights (see PicklePolicy), and the limits of the worker that converts them.
    pickle_policy: PicklePolicy = "convert"
    convert_timeout_s: float = Field(default=1800.0, gt=0)
    convert_memory_gb: float | None = Field(default=None, gt=0)

    # Loaded models (runtime).
    max_loaded: int | None = Field(default=None, ge=1)
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    cpu_memory_limit_gb: float | None = Field(default=None, gt=0)
    # Inference on an installed model that is not loaded loads it (one load for concurrent
    # first requests); false: such requests answer 409 "load it first".
    load_on_demand: bool = True
    # Seconds a loaded model stays loaded after its last request ended ("5m", "30s", "1h" or
    # seconds; -1: never unloaded; 0: unloaded right after each request). Pinned models stay.
    keep_alive: float = 300.0
    # Seconds an unload or delete waits for the requests in flight (running or queued on the
    # model's worker) before it frees the model; those still queued then answer 409 / 404.
    unload_drain_s: float = Field(default=30.0, ge=0)
    # The longest text one inference request may carry, in characters: /synthesize, each
    # sentence of /v1/audio/speech, predict's text inputs, /v1/embeddings' inputs. One
    # request's text must not take the server's memory (a 5,000-character VITS request grew
    # it past 24 GB); longer texts go through /v1/audio/speech (sentence by sentence) or a
    # speech job. The model's own positions (max_position_embeddings) apply on top of it.
    max_input_chars: int = Field(default=4096, ge=1, le=1_000_000)
    # Import torch and transformers in a background thread a second after start (false: the
    # first load imports them). Tests turn it off to see a request's own imports.
    warm_up: bool = True
    # Speech jobs (/v1/audio/speech/jobs) running at once, over all models (one per model).
    speech_jobs_max_running: int = Field(default=2, ge=1, le=16)
    # CUDA loads stream safetensors weights onto the GPU (parallel reads into pinned buffers,
    # copies overlapping reads: runtime/streamer.py); false: from_pretrained, as on CPU.
    gpu_stream: bool = True

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

    # The Hugging Face Hub read protocol under /hf, serving installed huggingface models.
    mirror: MirrorMode = "cache"

    # The ``local`` source imports directories under these roots only (none: the source is off).
    import_roots: Annotated[tuple[Path, ...], NoDecode] = ()

    # Fetch engine tuning; the defaults suit real hosts, tests shorten them.
    fetch_retries: int = Field(default=6, ge=0)
    fetch_backoff_s: float = Field(default=0.5, ge=0)
    fetch_backoff_max_s: float = Field(default=30.0, ge=0)
    # Connect and read timeout of every call to another host (Hub metadata, probes,
    # config.json, file transfers).
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    # Overrides upstream_timeout_s for the reads of file transfers only (None: use it).
    fetch_read_timeout_s: float | None = Field(default=None, gt=0)
    fetch_parallel_files: int = Field(default=4, ge=1, le=32)
    # Multi-connection downloads: a file of known size of at least fetch_part_threshold_mb
    # (MB, 10^6 bytes) is fetched as parts, when the server honours Range. It starts with one
    # ranged connection and adds more while each step pays (1, 2, 8, 16, 32: fetch/parts.py,
    # PROBE_SHARE): fetch_connections is the most the probe may reach per file (not how many
    # it opens; 1: always one stream). fetch_max_connections caps transfer connections across
    # all downloads together: 32, so that one file may use as many as the probe allows (a
    # per-connection cap, as CDNs have, pays for every connection the machine can take; on a
    # 2-core machine the probe stops at 16). fetch_part_size_mb None: about four parts per
    # connection (8-64 MiB).
    fetch_connections: int = Field(default=32, ge=1, le=64)
    fetch_max_connections: int = Field(default=32, ge=1, le=1024)
    fetch_part_threshold_mb: float = Field(default=64, gt=0)
    fetch_part_size_mb: float | None = Field(default=None, gt=0)
    # A bandwidth cap on all downloads together, in MB/s (10^6 bytes/s); None: no cap. A
    # request's max_mbps caps its own job on top of it.
    fetch_max_mbps: float | None = Field(default=None, gt=0)

    @field_validator("url_allow", "torch_hub_allow", "allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        # An Origin header never ends in '/', so a pasted 'http://app.example/' must not either.
        if isinstance(value, str):
            value = [o for o in value.split(",")]
        if isinstance(value, (list, tuple)):
            return tuple(str(o).strip().rstrip("/").lower() for o in value if str(o).strip())

    @field_validator("import_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(p.strip()) for p in value.split(",") if p.strip())
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _parse_keep_alive(cls, value: object) -> float:
        # Env values are strings: "5m" as well as "300"; any negative value means never.
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"{exc} (MODELHOST_KEEP_ALIVE), not {value!r}") from None

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
    def effective_url_allow(self) -> tuple[str, ...]:
        """The hosts the url source may fetch from: the built-ins (unless dropped) plus
        MODELHOST_URL_ALLOW, in that order, without repeats."""
        base = DEFAULT_URL_ALLOW if self.url_allow_defaults else ()
        return tuple(dict.fromkeys((*base, *self.url_allow)))

    @property
    def effective_allowed_hosts(self) -> tuple[str, ...]:
        """The Host headers the server answers: MODELHOST_ALLOWED_HOSTS, or by default the
        loopback names and the bind address, each bare (any port) and with the bind port."""
        if self.allowed_hosts:
            return self.allowed_hosts
        host = self.host.lower()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 bind address, as a Host header writes it
        names = dict.fromkeys(("localhost", "127.0.0.1", "[::1]", host))
        return tuple(entry for name in names for entry in (name, f"{name}:{self.port}"))

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'state.db'}"

    @property
    def disk_reserve_bytes(self) -> int:
        return int(self.disk_reserve_mb * MB)

    @property
    def fetch_part_threshold_bytes(self) -> int:
        return max(1, int(self.fetch_part_threshold_mb * MB))

    @property
    def fetch_part_size_bytes(self) -> int | None:
        return (
            None if self.fetch_part_size_mb is None else max(1, int(self.fetch_part_size_mb * MB))
        )

    @property
    def fetch_max_bytes_per_s(self) -> float | None:
        return None if self.fetch_max_mbps is None else self.fetch_max_mbps * MB

    @property
    def cache_limit_bytes(self) -> int | None:
        return None if self.cache_limit_gb is None else int(self.cache_limit_gb * GB)
