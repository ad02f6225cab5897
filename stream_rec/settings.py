"""The one settings model. Only this module reads the environment.

Precedence, highest first: explicit overrides (command-line flags), environment
variables (prefix ``STREAM_REC_``, nested delimiter ``__``, e.g.
``STREAM_REC_KAFKA__BOOTSTRAP=host:9092``), the TOML file named by
``STREAM_REC_CONFIG`` (default ``configs/default.toml`` when it exists), then
the defaults below, which work on a laptop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from stream_rec.model import ModelConfig

DEFAULT_CONFIG_FILE = Path("configs/default.toml")


class KafkaSettings(BaseModel):
    """Where events come from and how the worker's consumer behaves."""

    bootstrap: str = "127.0.0.1:9092"
    topic: str = "clicks"
    group_id: str = "stream-rec-worker"
    dlq_suffix: str = ".dlq"
    # The local broker completes a group join in about half the session timeout,
    # so a short timeout keeps restarts quick; production clusters may raise it.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000
    bootstrap_timeout_ms: int = 10_000  # how long a client waits for the first broker
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """Connection options shared by every kafka-python client we create."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap.split(","),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None)
        return kw

    @property
    def dlq_topic(self) -> str:
        return self.topic + self.dlq_suffix


class WorkerSettings(BaseModel):
    """Micro-batching and publishing cadence of ``stream-rec worker``."""

    batch_max_events: int = Field(1000, ge=1)
    batch_max_ms: int = Field(100, ge=1)
    # A version is published after a batch once this much time has passed since
    # the previous one; offsets are committed only after it is durable.
    publish_interval_ms: int = Field(100, ge=0)
    # Most versions are deltas; a full one is written after this many deltas or
    # this many seconds, bounding how long a chain a reader must apply.
    full_every_versions: int = Field(200, ge=1)
    full_every_s: float = Field(300.0, gt=0)
    device: str = "auto"
    # CPU threads for torch's kernels; 0 keeps torch's default (one per core).
    # The polling thread needs a core too, so on small machines fewer can be faster.
    torch_threads: int = Field(0, ge=0)
    metrics_port: int = 0  # 0 = no metrics/health endpoint (/metrics, /healthz)
    # /healthz answers 503 once the broker has not answered (records, heartbeat
    # or commit) for this long.
    stall_after_s: float = Field(30.0, gt=0)


class StoreSettings(BaseModel):
    """The snapshot store: a local directory or an fsspec URL."""

    path: str = "data/snapshots"
    keep_versions: int = Field(20, ge=2)


class ServeSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    poll_interval_ms: int = Field(50, ge=10)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(1000, ge=1)
    # "auto": exact "flat" below 150 000 items, "ivf_sq6" (IVF over 6-bit codes) from there;
    # the other kinds and the measurements behind the choice: docs/benchmarks.md, "Index".
    index: Literal["auto", "flat", "sq8", "fp16", "ivf", "ivf_sq6", "ivf_sq8", "ivf_pq_refine",
                   "hnsw_sq8"] = "auto"
    nprobe: int = Field(0, ge=0)  # IVF lists searched per query; 0 = the kind's measured default
    search_threads: int = Field(1, ge=1)  # FAISS threads per search (requests run in parallel)
    max_batch: int = Field(64, ge=1)  # concurrent /recommend searches coalesced into one
    workers: int = Field(1, ge=1)  # server processes on the port, each with its own index


class Settings(BaseSettings):
    """Everything configurable, nested by stage."""

    model_config = SettingsConfigDict(
        env_prefix="STREAM_REC_", env_nested_delimiter="__", extra="ignore")

    kafka: KafkaSettings = KafkaSettings()
    worker: WorkerSettings = WorkerSettings()
    model: ModelConfig = ModelConfig()
    store: StoreSettings = StoreSettings()
    serve: ServeSettings = ServeSettings()
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """Effective values as JSON-able data, secrets shown as ``**********``."""
        return self.model_dump(mode="json")


def config_file() -> Path | None:
    """The TOML file in effect: ``STREAM_REC_CONFIG`` or the default when present."""
    name = os.environ.get("STREAM_REC_CONFIG")
    if name:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"STREAM_REC_CONFIG={name!r} is not a file")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    """Settings from file and environment, with nested ``overrides`` applied on top.

    ``overrides`` use dotted keys (``{"kafka.topic": "x"}``); ``None`` values are
    ignored so that unset command-line flags do not mask the environment.
    """
    settings = Settings()
    data = settings.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return Settings.model_validate(data) if overrides else settings
