"""How our Kafka clients authenticate and which extra options they accept.

Settings name TLS files, SASL credentials and a pass-through table of other
kafka-python options; this module turns them into the keyword arguments
kafka-python takes, and refuses, at start-up, what kafka-python would refuse
later or silently ignore (an unknown option, SCRAM without a password).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.net.sasl.oauth import AbstractTokenProvider

# The functions below take a stream_rec.settings.KafkaSettings; settings.py calls them from
# its validators, so this module does not import it back.
KafkaSettings = Any

ClientKind = Literal["producer", "consumer", "admin"]

#: Every option each kafka-python client accepts (its constructor refuses others).
KNOWN_OPTIONS: dict[ClientKind, frozenset[str]] = {
    "producer": frozenset(KafkaProducer.DEFAULT_CONFIG),
    "consumer": frozenset(KafkaConsumer.DEFAULT_CONFIG),
    "admin": frozenset(KafkaAdminClient.DEFAULT_CONFIG),
}

#: Options ``client_options`` may not set: a typed setting owns them, or stream-rec's
#: guarantees depend on their value, or they take Python objects, not settings values.
RESERVED_OPTIONS: dict[str, str] = {
    "bootstrap_servers": "set kafka.bootstrap",
    "client_id": "set kafka.client_id",
    "security_protocol": "set kafka.security_protocol",
    "ssl_cafile": "set kafka.ssl_cafile",
    "ssl_certfile": "set kafka.ssl_certfile",
    "ssl_keyfile": "set kafka.ssl_keyfile",
    "ssl_password": "set kafka.ssl_password",
    "ssl_crlfile": "set kafka.ssl_crlfile",
    "ssl_check_hostname": "set kafka.ssl_check_hostname",
    "sasl_mechanism": "set kafka.sasl_mechanism",
    "sasl_plain_username": "set kafka.sasl_username",
    "sasl_plain_password": "set kafka.sasl_password",
    "sasl_oauth_token_provider": "set kafka.sasl_oauth_token or kafka.sasl_oauth_token_file",
    "request_timeout_ms": "set kafka.request_timeout_ms",
    "bootstrap_timeout_ms": "set kafka.bootstrap_timeout_ms",
    "session_timeout_ms": "set kafka.session_timeout_ms",
    "heartbeat_interval_ms": "set kafka.heartbeat_interval_ms",
    "max_poll_interval_ms": "set kafka.max_poll_interval_ms",
    "group_id": "set kafka.group_id",
    "allow_auto_create_topics": "set kafka.create_topics",
    "enable_auto_commit": "offsets are committed only after the snapshot holding them is durable",
    "auto_commit_interval_ms": "offsets are committed only after the snapshot holding them "
                               "is durable",
    "auto_offset_reset": "the worker positions partitions itself, from its snapshot",
    "transactional_id": "the snapshot store, not a Kafka transaction, is the commit point",
}
_OBJECT_OPTIONS = frozenset({
    "key_serializer", "value_serializer", "key_deserializer", "value_deserializer",
    "partitioner", "partition_assignment_strategy", "default_offset_commit_callback",
    "selector", "kafka_client", "metric_reporters", "socket_options", "ssl_context",
    "sasl_kerberos_name",
})
_ALL_KNOWN = frozenset().union(*KNOWN_OPTIONS.values())


class TokenProvider(AbstractTokenProvider):
    """OAUTHBEARER tokens for kafka-python: a fixed token, or a file re-read when it changes.

    kafka-python asks for a token at every (re)authentication. With a file, the
    token is read again whenever the file's identity, size or modification time
    changes (a rotated Kubernetes projected token is a new file behind a symlink),
    so a rotated token is used from the next connection on, without a restart.
    """

    def __init__(self, token: str | None = None, path: str | None = None) -> None:
        if (token is None) == (path is None):
            raise ValueError("TokenProvider needs exactly one of token and path")
        super().__init__()
        self._token = token
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def token(self) -> str:
        if self.path is None:
            assert self._token is not None
            return self._token
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                if stamp != self._stamp:
                    with open(self.path, encoding="utf-8") as f:
                        text = f.read().strip()
                    if text:  # empty: caught mid-write; read again next time
                        self._token, self._stamp = text, stamp
            except OSError as exc:
                if self._token is None:
                    raise ValueError(f"cannot read OAUTHBEARER token file {self.path}: "
                                     f"{exc.strerror}") from exc
                # Mid-rotation (file briefly missing): the previous token may still be valid.
            if self._token is None:
                raise ValueError(f"OAUTHBEARER token file {self.path} is empty")
            return self._token


def _coerce(key: str, value: Any) -> Any:
    """A value from TOML or the environment (strings there) in the type kafka-python uses."""
    if key == "api_version":
        parts = value.split(".") if isinstance(value, str) else list(value)
        try:
            return tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(f"client_options.api_version: expected e.g. '3.7' or [3, 7], "
                             f"got {value!r}") from None
    default = KafkaConsumer.DEFAULT_CONFIG.get(key, KafkaProducer.DEFAULT_CONFIG.get(key))
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ValueError(f"client_options.{key}: expected {type(default).__name__}, "
                         f"got {value!r}") from None
    return value


def check_client_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with values coerced, or ``ValueError`` naming the first bad key."""
    out: dict[str, Any] = {}
    for key in sorted(options):
        if key not in _ALL_KNOWN:
            raise ValueError(f"client_options.{key}: not a kafka-python client option")
        if key in RESERVED_OPTIONS:
            raise ValueError(f"client_options.{key}: not settable here ({RESERVED_OPTIONS[key]})")
        if key in _OBJECT_OPTIONS:
            raise ValueError(f"client_options.{key}: takes a Python object, not a setting")
        out[key] = _coerce(key, options[key])
    return out


