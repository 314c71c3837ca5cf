"""An in-process, fault-injectable Kafka cluster: librdkafka's mock cluster through ctypes.

Why this module exists: the development broker (Tansu) is a single node that cannot lose a
leader, move a partition or fail one request on purpose, so the worker's reliability under
broker faults cannot be tested against it. librdkafka ships a mock cluster (a multi-broker
Kafka protocol server running on threads inside the process) with a C API for fault
injection. The ``confluent-kafka`` wheel bundles librdkafka, so this module loads that shared
library with ctypes; no compiler and no confluent-kafka Python API is involved.

Usage::

    with MockCluster(brokers=3) as mock:
        mock.create_topic("t.infer.m", partitions=4, replication_factor=3)
        ...  # point aiokafka at mock.bootstraps
        mock.broker_down(2)
        mock.push_request_errors(ApiKey.OFFSET_COMMIT, [ErrorCode.NOT_COORDINATOR])

Limits of the mock cluster (librdkafka 2.16, seen with aiokafka 0.14):

- One consumer per group: a second member never joins (the mock answers its SyncGroup with
  INVALID_REQUEST). Read committed offsets only after the group's consumer has stopped.
- No CreateTopics, no ListGroups: topics are auto-created on produce/metadata with default
  settings, or pre-created through :meth:`MockCluster.create_topic` (the way to choose the
  partition count).
- Every control call (topic, leader, broker, error injection) is a synchronous round trip to
  the mock's own thread and now and then takes 1.0 s (seen about once in 16 calls; it looks
  like a missed wake-up of the mock's I/O loop, not verified in its source). From a
  coroutine whose event loop also runs the code under test, call them through
  ``asyncio.to_thread`` so the loop is not stalled.
- A downed broker refuses connections and is left out of Metadata responses; its partitions
  keep it as leader (clients retry until it is up again, nothing fails over).
- Storage is memory only and the cluster lives as long as this object; it is for tests, never
  for anything that must keep data.

Exceptions::

    MockClusterError    the library or one of its symbols is missing, or a mock call failed
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["ApiKey", "ErrorCode", "MockCluster", "MockClusterError", "find_librdkafka"]

_RD_KAFKA_PRODUCER = 0
_ERRSTR_BYTES = 512


class MockClusterError(RuntimeError):
    """librdkafka could not be loaded, lacks a symbol, or a mock call returned an error."""


class ApiKey(IntEnum):
    """Kafka protocol API keys used with :meth:`MockCluster.push_request_errors`."""

    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    OFFSET_COMMIT = 8
    OFFSET_FETCH = 9
    FIND_COORDINATOR = 10
    JOIN_GROUP = 11
    HEARTBEAT = 12
    LEAVE_GROUP = 13
    SYNC_GROUP = 14


class ErrorCode(IntEnum):
    """Kafka protocol error codes commonly injected in tests."""

    NO_ERROR = 0
    NOT_LEADER_OR_FOLLOWER = 6
    REQUEST_TIMED_OUT = 7
    COORDINATOR_LOAD_IN_PROGRESS = 14
    COORDINATOR_NOT_AVAILABLE = 15
    NOT_COORDINATOR = 16
    NOT_ENOUGH_REPLICAS = 19
    REBALANCE_IN_PROGRESS = 27


def find_librdkafka() -> Path:
    """The librdkafka shared library bundled in the installed confluent-kafka wheel."""
    spec = importlib.util.find_spec("confluent_kafka")
    if spec is None or spec.origin is None:
        raise MockClusterError(
            "confluent-kafka is not installed (it bundles librdkafka): "
            "pip install 'verifiable-inference-node[dev]'"
        )
    site = Path(spec.origin).parent.parent
    candidates = sorted(site.glob("confluent_kafka.libs/librdkafka*.so*"))
    candidates += sorted(site.glob("confluent_kafka/.dylibs/librdkafka*.dylib"))
    if not candidates:
        raise MockClusterError(f"no librdkafka shared library found next to {spec.origin}")
    return candidates[0]


# name -> (restype, argtypes). Declared once so every call is type-checked by ctypes.
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "rd_kafka_conf_new": (ctypes.c_void_p, []),
    "rd_kafka_conf_destroy": (None, [ctypes.c_void_p]),
    "rd_kafka_conf_set": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t],
    ),
    "rd_kafka_new": (
        ctypes.c_void_p,
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t],
    ),
    "rd_kafka_destroy": (None, [ctypes.c_void_p]),
    "rd_kafka_err2str": (ctypes.c_char_p, [ctypes.c_int]),
    "rd_kafka_mock_cluster_new": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
    "rd_kafka_mock_cluster_destroy": (None, [ctypes.c_void_p]),
    "rd_kafka_mock_cluster_bootstraps": (ctypes.c_char_p, [ctypes.c_void_p]),
    "rd_kafka_mock_topic_create": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int],
    ),
    "rd_kafka_mock_broker_set_down": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int32]),
    "rd_kafka_mock_broker_set_up": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int32]),
    "rd_kafka_mock_partition_set_leader": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32],
    ),
    "rd_kafka_mock_push_request_errors_array": (
        None,
        [ctypes.c_void_p, ctypes.c_int16, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)],
    ),
    "rd_kafka_mock_clear_request_errors": (None, [ctypes.c_void_p, ctypes.c_int16]),
    "rd_kafka_mock_set_controller_id": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int32]),
    "rd_kafka_mock_coordinator_set": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32],
    ),
    "rd_kafka_mock_group_initial_rebalance_delay_ms": (None, [ctypes.c_void_p, ctypes.c_int32]),
}


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise MockClusterError(f"cannot load librdkafka from {path}: {e}") from e
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise MockClusterError(f"{path} does not export {name}") from e
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


class MockCluster:
    """A librdkafka mock cluster of ``brokers`` brokers (ids 1..n), alive until :meth:`close`.

    Every method is synchronous and quick (the mock runs on its own threads); call them from
    a test coroutine directly. Errors from the C API raise :class:`MockClusterError`.
    """

    def __init__(self, brokers: int = 3, *, library: Path | None = None) -> None:
        if brokers < 1:
            raise ValueError("a mock cluster needs at least one broker")
        self.library = library or find_librdkafka()
        self._lib = _load(self.library)
        self._rk: int | None = None
        self._mcluster: int | None = None
        conf = self._lib.rd_kafka_conf_new()
        errstr = ctypes.create_string_buffer(_ERRSTR_BYTES)
        # The hosting handle never connects anywhere; without this it logs a CONFWARN about
        # the missing bootstrap.servers on every start. 3 = errors only.
        if self._lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, _ERRSTR_BYTES) != 0:
            self._lib.rd_kafka_conf_destroy(conf)
            raise MockClusterError(f"rd_kafka_conf_set failed: {errstr.value.decode()}")
        rk = self._lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, _ERRSTR_BYTES)
        if not rk:
            self._lib.rd_kafka_conf_destroy(conf)  # rd_kafka_new owns conf only on success
            raise MockClusterError(f"rd_kafka_new failed: {errstr.value.decode(errors='replace')}")
        self._rk = rk
        mcluster = self._lib.rd_kafka_mock_cluster_new(rk, brokers)
        if not mcluster:
            self.close()
            raise MockClusterError(f"rd_kafka_mock_cluster_new({brokers}) failed")
        self._mcluster = mcluster
        raw = self._lib.rd_kafka_mock_cluster_bootstraps(mcluster)
        self.bootstraps: str = raw.decode()
        """``host:port,host:port,...`` of every broker, for ``bootstrap_servers``."""
        self.brokers = brokers

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Destroy the cluster, then the handle that hosts it. Idempotent."""
        if self._mcluster is not None:
            self._lib.rd_kafka_mock_cluster_destroy(self._mcluster)
            self._mcluster = None
        if self._rk is not None:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None

    # -- topics and leadership ---------------------------------------------------------------

    def create_topic(self, name: str, partitions: int, replication_factor: int = 1) -> None:
        """Create ``name`` with ``partitions`` partitions (the mock has no CreateTopics API)."""
        self._check(
            self._lib.rd_kafka_mock_topic_create(
                self._cluster, name.encode(), partitions, replication_factor
            ),
            f"create topic {name}",
        )

    def set_partition_leader(self, topic: str, partition: int, broker_id: int) -> None:
        """Move the leader of one partition; clients learn it via NOT_LEADER + metadata."""
        self._check(
            self._lib.rd_kafka_mock_partition_set_leader(
                self._cluster, topic.encode(), partition, broker_id
            ),
            f"set leader of {topic}[{partition}] to {broker_id}",
        )

    def set_controller(self, broker_id: int) -> None:
        self._check(
            self._lib.rd_kafka_mock_set_controller_id(self._cluster, broker_id),
            f"set controller {broker_id}",
        )

    def set_group_coordinator(self, group_id: str, broker_id: int) -> None:
        """Pin the coordinator of ``group_id`` (by default a hash of the id picks it)."""
        self._check(
            self._lib.rd_kafka_mock_coordinator_set(
                self._cluster, b"group", group_id.encode(), broker_id
            ),
            f"set coordinator of group {group_id} to {broker_id}",
        )

    def set_group_initial_rebalance_delay_ms(self, delay_ms: int) -> None:
        """How long a new group waits for more members before its first assignment (the
        mock's default is 3000 ms; tests with one member per group want it short)."""
        self._lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self._cluster, delay_ms)

    # -- faults ------------------------------------------------------------------------------

    def broker_down(self, broker_id: int) -> None:
        """Disconnect the broker and refuse new connections (its leaderships do not move)."""
        self._check(
            self._lib.rd_kafka_mock_broker_set_down(self._cluster, broker_id),
            f"broker {broker_id} down",
        )

    def broker_up(self, broker_id: int) -> None:
        self._check(
            self._lib.rd_kafka_mock_broker_set_up(self._cluster, broker_id),
            f"broker {broker_id} up",
        )

    def push_request_errors(self, api_key: int, errors: Sequence[int]) -> None:
        """Answer the next ``len(errors)`` requests of ``api_key`` (to any broker) with these
        error codes, in order; 0 lets a request through."""
        array = (ctypes.c_int * len(errors))(*errors)
        self._lib.rd_kafka_mock_push_request_errors_array(
            self._cluster, api_key, len(errors), array
        )

    def clear_request_errors(self, api_key: int) -> None:
        """Drop the errors still queued for ``api_key``."""
        self._lib.rd_kafka_mock_clear_request_errors(self._cluster, api_key)

    # -- helpers -----------------------------------------------------------------------------

    @property
    def _cluster(self) -> int:
        if self._mcluster is None:
            raise MockClusterError("the mock cluster is closed")
        return self._mcluster

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            reason = self._lib.rd_kafka_err2str(err).decode(errors="replace")
            raise MockClusterError(f"{what}: {reason} ({err})")
