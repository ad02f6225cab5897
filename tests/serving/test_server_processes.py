"""`stream-rec serve` as real processes: HTTPS with a bearer token, and two processes' metrics.

No broker: a version is published straight into the store, as a worker would.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import glob
import ipaddress
import os
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client import multiprocess

from stream_rec.broker import free_port, stop_process, wait_for_port
from stream_rec.serving.app import serve
from stream_rec.settings import KafkaSettings, ServeSettings, Settings
from stream_rec.snapshot import SnapshotStore
from tests.support import ROOT, env_for, spawn, trained_state, wait_until

KEY = "s3cret-token-0123456789abcdef"


def _self_signed(root: Path, password: bytes) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost signed by its own key (encrypted PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = root / "server.crt", root / "server.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(password)))
    return certfile, keyfile


def _store_with_a_version(root: Path) -> tuple[Path, str]:
    store = root / "store"
    state = trained_state()
    SnapshotStore(store).publish(state, offsets={"clicks": {0: 600}}, watermark=1)
    return store, next(u for u in state.user_ids if u)


def _env(store: Path, **extra: str) -> dict[str, str]:
    return env_for(KafkaSettings(), store, **extra)


def test_https_with_a_bearer_token(tmp_path: Path) -> None:
    store, user = _store_with_a_version(tmp_path)
    certfile, keyfile = _self_signed(tmp_path, b"pem-pass")
    port = free_port()
    env = _env(store, STREAM_REC_SERVE__API_KEY=KEY,
               STREAM_REC_SERVE__SSL_CERTFILE=str(certfile),
               STREAM_REC_SERVE__SSL_KEYFILE=str(keyfile),
               STREAM_REC_SERVE__SSL_KEYFILE_PASSWORD="pem-pass")
    server = spawn(["serve", "--port", str(port)], env, tmp_path / "server.log")
    try:
        wait_for_port("127.0.0.1", port, 60, server)
        trust = ssl.create_default_context(cafile=str(certfile))  # verifies chain and name
        base = f"https://127.0.0.1:{port}"
        with httpx.Client(base_url=base, verify=trust, timeout=5) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, 30, what="a version")
            assert client.get("/healthz").status_code == 200  # probes stay open
            for path in (f"/recommend/{user}", "/similar/i1", "/metrics", "/dashboard/data",
                         "/openapi.json"):
                r = client.get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith(
                    "Bearer"), path
            wrong = client.get(f"/recommend/{user}", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and 'error="invalid_token"' in \
                wrong.headers["www-authenticate"]
            auth = {"Authorization": f"Bearer {KEY}"}
            body = client.get(f"/recommend/{user}", headers=auth).json()
            assert body["version"] == 1 and len(body["items"]) == 10
            assert 'status="401"' in client.get("/metrics", headers=auth).text

            # A browser signs in once; the cookie (Secure over HTTPS) opens only the dashboard.
            login = client.post("/dashboard/login", data={"key": KEY})
            assert login.status_code == 303 and login.headers["location"] == "/dashboard"
            cookie = login.headers["set-cookie"]
            assert all(a in cookie for a in ("HttpOnly", "SameSite=Strict", "Secure",
                                             "Path=/dashboard"))
            assert client.get("/dashboard/data").json()["served"]["version"] == 1
            assert client.get(f"/recommend/{user}").status_code == 401
        # Plain HTTP on the HTTPS port gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        # The image's healthcheck probes it over HTTPS.
        probe = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")],
                               env={**env, "STREAM_REC_HEALTHCHECK_URL":
                                    f"https://127.0.0.1:{port}/healthz"},
                               capture_output=True, text=True, timeout=30, check=False)
        assert probe.returncode == 0, probe.stderr
    finally:
        stop_process(server)


def test_a_certificate_that_cannot_work_fails_before_serving(tmp_path: Path) -> None:
    """`stream-rec serve` turns this ValueError into one line and exit code 2."""
    certfile, keyfile = _self_signed(tmp_path, b"pem-pass")
    store = SnapshotStore(tmp_path / "store")
    for keyfile_, password in ((keyfile, "not-it"), (tmp_path / "missing.key", None)):
        cfg = ServeSettings(ssl_certfile=str(certfile), ssl_keyfile=str(keyfile_),
                            ssl_keyfile_password=password, port=free_port())
        with pytest.raises(ValueError, match="serve.ssl_certfile") as err:
            serve(store, Settings(serve=cfg))
        assert "not-it" not in str(err.value)


def _count(text: str, endpoint: str, status: str) -> float:
    pattern = (r"^stream_rec_requests_total\{endpoint=\"" + re.escape(endpoint)
               + r"\",status=\"" + status + r"\"\} (\S+)$")
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _per_process(metrics_dir: Path, endpoint: str) -> dict[int, float]:
    """Requests each process counted, read from its own file."""
    out = {}
    for path in glob.glob(str(metrics_dir / "counter_*.db")):
        pid = int(re.search(r"counter_(\d+)\.db$", path).group(1))
        for family in multiprocess.MultiProcessCollector.merge([path]):
            for s in family.samples:
                if s.name == "stream_rec_requests_total" and s.labels["endpoint"] == endpoint:
                    out[pid] = out.get(pid, 0.0) + s.value
    return out


@pytest.mark.slow
def test_two_processes_count_every_request_once(tmp_path: Path) -> None:
    """Whichever process answers /metrics, the totals are those of both; a killed one's too."""
    store, user = _store_with_a_version(tmp_path)
    metrics_dir = tmp_path / "metrics"
    port = free_port()
    env = _env(store, STREAM_REC_SERVE__WORKERS="2", STREAM_REC_SERVE__API_KEY=KEY,
               STREAM_REC_SERVE__METRICS_DIR=str(metrics_dir))
    server = spawn(["serve", "--port", str(port)], env, tmp_path / "server.log")
    auth = {"Authorization": f"Bearer {KEY}"}
    endpoint = "/recommend/{user_id}"

    # No keep-alive: a new connection for every request, so any process may answer it.
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=10,
                          limits=httpx.Limits(max_keepalive_connections=0))

    def fresh(path: str) -> httpx.Response:
        return client.get(path)

    def version_everywhere() -> bool:
        """Both processes up (a gauge file each) and, by livemin, both serving version 1."""
        return len(glob.glob(str(metrics_dir / "gauge_livemin_*.db"))) == 2 and \
            "stream_rec_snapshot_version 1.0" in fresh("/metrics").text

    try:
        wait_for_port("127.0.0.1", port, 60, server)
        wait_until(version_everywhere, 90, what="both processes to load the version")
        # Which process accepts a connection is the kernel's choice: send in rounds until
        # both have answered some (each process's own file says how many it counted).
        n = 0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while n < 2000:
                codes = list(pool.map(lambda _: fresh(f"/recommend/{user}?k=5").status_code,
                                      range(40)))
                assert codes == [200] * 40
                n += 40
                if sum(v > 0 for v in _per_process(metrics_dir, endpoint).values()) == 2:
                    break
        for _ in range(3):  # and 3 refused: the key is the real one in both processes
            assert client.get("/similar/i1", headers={"Authorization": ""}).status_code == 401
        per_process = _per_process(metrics_dir, endpoint)
        assert sum(per_process.values()) == n
        assert sum(v > 0 for v in per_process.values()) == 2, per_process  # both answered
        # Every scrape gives the exact totals, until each process has answered scrapes.
        for scrapes in range(1, 301):
            text = fresh("/metrics").text
            assert _count(text, endpoint, "200") == n
            assert _count(text, "other", "401") == 3
            if scrapes >= 5 and len(_per_process(metrics_dir, "/metrics")) == 2:
                break
        assert len(_per_process(metrics_dir, "/metrics")) == 2, "one process answered all"

        # kill -9 one process (uvicorn reaps it and starts another): what it counted stays,
        # its gauges leave at the next scrape, which the other process answers.
        victim = next(p.pid for p in psutil.Process(server.pid).children()
                      if p.pid in per_process)
        assert glob.glob(str(metrics_dir / f"gauge_livemin_{victim}.db"))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(victim), 10, what="the killed process reaped")
        text = fresh("/metrics").text
        assert _count(text, endpoint, "200") == n
        assert not glob.glob(str(metrics_dir / f"gauge_live*_{victim}.db"))
        assert glob.glob(str(metrics_dir / f"counter_{victim}.db"))
    finally:
        client.close()
        stop_process(server)
    assert server.returncode == 0
    assert not glob.glob(str(metrics_dir / "gauge_live*.db")), "exited processes leave gauges"


