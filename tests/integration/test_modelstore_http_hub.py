"""The HTTP hub (``worker.modelstore.http_hub``) against a real local HTTP server: Range resume,
dropped connections, hostile answers, and four processes sharing one empty cache that download
each blob exactly once. The server is ``tests.harness.hub_server.HubServer``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.dev.demo_models import add_model
from tests.harness.hub_server import HubServer
from worker.modelstore.cache import ModelCache
from worker.modelstore.files import sha256_file
from worker.modelstore.http_hub import HttpHub
from worker.modelstore.hub import HubUnavailableError, ModelIntegrityError
from worker.modelstore.local_hub import LocalHub
from worker.modelstore.refs import ModelFormat

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(demo_hub: Path) -> Iterator[HubServer]:
    with HubServer(demo_hub) as server:
        yield server


def _hub(server: HubServer, **kwargs: object) -> HttpHub:
    return HttpHub(server.url, backoff_s=0.01, **kwargs)  # type: ignore[arg-type]


def test_index_and_download_once(served: HubServer, demo_hub: Path, tmp_path: Path) -> None:
    hub = _hub(served)
    assert hub.index() == LocalHub(demo_hub).index()
    cache = ModelCache(tmp_path / "cache", hub)
    ref = hub.resolve("demo-lm")
    assert not cache.pull(ref).hit
    assert cache.pull(ref).hit
    assert served.gets(ref.uri) == [None]


def test_dropped_connection_resumes_with_range(
    served: HubServer, demo_hub: Path, tmp_path: Path
) -> None:
    hub = _hub(served)
    ref = hub.resolve("demo-lm")
    half = ref.size_bytes // 2
    served.drop_after[ref.uri] = [half]
    cache = ModelCache(tmp_path / "cache", hub)
    path = cache.pull(ref).path
    assert served.gets(ref.uri) == [None, f"bytes={half}-"]
    assert (path / "tokenizer.json").is_file()
    assert cache.metrics.snapshot().bytes_downloaded == ref.size_bytes  # nothing fetched twice


def test_server_without_ranges_restarts_from_zero(served: HubServer, tmp_path: Path) -> None:
    hub = _hub(served)
    ref = hub.resolve("demo-mlp")
    served.ignore_range = True
    served.drop_after[ref.uri] = [100]
    path = ModelCache(tmp_path / "cache", hub).pull(ref).path
    assert served.gets(ref.uri) == [None, "bytes=100-"]
    assert sha256_file(path) == ref.digest


def test_download_cut_short_is_kept_and_resumed_later(served: HubServer, tmp_path: Path) -> None:
    hub = _hub(served, attempts=2)
    ref = hub.resolve("demo-lm")
    served.drop_after[ref.uri] = [1000, 1000]  # both attempts end early
    cache = ModelCache(tmp_path / "cache", hub)
    with pytest.raises(HubUnavailableError, match="after 2 attempts"):
        cache.pull(ref)
    assert cache.entries() == []  # a truncated download is never published...
    assert (tmp_path / "cache" / "tmp" / f"{ref.digest}.part").stat().st_size == 2000
    path = cache.pull(ref).path  # ...and the next try continues where it stopped
    assert served.gets(ref.uri) == [None, "bytes=1000-", "bytes=2000-"]
    assert (path / "model.safetensors").is_file()


def test_resumed_partial_with_wrong_bytes_is_refetched(served: HubServer, tmp_path: Path) -> None:
    hub = _hub(served)
    ref = hub.resolve("demo-mlp")
    cache = ModelCache(tmp_path / "cache", hub)
    (tmp_path / "cache" / "tmp" / f"{ref.digest}.part").write_bytes(b"\xff" * 200)
    path = cache.pull(ref).path
    assert served.gets(ref.uri) == ["bytes=200-", None]  # resume, digest mismatch, from zero
    assert sha256_file(path) == ref.digest
    assert cache.metrics.snapshot().corrupt == 1


def test_transient_statuses_are_retried(served: HubServer, tmp_path: Path) -> None:
    hub = _hub(served)
    ref = hub.resolve("demo-mlp")
    served.status[ref.uri] = [503, 429]
    ModelCache(tmp_path / "cache", hub).pull(ref)
    assert len(served.gets(ref.uri)) == 3


def test_missing_blob_fails_fast(served: HubServer, tmp_path: Path) -> None:
    hub = _hub(served)
    ref = hub.resolve("demo-mlp").model_copy(update={"uri": "blobs/gone.onnx"})
    with pytest.raises(HubUnavailableError, match="404"):
        ModelCache(tmp_path / "cache", hub).pull(ref)
    assert len(served.gets("blobs/gone.onnx")) == 1


def test_unreachable_hub_gives_up_after_attempts(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    hub = HttpHub(f"http://127.0.0.1:{port}", attempts=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(HubUnavailableError, match="after 2 attempts"):
        hub.index()


def test_blob_longer_or_shorter_than_declared_is_refused(demo_hub: Path, tmp_path: Path) -> None:
    root = tmp_path / "hub"
    data = (demo_hub / "blobs/demo-mlp-1.onnx").read_bytes()
    example = {"kind": "ml", "tensors": {"x": {"dtype": "float32", "shape": [1], "data": [1.0]}}}
    ref = add_model(root, "m", ModelFormat.ONNX, data, example)
    with HubServer(root) as server:
        cache = ModelCache(tmp_path / "cache", HttpHub(server.url, backoff_s=0.01))
        (root / ref.uri).write_bytes(data + b"extra")
        with pytest.raises(ModelIntegrityError, match="more than"):
            cache.pull(ref)
        (root / ref.uri).write_bytes(data[:-5])
        (tmp_path / "cache" / "tmp" / f"{ref.digest}.part").write_bytes(data[:-5])
        with pytest.raises(ModelIntegrityError, match="shorter"):
            cache.pull(ref)
    assert cache.entries() == []


def test_bearer_token_is_sent_and_never_shown(served: HubServer) -> None:
    from pydantic import SecretStr

    hub = _hub(served, token=SecretStr("s3cret-token"))
    hub.index()
    assert "s3cret" not in repr(hub)


_MATERIALIZE = """
import json, sys
from pathlib import Path
from worker.modelstore.cache import ModelCache
from worker.modelstore.http_hub import HttpHub
hub = HttpHub(sys.argv[2], backoff_s=0.05)
cache = ModelCache(Path(sys.argv[1]), hub)
sys.stdin.readline()  # start together
hits = {}
for name in ("demo-lm", "demo-mlp"):
    cached = cache.materialize(hub.resolve(name))
    hits[name] = cached.hit
    cached.release()
print(json.dumps(hits), flush=True)
"""


def test_four_processes_share_one_download_per_blob(
    served: HubServer, demo_hub: Path, tmp_path: Path
) -> None:
    served.delay_s = 0.1  # each blob takes a while, so all four are waiting on it
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MATERIALIZE, str(tmp_path / "cache"), served.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for _ in range(4)
    ]
    outputs = []
    try:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0
            outputs.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    index = LocalHub(demo_hub).index()
    for ref in index.models:
        assert served.gets(ref.uri) == [None], ref.name  # fetched exactly once, in one piece
        assert sorted(o[ref.name] for o in outputs) == [False, True, True, True]
