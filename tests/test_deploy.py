"""deploy/ checked offline: kustomize builds, schemas, compose, images, metric names, rules.

No cluster and no Docker engine: manifests are built with ``kubectl kustomize``
and validated against the Kubernetes schemas that ``kubernetes-validate``
ships; the compose file goes through ``docker-compose config``; the alert rules
through ``promtool check rules``. Tools missing from a machine skip only the
check that needs them (CI installs them: .ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_rec.metrics import ServingMetrics, WorkerMetrics
from stream_rec.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"  # the kubectl on these machines; schemas of this release
BUILDS = ["deploy/k8s", "deploy/k8s/overlays/production"]
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return path


@cache
def _kustomize(path: str) -> tuple[dict[str, Any], ...]:
    r = _run([_need("kubectl"), "kustomize", path])
    assert r.returncode == 0, r.stderr
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def _find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


# -- Kubernetes -----------------------------------------------------------------------
@pytest.mark.parametrize("path", BUILDS)
def test_kustomize_builds_and_every_manifest_matches_its_schema(path: str) -> None:
    import kubernetes_validate

    docs = _kustomize(path)
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Secret", "StatefulSet", "Deployment", "Service",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # no schema ships for KEDA's CRDs: checked in the KEDA test below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_base_wires_settings_secrets_store_and_probes() -> None:
    docs = _kustomize("deploy/k8s")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    settings_cm = _find(docs, "ConfigMap", "stream-rec-settings")
    pvc = _find(docs, "PersistentVolumeClaim", "stream-rec-store")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # worker and servers share it
    pods = {d["metadata"]["name"]: d for d in docs
            if d["kind"] in ("StatefulSet", "Deployment", "Job")}
    for name, owner in pods.items():
        spec = owner["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():  # every reference resolves, or is declared optional
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names
            if "secret" in v and not v["secret"].get("optional"):
                assert ("Secret", v["secret"]["secretName"]) in names
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
        (container,) = spec["containers"]
        assert container["image"] == "stream-rec:0.1.0"
        for ref in container.get("envFrom", []):
            assert ("Secret", ref["secretRef"]["name"]) in names
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        config = Path(env["STREAM_REC_CONFIG"])
        assert mounts[str(config.parent)] == "settings"
        assert volumes["settings"]["configMap"]["name"] == settings_cm["metadata"]["name"]
        assert config.name in settings_cm["data"]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in ports
        if name == "stream-rec-worker":
            assert owner["spec"]["replicas"] == 1  # one writer per store
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert env["STREAM_REC_WORKER__METRICS_PORT"] == str(ports["metrics"])
        if name == "stream-rec-server":
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for svc in (d for d in docs if d["kind"] == "Service"):
        labels = [p["spec"]["template"]["metadata"]["labels"] for p in pods.values()]
        assert any(svc["spec"]["selector"].items() <= lab.items() for lab in labels)
    hpa = _find(docs, "HorizontalPodAutoscaler", "stream-rec-server")
    assert ("Deployment", hpa["spec"]["scaleTargetRef"]["name"]) in names
    pdb = _find(docs, "PodDisruptionBudget", "stream-rec-server")
    server_labels = pods["stream-rec-server"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= server_labels.items()


def test_production_overlay_moves_the_store_to_s3_and_adds_keda() -> None:
    docs = _kustomize("deploy/k8s/overlays/production")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for kind in ("StatefulSet", "Deployment"):
        spec = _find(docs, kind, "stream-rec-")["spec"]["template"]["spec"]
        assert "store" not in {v["name"] for v in spec["volumes"]}
        assert all(d["metadata"].get("namespace") == "stream-rec"
                   for d in docs if d["kind"] != "Namespace")
    data = _find(docs, "ConfigMap", "stream-rec-settings")["data"]["settings.toml"]
    assert tomllib.loads(data)["store"]["path"].startswith("s3://")


def test_production_worker_is_a_gang_of_one_thread_ranks_within_the_partitions() -> None:
    docs = _kustomize("deploy/k8s/overlays/production")
    worker = _find(docs, "StatefulSet", "stream-rec-worker")
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    procs = int(c["args"][c["args"].index("--procs") + 1])
    partitions = tomllib.loads(_find(docs, "ConfigMap", "stream-rec-settings")["data"]
                               ["settings.toml"])["kafka"]["partitions"]
    assert worker["spec"]["replicas"] == 1 and 1 < procs <= partitions
    env = {e["name"]: e for e in c["env"]}
    assert env["STREAM_REC_WORKER__TORCH_THREADS"] == {
        "name": "STREAM_REC_WORKER__TORCH_THREADS", "value": "1"}
    assert int(c["resources"]["requests"]["cpu"]) >= procs


def test_keda_scaled_object_targets_the_worker_on_its_group_and_topic() -> None:
    docs = _kustomize("deploy/k8s/overlays/production")
    so = _find(docs, "ScaledObject", "stream-rec-worker")
    auth = _find(docs, "TriggerAuthentication", "stream-rec-kafka")
    worker = _find(docs, "StatefulSet", "stream-rec-worker")
    settings = tomllib.loads(_find(docs, "ConfigMap", "stream-rec-settings")["data"]
                             ["settings.toml"])["kafka"]
    target = so["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", worker["metadata"]["name"])
    # one pod: a second would be a standby; the worker scales as a gang inside it
    assert so["spec"]["minReplicaCount"] == so["spec"]["maxReplicaCount"] == 1
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka" and trigger["authenticationRef"]["name"] == \
        auth["metadata"]["name"]
    assert (meta["bootstrapServers"], meta["consumerGroup"], meta["topic"]) == (
        settings["bootstrap"], settings["group_id"], settings["topic"])
    assert all(isinstance(v, str) for v in meta.values())  # KEDA metadata is strings
    assert int(meta["lagThreshold"]) > 0
    keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256",
                 "SCRAM-SHA-512": "scram_sha512", "OAUTHBEARER": "oauthbearer"}
    assert meta["sasl"] == keda_sasl[settings["sasl_mechanism"]]
    for ref in auth["spec"]["secretTargetRef"]:
        assert set(ref) == {"parameter", "name", "key"}


def test_every_settings_file_in_deploy_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(DEPLOY.rglob("*.toml"))
    assert len(files) == 3
    secret = yaml.safe_load((DEPLOY / "k8s" / "base" / "secret.yaml").read_text())
    for path in files:
        for key in [k for k in os.environ if k.startswith("STREAM_REC_")]:
            monkeypatch.delenv(key)
        if "k8s" in path.parts:  # the pods get the Secret's keys as variables
            for key, value in secret["stringData"].items():
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("STREAM_REC_CONFIG", str(path))
        s = Settings()
        assert s.kafka.create_topics is False, path  # clusters create topics on purpose
        assert s.serve.host == "0.0.0.0" and s.worker.metrics_port == 9100
        assert s.worker.metrics_host == "0.0.0.0", path  # probes come from outside the pod
        assert s.log_format == "json"


# -- compose and images ----------------------------------------------------------------
def test_docker_compose_accepts_the_file_with_every_profile() -> None:
    tool = _need("docker-compose")
    r = _run([tool, "-f", "deploy/compose.yaml", "--profile", "s3", "--profile", "tools",
              "config", "--services"])
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {"kafka", "topics", "worker", "server-1", "server-2",
                                     "produce", "prometheus", "grafana", "minio",
                                     "minio-bucket"}
    r = _run([tool, "-f", "deploy/compose.yaml", "config"])
    assert r.returncode == 0, r.stderr
    worker = yaml.safe_load(r.stdout)["services"]["worker"]
    assert worker["command"] == ["worker"]
    assert worker["environment"]["STREAM_REC_WORKER__METRICS_PORT"] == "9100"


def _images() -> set[str]:
    compose = {s["image"] for s in _compose()["services"].values() if "image" in s}
    compose = {re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", i) for i in compose}
    k8s = {c["image"] for path in BUILDS for d in _kustomize(path)
           if d["kind"] in ("StatefulSet", "Deployment", "Job")
           for c in d["spec"]["template"]["spec"]["containers"]}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = set(re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.MULTILINE))
    return compose | k8s | base


def test_every_image_has_an_explicit_documented_tag() -> None:
    images = _images()
    assert {"apache/kafka", "prom/prometheus", "grafana/grafana", "minio/minio",
            "python"} <= {i.rsplit(":", 1)[0] for i in images}
    readme = (DEPLOY / "README.md").read_text()
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and not tag.startswith("$"), image
        if not name.endswith("stream-rec"):
            assert f"`{image}`" in readme, f"{image} is not in deploy/README.md's image table"


def test_dockerfile_is_multistage_cpu_by_default_non_root_with_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n.*CMD ", text, re.MULTILINE)
    assert 'ENTRYPOINT ["stream-rec"]' in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for part in src.split():
            assert (ROOT / part).exists(), part
            assert f"!{part}" in ignore or f"!{part}/**" in ignore, f"{part} excluded"


def test_prometheus_scrapes_the_compose_services() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    services = _compose()["services"]
    jobs = {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]]
            for j in config["scrape_configs"]}
    assert jobs["stream-rec-worker"] == ["worker:9100"]
    assert sorted(jobs["stream-rec-server"]) == ["server-1:8000", "server-2:8000"]
    for targets in jobs.values():
        for target in targets:
            assert target.split(":")[0] in services


# -- metric names, dashboard, alert rules ----------------------------------------------------
def _defined_metrics() -> set[str]:
    names: set[str] = set()
    for cls in (ServingMetrics, WorkerMetrics):
        for metric in cls(CollectorRegistry()).registry.collect():
            names.add(metric.name)
            kind = metric.type
            suffixes = {"counter": ["_total", "_created"],
                        "histogram": ["_bucket", "_sum", "_count", "_created"]}.get(kind, [""])
            names.update(metric.name + s for s in suffixes)
    return names


def _used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bstream_rec_[a-z0-9_]+", text))


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_dashboard_and_alerts_use_only_metrics_the_code_defines() -> None:
    defined = _defined_metrics()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "stream-rec.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = [r["expr"] for r in _alert_rules()]
    for source, texts in (("dashboard", exprs), ("alerts", rules)):
        used = set().union(*(_used_metrics(e) for e in texts))
        assert used, source
        assert used <= defined, f"{source} uses undefined metrics: {sorted(used - defined)}"
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" /
                                 "prometheus.yaml").read_text())["datasources"][0]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"]


def test_alert_rules_cover_the_operational_risks_and_pass_promtool() -> None:
    rules = {r["alert"]: r for r in _alert_rules()}
    expected = {"StreamRecConsumerLagGrowing": "stream_rec_worker_lag_records",
                "StreamRecFreshnessP99High": "stream_rec_snapshot_visible_delay_seconds_bucket",
                "StreamRecSnapshotRefused": "stream_rec_snapshot_refused_total",
                "StreamRecDeadLetterRateHigh": "stream_rec_worker_dead_letters_total",
                "StreamRecWorkerStalled": "stream_rec_worker_last_poll_seconds"}
    for alert, metric in expected.items():
        assert metric in rules[alert]["expr"], alert
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    r = _run([_need("promtool"), "check", "rules", "deploy/prometheus/alerts.yaml"])
    assert r.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in r.stdout, \
        r.stdout + r.stderr
