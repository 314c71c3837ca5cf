"""infra/deploy: every manifest parses; Kubernetes objects validate against the Kubernetes
OpenAPI schemas (kubernetes-validate, offline, strict); the custom resources (KEDA, Prometheus
Operator), the compose file and the Dockerfile pass structural checks tied to the code: probes
on the health endpoints, grace periods above the worker's drain bound, disruption budgets,
resources, the KEDA triggers naming each group's consumer group and topics, alert expressions
naming metrics that exist."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from nodecli.main import build_parser
from schemas.topics import Topics, TopicSpec, standard_topics
from settlement.metrics import SettlementMetrics
from settlement.settings import SettlementSettings
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "infra" / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S_VERSION = "1.32"
CUSTOM_KINDS = {"ScaledObject", "PrometheusRule", "Kustomization"}
DRAIN_BOUND_S = WorkerSettings().drain_timeout_s


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _objects() if d["kind"] == kind]


def _configmap() -> dict[str, str]:
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "og-common"]
    data: dict[str, str] = cm["data"]
    return data


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's plain environment: og-common, then its own literal values."""
    env = dict(_configmap()) if container.get("envFrom") else {}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


# Settings the manifests already set for the composition-root wiring of health, metrics and
# tracing (reported with this change); drop names from here once the settings exist.
PENDING_SETTINGS: set[str] = set()


def _env_names(cls: type[BaseModel], prefix: str) -> set[str]:
    """Every environment variable a settings model reads (nested models with ``__``)."""
    names = set()
    for name, info in cls.model_fields.items():
        names.add(prefix + name.upper())
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _env_names(annotation, prefix + name.upper() + "__")
    return names


def _settings_from(
    env: dict[str, str], cls: type[BaseSettings], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Build settings exactly as the container would: from its environment variables."""
    known = _env_names(cls, prefix) | PENDING_SETTINGS
    ours = {k: v for k, v in env.items() if k.startswith(prefix)}
    assert set(ours) <= known, f"unknown settings: {sorted(set(ours) - known)}"
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith(prefix)]:
            m.delenv(key)
        for key, value in ours.items():
            m.setenv(key, value)
        return cls()


def _workers() -> list[dict[str, Any]]:
    return [
        d
        for d in _by_kind("Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]


def _pod_workloads() -> Iterator[dict[str, Any]]:
    for kind in ("Deployment", "StatefulSet", "Job"):
        yield from _by_kind(kind)


# -- parsing and schemas --------------------------------------------------------------------


def test_every_yaml_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 14
    for path in files:
        assert _docs(path), path


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _docs(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # The example Secrets are never applied: real ones are created out of band.
    assert listed == present - {"secrets.example.yaml"}
    images = {i["name"] for i in kustomization["images"]}
    used = {
        c["image"].rsplit(":", 1)[0]
        for w in _pod_workloads()
        for c in w["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("ghcr.io/og-inference/")
    }
    assert used == images


@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in _objects() if d["kind"] not in CUSTOM_KINDS],
    ids=lambda v: v.name if isinstance(v, Path) else v["kind"],
)
def test_kubernetes_objects_validate(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_catches_mistakes() -> None:
    deployment = copy.deepcopy(_workers()[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = (
        "/healthz"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = copy.deepcopy(_workers()[0])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# -- workers --------------------------------------------------------------------------------


def test_worker_groups_probes_grace_resources_security(monkeypatch: pytest.MonkeyPatch) -> None:
    workers = _workers()
    assert {w["metadata"]["name"] for w in workers} == {"og-worker-cpu", "og-worker-gpu"}
    for w in workers:
        pod = w["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = _env(container)
        drain_s = float(env.get("OG_WORKER_DRAIN_TIMEOUT_S", DRAIN_BOUND_S))
        assert drain_s >= DRAIN_BOUND_S
        # Drain + final commit + leaving the group + the "draining" registration.
        assert pod["terminationGracePeriodSeconds"] >= drain_s + 15
        port = int(env["OG_WORKER_METRICS_PORT"])
        assert {"name": "health", "containerPort": port, "protocol": "TCP"} in container["ports"]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]
        _assert_locked_down(pod, container)
        assert w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "og-model-cache"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[env["OG_WORKER_CACHE_DIR"]] == "model-cache"
        assert mounts["/tmp"] == "tmp"
        # The settings the pod starts with validate (secrets aside: they come from Secrets).
        settings = _settings_from(env, WorkerSettings, "OG_WORKER_", monkeypatch)
        assert settings.cache_dir == Path(env["OG_WORKER_CACHE_DIR"])
        assert settings.group_id == env["OG_WORKER_GROUP_ID"]


def test_gpu_group_requests_a_gpu() -> None:
    (gpu,) = [w for w in _workers() if w["metadata"]["name"] == "og-worker-gpu"]
    pod = gpu["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    (cpu,) = [w for w in _workers() if w["metadata"]["name"] == "og-worker-cpu"]
    assert (
        "nvidia.com/gpu"
        not in cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_model_cache_is_shared_read_write_many() -> None:
    (pvc,) = [p for p in _by_kind("PersistentVolumeClaim")]
    assert pvc["metadata"]["name"] == "og-model-cache"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _assert_locked_down(pod: dict[str, Any], container: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_secrets_come_from_secrets_only() -> None:
    example = {d["metadata"]["name"]: d for d in _docs(K8S / "secrets.example.yaml")}
    secret_words = re.compile(r"(?<!PUBLIC)_KEY$|PASSWORD|TOKEN|SECRET|LEDGER_URL")
    for workload in _pod_workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["key"] in example[ref["name"]]["stringData"], ref
                elif secret_words.search(e["name"]):
                    pytest.fail(f"{e['name']} set in clear in {workload['metadata']['name']}")
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in example
    for name in _configmap():
        assert not secret_words.search(name), name


def test_every_worker_has_a_disruption_budget() -> None:
    pdbs = _by_kind("PodDisruptionBudget")
    for w in _workers():
        labels = w["spec"]["template"]["metadata"]["labels"]
        matching = [
            p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, w["metadata"]["name"]
        assert matching[0]["spec"]["maxUnavailable"] == 1


# -- KEDA -----------------------------------------------------------------------------------

KAFKA_SCALER_KEYS = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "version",
    "partitionLimitation",
    "sasl",
    "tls",
}


def _specs_from_args(args: list[str], namespace: str) -> list[TopicSpec]:
    """The topics ``inference-node topics ensure ARGS`` creates: the CLI's own parser and the
    code's own ``standard_topics``, so manifests and code cannot disagree."""
    parsed = build_parser().parse_args(args)
    assert parsed.command == "topics" and parsed.action == "ensure"
    return standard_topics(
        namespace,
        parsed.models,
        request_partitions=parsed.request_partitions,
        reply_partitions=parsed.reply_partitions,
        settlement_partitions=parsed.settlement_partitions,
        replication_factor=parsed.replication_factor,
        dlq_retention_ms=parsed.dlq_retention_ms,
    )


def _topic_specs() -> dict[str, TopicSpec]:
    """The topics the Job creates."""
    (job,) = _by_kind("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": "og-common"}}]
    namespace = _configmap()["OG_WORKER_NAMESPACE"]
    return {s.name: s for s in _specs_from_args(container["args"], namespace)}


