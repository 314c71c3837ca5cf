"""Per-model circuit artifacts: made once, cached on disk, shared by every worker process.

Preparing a model (EZKL settings → calibration → compiled circuit → SRS → keys) takes seconds
to minutes and writes a proving key of tens to hundreds of MB, so it happens once per (model
digest, circuit options, SRS) and is cached::

    <root>/srs/<sha256>.srs                     SRS files, addressed by content
    <root>/srs/dev-k<logrows>.json              which dev SRS to reuse for a circuit size
    <root>/locks/<model digest>-<key>.lock      one preparer at a time (fcntl, cross-process)
    <root>/<model digest>/<key>/                manifest.json settings.json circuit.ezkl
                                                vk.key pk.key

A circuit directory is built under a temporary name beside its final one and published with
one ``rename`` after ``manifest.json`` is written, under the lock: a crash or a concurrent
worker never sees a half-built circuit, and a second preparer finds the first one's result.

Everything here is synchronous and slow (EZKL holds the GIL): workers call it in a child
process (``worker.zkml.child``), the CLI and the benchmark call it directly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schemas.fixedpoint import dequantize, felt_to_int
from schemas.proofs import DEV_SRS_PREFIX, MAX_INSTANCES, CircuitManifest, CircuitTensor
from worker.modelstore.locks import held_lock
from worker.zkml.files import atomic_copy, file_sha256
from worker.zkml.settings import CircuitOptions
from worker.zkml.srs import DevSrs, SrsError, SrsSource, ensure_srs

__all__ = [
    "PrepareError",
    "PreparedCircuit",
    "circuit_key",
    "export_verifier",
    "file_sha256",
    "load_ezkl",
    "load_prepared",
    "prepare_circuit",
]

_INSTALL_HINT = "pip install 'verifiable-inference-node[zk]'"
_ONNX_FLOAT = {1: "F32", 11: "F64"}  # onnx.TensorProto.FLOAT, DOUBLE


def load_ezkl() -> Any:
    """The ``ezkl`` module, imported on first use (the ``zk`` extra)."""
    try:
        import ezkl  # type: ignore[import-untyped,unused-ignore]
    except ImportError as e:
        raise ImportError(f"ZKML proofs need ezkl: {_INSTALL_HINT}") from e
    return ezkl


def _ezkl_version() -> str:
    return importlib.metadata.version("ezkl")


class PrepareError(ValueError):
    """The model cannot be made into a circuit with these options (or EZKL failed)."""


@dataclass(frozen=True)
class PreparedCircuit:
    manifest: CircuitManifest
    directory: Path
    srs_path: Path
    lookup_range: tuple[int, int]

    @property
    def settings_path(self) -> Path:
        return self.directory / "settings.json"

    @property
    def compiled_path(self) -> Path:
        return self.directory / "circuit.ezkl"

    @property
    def vk_path(self) -> Path:
        return self.directory / "vk.key"

    @property
    def pk_path(self) -> Path:
        return self.directory / "pk.key"


def circuit_key(options: CircuitOptions, srs: SrsSource) -> str:
    """Directory name of one circuit: the options and the SRS identity (keys depend on both)."""
    srs_id = "dev" if isinstance(srs, DevSrs) else "srs-" + srs.label
    return f"{options.digest}-{hashlib.sha256(srs_id.encode()).hexdigest()[:8]}"


def load_prepared(
    root: Path, model_digest: str, options: CircuitOptions, srs: SrsSource
) -> PreparedCircuit | None:
    """The cached circuit, or None when it is missing or incomplete. Checks the small files'
    digests against the manifest (not the proving key's: hundreds of MB at every start)."""
    directory = root / model_digest / circuit_key(options, srs)
    try:
        manifest = CircuitManifest.model_validate_json((directory / "manifest.json").read_bytes())
        settings = json.loads((directory / "settings.json").read_bytes())
    except (OSError, ValueError):
        return None
    srs_path = root / "srs" / f"{manifest.srs_digest}.srs"
    if (
        manifest.model_digest != model_digest
        or not (directory / "pk.key").is_file()
        or not srs_path.is_file()
        or file_sha256(directory / "vk.key") != manifest.vk_digest
        or file_sha256(directory / "settings.json") != manifest.settings_digest
    ):
        return None
    low, high = settings["run_args"]["lookup_range"]
    return PreparedCircuit(manifest, directory, srs_path, (int(low), int(high)))


def prepare_circuit(
    model_path: Path,
    *,
    model_id: str,
    model_digest: str,
    options: CircuitOptions,
    root: Path,
    srs: SrsSource,
    lock_timeout_s: float = 1800.0,
) -> tuple[PreparedCircuit, bool]:
    """Return the circuit of ``model_path`` and whether it came from the cache (prepared
    by this call otherwise). Safe to call from several processes at once."""
    found = load_prepared(root, model_digest, options, srs)
    if found is not None:
        return found, True
    (root / "locks").mkdir(parents=True, exist_ok=True)
    key = circuit_key(options, srs)
    with held_lock(root / "locks" / f"{model_digest}-{key}.lock", timeout_s=lock_timeout_s):
        found = load_prepared(root, model_digest, options, srs)
        if found is not None:
            return found, True
        parent = root / model_digest
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".staging-{key}-*"):  # left by a crashed preparer
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".staging-{key}-"))
        try:
            _build(model_path, staging, model_id, model_digest, options, root, srs)
            final = parent / key
            # mkdtemp makes it 0700; worker pods and the CLI share the artifacts read-only.
            os.chmod(staging, 0o755)  # noqa: S103
            if final.exists():  # incomplete leftover (load_prepared refused it)
                shutil.rmtree(final)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    prepared = load_prepared(root, model_digest, options, srs)
    if prepared is None:
        raise PrepareError(f"model {model_id}: circuit written but not readable")
    return prepared, False


