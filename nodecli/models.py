"""``inference-node models``: the model hub and the shared model cache, for operators.

    models build-demo [--force]        build the bundled demo models into the local hub
    models list [--cache]              the hub's models, each marked cached / in use;
                                       --cache: the cache's entries instead (LRU order)
    models pull NAME...                download and verify into the shared cache
    models evict NAME|DIGEST...        remove cached models that no process has loaded
    models evict --all | --to-bytes N  ...every one, or least recently used until N bytes

Configuration is the worker's (``OG_WORKER_HUB_DIR``, ``OG_WORKER_CACHE_DIR``,
``OG_WORKER_CACHE__*``), so the command sees the same hub and volume as the pods;
``--hub-dir``, ``--hub-url`` and ``--cache-dir`` override it. Output is JSON on stdout.
Exit codes: 0 done; 1 something could not be pulled or evicted (in use, hub down).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_models_parser", "run_models"]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def add_models_parser(sub: Any) -> argparse.ArgumentParser:
    m: argparse.ArgumentParser = sub.add_parser(
        "models", help="model hub and shared cache (OG_WORKER_* settings)"
    )
    m.add_argument("action", choices=["build-demo", "list", "pull", "evict", "zk-prepare"])
    m.add_argument("names", nargs="*", help="pull/evict: model names (evict: or digests)")
    m.add_argument("--hub-dir", type=Path, help="local hub directory (default: worker setting)")
    m.add_argument("--hub-url", help="HTTP(S) hub base URL (default: worker setting)")
    m.add_argument("--cache-dir", type=Path, help="shared cache (default: worker setting)")
    m.add_argument("--force", action="store_true", help="build-demo: rebuild even if intact")
    m.add_argument("--cache", action="store_true", help="list: the cache's entries")
    m.add_argument("--all", action="store_true", help="evict: every entry not in use")
    m.add_argument("--to-bytes", type=int, help="evict: LRU entries until usage <= N bytes")
    m.add_argument("--export", type=Path, help="zk-prepare: settlement's verifying-key store")
    return m


def run_models(args: argparse.Namespace) -> int:
    from worker.modelstore.hub import ModelError
    from worker.modelstore.service import open_cache
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    hub_dir = args.hub_dir or settings.hub_dir
    if args.action == "build-demo":
        from infra.dev.demo_models import build_demo_hub

        _print(_hub_rows(build_demo_hub(hub_dir, force=args.force).models))
        return 0
    cfg = settings.cache
    if args.hub_url:
        cfg = cfg.model_copy(update={"hub_url": args.hub_url})
    cache = open_cache(hub_dir, args.cache_dir or settings.cache_dir, cfg)
    try:
        if args.action == "list":
            return _list(cache, show_cache=args.cache)
        if args.action == "pull":
            return _pull(cache, args.names)
        if args.action == "zk-prepare":
            from worker.zkml import zk_prepare

            cache_dir = args.cache_dir or settings.cache_dir
            _print(zk_prepare(settings.zk, cache, cache_dir, args.names, args.export))
            return 0
        return _evict(cache, args.names, every=args.all, to_bytes=args.to_bytes)
    except (ModelError, OSError, ValueError) as e:
        sys.stderr.write(f"inference-node: models {args.action}: {e}\n")
        return 1


def _list(cache: Any, *, show_cache: bool) -> int:
    entries = {e.digest: e for e in cache.entries()}
    if show_cache:
        _print(
            {
                "budget_bytes": cache.budget_bytes,
                "usage_bytes": sum(e.size_bytes for e in entries.values()),
                "entries": [
                    {
                        "digest": e.digest,
                        "model": e.model,
                        "size_bytes": e.size_bytes,
                        "last_used_unix_s": round(e.last_used_unix_s, 3),
                        "in_use": e.in_use,
                    }
                    for e in entries.values()
                ],
            }
        )
        return 0
    rows = _hub_rows(cache.hub.index().models)
    for row in rows:
        entry = entries.get(row["digest"])
        row["cached"] = entry is not None
        row["in_use"] = entry is not None and entry.in_use
    _print(rows)
    return 0


def _pull(cache: Any, names: list[str]) -> int:
    if not names:
        raise ValueError("pull needs at least one model name")
    index = cache.hub.index()
    rows, ok = [], True
    for name in names:
        try:
            ref = index.get(name)
        except KeyError:
            rows.append({"name": name, "pulled": False, "reason": "not in the hub's index"})
            ok = False
            continue
        pulled = cache.pull(ref)
        rows.append(
            {
                "name": name,
                "digest": ref.digest,
                "pulled": True,
                "hit": pulled.hit,
                "path": str(pulled.path),
            }
        )
    _print(rows)
    return 0 if ok else 1


def _evict(cache: Any, names: list[str], *, every: bool, to_bytes: int | None) -> int:
    if to_bytes is not None:
        evicted = cache.evict_to(to_bytes)
        usage = cache.usage_bytes()
        _print({"evicted": evicted, "usage_bytes": usage})
        return 0 if usage <= to_bytes else 1
    entries = cache.entries()
    if every:
        targets = [e.digest for e in entries]
    elif names:
        by_model = {e.model: e.digest for e in entries}
        targets = [n if _DIGEST.match(n) else by_model.get(n, "") for n in names]
    else:
        raise ValueError("evict needs model names or digests, --all, or --to-bytes N")
    rows, ok = [], True
    for name, digest in zip(names or targets, targets, strict=True):
        if not digest:
            rows.append({"model": name, "evicted": False, "reason": "not cached"})
            continue
        freed = cache.evict(digest)
        if freed is None:
            ok = False
            rows.append({"digest": digest, "evicted": False, "reason": "in use"})
        else:
            rows.append({"digest": digest, "evicted": True, "freed_bytes": freed})
    _print(rows)
    return 0 if ok else 1


def _hub_rows(models: list[Any]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in m.model_dump(mode="json").items() if k != "example_input"} for m in models
    ]


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()