def _topic_partitions() -> dict[str, int]:
    return {name: spec.partitions for name, spec in _topic_specs().items()}


def test_keda_scales_each_group_on_its_consumer_group_and_topics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in _by_kind("ScaledObject")}
    partitions = _topic_partitions()
    topics = Topics(_configmap()["OG_WORKER_NAMESPACE"])
    assert set(scaled) == {w["metadata"]["name"] for w in _workers()}
    for w in _workers():
        so = scaled[w["metadata"]["name"]]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        env = _env(w["spec"]["template"]["spec"]["containers"][0])
        models = _settings_from(env, WorkerSettings, "OG_WORKER_", monkeypatch).models
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"kafka"}
        for t in triggers:
            meta = t["metadata"]
            assert set(meta) <= KAFKA_SCALER_KEYS
            assert all(isinstance(v, str) for v in meta.values())  # the CRD's map[string]string
            assert meta["consumerGroup"] == env["OG_WORKER_GROUP_ID"]
            assert meta["bootstrapServers"] == env["OG_WORKER_KAFKA__BOOTSTRAP_SERVERS"]
            assert int(meta["lagThreshold"]) >= int(env["OG_WORKER_MAX_IN_FLIGHT"])
        assert {t["metadata"]["topic"] for t in triggers} == {topics.infer(m) for m in models}
        spec = so["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for m in models:
            assert spec["maxReplicaCount"] <= partitions[topics.infer(m)]
        assert (
            spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
                "stabilizationWindowSeconds"
            ]
            >= 300
        )


def test_topics_job_creates_every_topic_a_group_needs() -> None:
    specs = _topic_specs()
    topics = Topics(_configmap()["OG_WORKER_NAMESPACE"])
    for name in (topics.replies, topics.settlement, topics.dlq, topics.registry):
        assert name in specs
    assert specs[topics.registry].config == {"cleanup.policy": "compact"}
    assert all(s.replication_factor == 3 for s in specs.values())


# -- settlement -----------------------------------------------------------------------------