def options_for(kind: ClientKind, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that a ``kind`` client accepts."""
    known = KNOWN_OPTIONS[kind]
    return {k: v for k, v in options.items() if k in known}


def check_security(cfg: KafkaSettings) -> None:
    """Refuse incomplete or contradictory TLS/SASL settings before any client is built."""
    tls = cfg.security_protocol in ("SSL", "SASL_SSL")
    sasl = cfg.security_protocol.startswith("SASL_")
    files = {name: getattr(cfg, name) for name in
             ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile", "ssl_password")}
    if not tls:
        stray = [name for name, value in files.items() if value]
        if stray:
            raise ValueError(f"kafka.{stray[0]} is set but security_protocol is "
                             f"{cfg.security_protocol}: use SSL or SASL_SSL")
    if cfg.ssl_keyfile and not cfg.ssl_certfile:
        raise ValueError("kafka.ssl_keyfile needs kafka.ssl_certfile (the client certificate)")
    if cfg.ssl_password and not cfg.ssl_certfile:
        raise ValueError("kafka.ssl_password unlocks a client key: set kafka.ssl_certfile")
    if sasl and not cfg.sasl_mechanism:
        raise ValueError(f"security_protocol {cfg.security_protocol} needs kafka.sasl_mechanism "
                         "(PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)")
    if cfg.sasl_mechanism and not sasl:
        raise ValueError(f"kafka.sasl_mechanism {cfg.sasl_mechanism} needs security_protocol "
                         "SASL_PLAINTEXT or SASL_SSL")
    if cfg.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
            cfg.sasl_username and cfg.sasl_password):
        # kafka-python builds SCRAM without a password and fails only at the handshake.
        raise ValueError(f"SASL {cfg.sasl_mechanism} needs kafka.sasl_username and "
                         "kafka.sasl_password")
    if cfg.sasl_mechanism == "OAUTHBEARER" and \
            bool(cfg.sasl_oauth_token) == bool(cfg.sasl_oauth_token_file):
        raise ValueError("SASL OAUTHBEARER needs exactly one of kafka.sasl_oauth_token and "
                         "kafka.sasl_oauth_token_file")


def connection_kwargs(cfg: KafkaSettings) -> dict[str, Any]:
    """Address, timeouts, TLS and SASL options, as every kafka-python client takes them."""
    kw: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap.split(","),
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
        "bootstrap_timeout_ms": cfg.bootstrap_timeout_ms,
    }
    if cfg.client_id:
        kw["client_id"] = cfg.client_id
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        kw["ssl_check_hostname"] = cfg.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile"):
            if getattr(cfg, name):
                kw[name] = getattr(cfg, name)
        if cfg.ssl_password:
            kw["ssl_password"] = cfg.ssl_password.get_secret_value()
    if cfg.sasl_mechanism:
        kw["sasl_mechanism"] = cfg.sasl_mechanism
        if cfg.sasl_mechanism == "OAUTHBEARER":
            kw["sasl_oauth_token_provider"] = TokenProvider(
                token=cfg.sasl_oauth_token.get_secret_value() if cfg.sasl_oauth_token else None,
                path=cfg.sasl_oauth_token_file)
        else:
            kw["sasl_plain_username"] = cfg.sasl_username
            kw["sasl_plain_password"] = (
                cfg.sasl_password.get_secret_value() if cfg.sasl_password else None)
    return kw
