"""Integration tests for infra.dev.broker and infra.kafka.admin against a real Tansu process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]

from infra.dev.broker import (
    BrokerAlreadyRunning,
    BrokerError,
    BrokerProcess,
    free_port,
    kafka_api_versions_ok,
    running_broker,
    start_broker,
    stop_broker,
    wait_ready,
)
from infra.kafka.admin import ProvisioningError, delete_topics, ensure_topics
from schemas.topics import TopicSpec, standard_topics

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with running_broker(log_dir=tmp_path_factory.mktemp("tansu")) as running:
        yield running


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


class _FakeServer:
    """A TCP listener that is not Kafka: replies with ``reply(request)``, or stays silent."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    data = conn.recv(4096)
                    if self.mode == "echo":
                        conn.sendall(data)
                    elif self.mode == "garbage":
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    elif self.mode == "silent":
                        conn.recv(1)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["echo", "garbage", "close", "silent"])
def fake_server(request: pytest.FixtureRequest) -> Iterator[_FakeServer]:
    server = _FakeServer(request.param)
    yield server
    server.close()


def test_probe_true_for_running_broker(broker: BrokerProcess) -> None:
    assert kafka_api_versions_ok(broker.host, broker.port)


def test_probe_false_for_closed_port() -> None:
    assert not kafka_api_versions_ok("127.0.0.1", free_port(), timeout_s=0.5)


def test_probe_false_for_non_kafka_listener(fake_server: _FakeServer) -> None:
    assert not kafka_api_versions_ok("127.0.0.1", fake_server.port, timeout_s=0.3)


async def test_wait_ready(broker: BrokerProcess) -> None:
    await wait_ready(broker.host, broker.port, timeout_s=2.0)
    with pytest.raises(BrokerError):
        await wait_ready("127.0.0.1", free_port(), timeout_s=0.3)


def test_start_refuses_busy_port(broker: BrokerProcess, tmp_path: Path) -> None:
    with pytest.raises(BrokerAlreadyRunning):
        start_broker(broker.host, broker.port, log_path=tmp_path / "b.log")
    server = _FakeServer("close")
    try:
        with pytest.raises(BrokerError, match="not a Kafka broker"):
            start_broker("127.0.0.1", server.port, log_path=tmp_path / "c.log")
    finally:
        server.close()


async def test_ensure_topics_creates_standard_topics_once(
    broker: BrokerProcess, namespace: str
) -> None:
    specs = standard_topics(namespace, ["tiny-mlp", "gpt2-tiny"], request_partitions=3)
    expected = {
        f"{namespace}.infer.tiny-mlp": 3,
        f"{namespace}.infer.gpt2-tiny": 3,
        f"{namespace}.replies": 4,
        f"{namespace}.settlement": 4,
        f"{namespace}.dlq": 1,
        f"{namespace}.registry": 1,
        f"{namespace}.batches": 1,
    }
    assert {s.name: s.partitions for s in specs} == expected

    created = await ensure_topics(broker.bootstrap, specs, timeout_s=5.0)
    assert sorted(created) == sorted(expected)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        # topics() refreshes metadata for all topics (and, as a side effect, lets the consumer's
        # start-up task run: aiokafka 0.14.0 raises CancelledError if a group-less consumer is
        # stopped before the loop ever yielded).
        assert set(expected) <= await consumer.topics()
        for name, partitions in expected.items():
            assert len(consumer.partitions_for_topic(name) or ()) == partitions
    finally:
        await consumer.stop()

    assert await ensure_topics(broker.bootstrap, specs, timeout_s=5.0) == []
    await delete_topics(broker.bootstrap, [*expected, f"{namespace}.never-created"])


async def test_ensure_topics_rejects_bad_specs_and_mismatches(
    broker: BrokerProcess, namespace: str
) -> None:
    with pytest.raises(ProvisioningError, match="illegal topic name"):
        await ensure_topics(broker.bootstrap, [TopicSpec("bad name", 1)])
    with pytest.raises(ProvisioningError, match=">= 1"):
        await ensure_topics(broker.bootstrap, [TopicSpec(f"{namespace}.zero", 0)])
    name = f"{namespace}.small"
    assert await ensure_topics(broker.bootstrap, [TopicSpec(name, 1)]) == [name]
    with pytest.raises(ProvisioningError, match="partitions"):
        await ensure_topics(broker.bootstrap, [TopicSpec(name, 2)])
    with pytest.raises(ProvisioningError, match=r"cleanup\.policy"):
        await ensure_topics(
            broker.bootstrap, [TopicSpec(name, 1, config={"cleanup.policy": "compact"})]
        )


async def test_ensure_topics_unreachable_broker() -> None:
    with pytest.raises(ProvisioningError):
        await ensure_topics(f"127.0.0.1:{free_port()}", [TopicSpec("x", 1)], timeout_s=2.0)


async def test_produce_and_consume(broker: BrokerProcess, namespace: str) -> None:
    topic = f"{namespace}.infer.echo"
    await ensure_topics(broker.bootstrap, [TopicSpec(topic, 2)])
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=False
    )
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b'{"hello": 1}', key=b"req-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        group_id=f"{namespace}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(10):
            record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.topic, record.partition, record.offset) == (topic, meta.partition, meta.offset)
    assert (record.key, record.value) == (b"req-1", b'{"hello": 1}')


def test_stop_broker_stops_detached_broker(tmp_path: Path) -> None:
    port = free_port()
    pid_path = tmp_path / "run" / "tansu.pid"
    proc = start_broker(port=port, log_path=tmp_path / "tansu.log", pid_path=pid_path, detach=True)
    try:
        assert pid_path.read_text().strip() == str(proc.pid)
        assert kafka_api_versions_ok("127.0.0.1", port)
        assert stop_broker(pid_path) is True
        assert proc.wait(timeout=5) is not None
        assert not pid_path.exists()
        assert not kafka_api_versions_ok("127.0.0.1", port, timeout_s=0.5)
        assert stop_broker(pid_path) is False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_broker_stale_pid_file(tmp_path: Path) -> None:
    pid_path = tmp_path / "tansu.pid"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid_path.write_text(f"{gone.pid}\n")
    assert stop_broker(pid_path) is False
    assert not pid_path.exists()

    pid_path.write_text("not a pid\n")
    assert stop_broker(pid_path) is False
    assert not pid_path.exists()

    # A live pid that is not Tansu (pid reuse) must not be signalled.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pid_path.write_text(f"{bystander.pid}\n")
        assert stop_broker(pid_path) is False
        assert bystander.poll() is None
        assert not pid_path.exists()
    finally:
        bystander.kill()
        bystander.wait()