def test_settlement_single_writer_with_volume_and_probes() -> None:
    (sts,) = _by_kind("StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["podManagementPolicy"] == "OrderedReady"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["settlement", "run"]
    env = {e["name"]: e for e in container["env"]}
    assert env["OG_SETTLEMENT_LEDGER_URL"]["valueFrom"]["secretKeyRef"]["name"] == "og-settlement"
    port = int(_configmap()["OG_SETTLEMENT_METRICS_PORT"])
    assert {"name": "health", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    _assert_locked_down(pod, container)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/lib/og" in mounts
    # No PDB selects it (a one-replica PDB would block node drains).
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for pdb in _by_kind("PodDisruptionBudget"):
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    SettlementSettings(ledger_url="sqlite:////var/lib/og/ledger.sqlite3")


# -- alerts ---------------------------------------------------------------------------------


def _exported_names() -> set[str]:
    names = set()
    for registry in (
        WorkerMetrics(process_metrics=False).registry,
        SettlementMetrics(process_metrics=False).registry,
    ):
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return names


def test_alert_rules_use_metrics_that_exist() -> None:
    (rule,) = _by_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    exported = _exported_names()
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in runbook.splitlines()
        if line.startswith("#")
    }
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) >= 10
    for alert in alerts:
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}
        used = set(re.findall(r"\b(og_[a-z_]+)\b", alert["expr"]))
        assert used, alert["alert"]
        assert used <= exported, (alert["alert"], used - exported)
        assert alert["annotations"]["runbook"].split("#")[1] in anchors, alert["alert"]
        if "for" in alert:
            assert re.fullmatch(r"\d+[smh]", alert["for"])


# -- compose --------------------------------------------------------------------------------

COMPOSE_TOP = {"name", "services", "volumes", "networks", "secrets", "configs", "include"}
COMPOSE_SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "ports", "volumes",
    "depends_on", "healthcheck", "restart", "read_only", "user", "tmpfs", "stop_grace_period",
    "hostname", "deploy", "secrets", "networks", "labels", "pull_policy", "working_dir",
}  # fmt: skip


def test_compose_stack_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    (compose,) = _docs(COMPOSE)
    assert {k for k in compose if not k.startswith("x-")} <= COMPOSE_TOP
    services = compose["services"]
    for name, service in services.items():
        assert set(service) <= COMPOSE_SERVICE_KEYS, (name, set(service) - COMPOSE_SERVICE_KEYS)
        for dep, condition in service.get("depends_on", {}).items():
            assert dep in services
            assert condition["condition"] in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], dep
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], (name, source)
            else:
                assert (COMPOSE.parent / source).exists(), source
        build = service.get("build")
        if build is not None:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).exists()

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka["environment"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert "anvil" in services["anvil"]["entrypoint"]

    workers = {n: s for n, s in services.items() if s.get("command") == ["worker"]}
    assert len(workers) >= 2
    topics_env = services["topics"]["environment"]
    assert topics_env["OG_WORKER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    created = {
        s.name
        for s in _specs_from_args(services["topics"]["command"], topics_env["OG_WORKER_NAMESPACE"])
    }
    for name, worker in workers.items():
        env = worker["environment"]
        grace = int(worker["stop_grace_period"].rstrip("s"))
        assert grace > float(env["OG_WORKER_DRAIN_TIMEOUT_S"]) >= DRAIN_BOUND_S, name
        assert worker["read_only"] is True and worker["user"].split(":")[0] != "0"
        assert "nodecli.check" in worker["healthcheck"]["test"]
        port = env["OG_WORKER_METRICS_PORT"]
        assert f"http://127.0.0.1:{port}/readyz" in worker["healthcheck"]["test"]
        plain = {k: v for k, v in env.items() if "${" not in v}  # keys come from the host
        models = _settings_from(plain, WorkerSettings, "OG_WORKER_", monkeypatch).models
        assert {Topics(env["OG_WORKER_NAMESPACE"]).infer(m) for m in models} <= created
        assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    settlement = services["settlement"]
    assert settlement["environment"]["OG_SETTLEMENT_LEDGER_URL"].startswith("postgresql://")
    plain = {k: v for k, v in settlement["environment"].items() if "${" not in v}
    assert _settings_from(plain, SettlementSettings, "OG_SETTLEMENT_", monkeypatch).anchor
    assert settlement["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {"og.settlement", "og.replies", "og.dlq", "og.registry"} <= created


def test_compose_interpolation_is_escaped_in_scripts() -> None:
    text = COMPOSE.read_text()
    # In compose, `$x` is interpolated from the host; shell variables in scripts need `$$`.
    for line in text.splitlines():
        for match in re.finditer(r"(?<!\$)\$(?!\$)(\{?)([A-Za-z_@0-9]+)", line):
            assert match.group(2).startswith("OG_"), f"unescaped ${match.group(2)}: {line}"


# -- image ----------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_from_the_sources() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert re.search(r'^ENTRYPOINT \["inference-node"\]', dockerfile, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), source
    assert "ADD " not in dockerfile
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)[0].split()}
    assert int(_configmap()["OG_WORKER_METRICS_PORT"]) in exposed
    assert int(_configmap()["OG_SETTLEMENT_METRICS_PORT"]) in exposed
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "infra/node/node_modules/" in ignore