def _graph_tensors(model_path: Path) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(name, EZKL input type) of each graph input, output names, symbolic dimension names."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs, symbols = [], []
    for value in graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        if elem not in _ONNX_FLOAT:
            raise PrepareError(f"input {value.name}: only float32/float64 inputs can be proved")
        inputs.append((value.name, _ONNX_FLOAT[elem]))
        symbols += [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
    return inputs, [o.name for o in graph.output], sorted(set(symbols))


def _build(
    model_path: Path,
    out: Path,
    model_id: str,
    model_digest: str,
    options: CircuitOptions,
    root: Path,
    srs: SrsSource,
) -> None:
    ezkl = load_ezkl()
    inputs, output_names, symbols = _graph_tensors(model_path)
    run_args = ezkl.PyRunArgs()
    run_args.input_visibility = "public"
    run_args.output_visibility = "public"
    run_args.param_visibility = "fixed"
    run_args.decomp_base = options.decomp_base
    run_args.decomp_legs = options.decomp_legs
    run_args.variables = [(s, 1) for s in symbols]  # one sample per proof
    settings_path, compiled = out / "settings.json", out / "circuit.ezkl"
    try:
        ezkl.gen_settings(str(model_path), str(settings_path), py_run_args=run_args)
        shapes = json.loads(settings_path.read_bytes())["model_instance_shapes"]
        samples = _calibration_samples([shapes[i] for i in range(len(inputs))], options)
        data = out / "calibration.json"
        columns = [np.concatenate([s[i] for s in samples]) for i in range(len(inputs))]
        data.write_text(json.dumps({"input_data": [c.tolist() for c in columns]}))
        ok = ezkl.calibrate_settings(
            str(data),
            str(model_path),
            str(settings_path),
            "resources",
            options.lookup_safety_margin,
            options.scales,
            [1],
            options.max_logrows,
        )
        if not ok or not ezkl.compile_circuit(str(model_path), str(compiled), str(settings_path)):
            raise PrepareError(f"model {model_id}: EZKL could not calibrate or compile it")
    except RuntimeError as e:
        raise PrepareError(f"model {model_id}: EZKL refused the model ({e})") from e
    settings = json.loads(settings_path.read_bytes())
    manifest_inputs, manifest_outputs = _tensors(settings, inputs, output_names)
    if sum(t.size for t in [*manifest_inputs, *manifest_outputs]) > MAX_INSTANCES:
        raise PrepareError(f"model {model_id}: more than {MAX_INSTANCES} public values")
    logrows = int(settings["run_args"]["logrows"])
    try:
        srs_path, srs_label, srs_digest = ensure_srs(root, logrows, srs, ezkl)
    except SrsError as e:
        raise PrepareError(f"model {model_id}: {e}") from e
    if not ezkl.setup(str(compiled), str(out / "vk.key"), str(out / "pk.key"), str(srs_path)):
        raise PrepareError(f"model {model_id}: EZKL setup failed")
    tolerance = _tolerance(model_path, compiled, out, samples, inputs, manifest_outputs, options)
    data.unlink()
    manifest = CircuitManifest(
        model_id=model_id,
        model_digest=model_digest,
        ezkl_version=_ezkl_version(),
        circuit_digest=file_sha256(compiled),
        settings_digest=file_sha256(settings_path),
        vk_digest=file_sha256(out / "vk.key"),
        srs_label=srs_label,
        srs_digest=srs_digest,
        srs_dev=srs_label.startswith(DEV_SRS_PREFIX),
        logrows=logrows,
        inputs=manifest_inputs,
        outputs=manifest_outputs,
        output_tolerance=tolerance,
        visibility={"input": "public", "output": "public", "param": "fixed"},
        created_unix_ms=time.time_ns() // 1_000_000,
    )
    (out / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")


def _calibration_samples(
    shapes: list[list[int]], options: CircuitOptions
) -> list[list[np.ndarray[Any, Any]]]:
    """``calibration_samples`` inputs, uniform in ±bound, each a list of flat tensors."""
    rng = np.random.default_rng(options.seed)
    bound = options.calibration_bound
    return [
        [rng.uniform(-bound, bound, int(np.prod(shape))).astype(np.float32) for shape in shapes]
        for _ in range(options.calibration_samples)
    ]


def _tensors(
    settings: dict[str, Any], inputs: list[tuple[str, str]], output_names: list[str]
) -> tuple[list[CircuitTensor], list[CircuitTensor]]:
    shapes = settings["model_instance_shapes"]
    in_scales, out_scales = settings["model_input_scales"], settings["model_output_scales"]
    if len(shapes) != len(inputs) + len(output_names):
        raise PrepareError("circuit instances do not match the graph's inputs and outputs")
    manifest_inputs = [
        CircuitTensor(name=name, shape=shapes[i], scale=in_scales[i], input_type=kind)  # type: ignore[arg-type]
        for i, (name, kind) in enumerate(inputs)
    ]
    manifest_outputs = [
        CircuitTensor(name=name, shape=shapes[len(inputs) + j], scale=out_scales[j])
        for j, name in enumerate(output_names)
    ]
    return manifest_inputs, manifest_outputs


def _tolerance(
    model_path: Path,
    compiled: Path,
    out: Path,
    samples: list[list[np.ndarray[Any, Any]]],
    inputs: list[tuple[str, str]],
    outputs: list[CircuitTensor],
    options: CircuitOptions,
) -> float:
    """How far the circuit's outputs may sit from ONNX Runtime's (see ``CircuitOptions``)."""
    import onnxruntime  # type: ignore[import-untyped,unused-ignore]

    ezkl = load_ezkl()
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    shapes = {
        i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in session.get_inputs()
    }
    worst = 0.0
    data = out / "sample.json"
    for sample in samples:
        data.write_text(json.dumps({"input_data": [t.tolist() for t in sample]}))
        witness = ezkl.gen_witness(str(data), str(compiled), None, None, None)
        feeds = {
            name: t.astype(np.float64 if kind == "F64" else np.float32).reshape(shapes[name])
            for (name, kind), t in zip(inputs, sample, strict=True)
        }
        expected = session.run([o.name for o in outputs], feeds)
        for tensor, felts, want in zip(outputs, witness["outputs"], expected, strict=True):
            got = np.array([dequantize(felt_to_int(f), tensor.scale) for f in felts])
            worst = max(worst, float(np.max(np.abs(got - np.asarray(want).ravel()))))
    data.unlink()
    quantum = max(2.0**-t.scale for t in outputs)
    return max(options.tolerance_factor * worst, quantum)


def export_verifier(prepared: PreparedCircuit, store: Path) -> Path:
    """Copy what settlement needs to verify this model's proofs into its verifying-key store
    (``store/<model digest>/{manifest.json,settings.json,vk.key}`` and ``store/srs/``).
    Never the proving key. Returns the model's directory in the store."""
    target = store / prepared.manifest.model_digest
    target.mkdir(parents=True, exist_ok=True)
    (store / "srs").mkdir(parents=True, exist_ok=True)
    for name in ("settings.json", "vk.key", "manifest.json"):  # manifest last
        atomic_copy(prepared.directory / name, target / name)
    srs_target = store / "srs" / prepared.srs_path.name
    if not srs_target.exists():
        atomic_copy(prepared.srs_path, srs_target)
    return target