def test_slow_headers_are_cut_and_connections_are_bounded(tmp_path: Path) -> None:
    """A client trickling header bytes loses its connection at ``serve.header_timeout_s``;
    beyond ``serve.max_connections`` requests get 503 instead of a queue; others keep being
    answered."""
    import socket
    import time

    store, user = _store_with_a_version(tmp_path)
    port = free_port()
    env = _env(store, STREAM_REC_SERVE__HEADER_TIMEOUT_S="1.0",
               STREAM_REC_SERVE__MAX_CONNECTIONS="3", STREAM_REC_SERVE__FOLLOW_TOPIC="false")
    server = spawn(["serve", "--port", str(port)], env, tmp_path / "server.log")
    try:
        wait_for_port("127.0.0.1", port, 60, server)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, 30,
                   what="a version")
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        closed_after = None
        for _ in range(40):  # a header byte every 0.1 s, each of which used to reset a timer
            time.sleep(0.1)
            try:
                slow.sendall(b"X")
            except OSError:
                closed_after = time.monotonic() - t0
                break
        if closed_after is None:
            slow.settimeout(1.0)
            assert slow.recv(100) == b"", "a connection still sending headers after 4 s is open"
            closed_after = time.monotonic() - t0
        assert 0.8 < closed_after < 4.5, closed_after
        slow.close()

        # Three connections held (headers never finished): the fourth request gets 503.
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        for s in held:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.2)
        assert httpx.get(f"{base}/recommend/{user}", timeout=5).status_code == 503
        for s in held:
            s.close()
        wait_until(lambda: httpx.get(f"{base}/recommend/{user}", timeout=5).status_code == 200,
                   10, what="answers once the held connections are gone")
    finally:
        stop_process(server)
