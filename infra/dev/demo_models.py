"""Build the two bundled demo models into a local hub directory.

No model hub is reachable from where this project is developed and tested, so the node ships a
recipe instead of weights: a tiny ONNX classifier (``demo-mlp``) and a tiny random-weight GPT-2
with a byte-level tokenizer (``demo-lm``). Both are built from fixed seeds and packed with
deterministic metadata, so a rebuild with the same library versions gives the same digests.

Layout written under ``root``::

    index.json            HubIndex, pretty-printed with sorted keys
    blobs/demo-mlp-1.onnx
    blobs/demo-lm-1.tar   uncompressed tar of a save_pretrained directory
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.modelstore.local_hub import INDEX_FILE, sha256_file
from worker.modelstore.refs import HubIndex, ModelFormat, ModelRef

__all__ = ["DEMO_LM", "DEMO_MLP", "add_fixed_latency_model", "add_model", "build_demo_hub"]

DEMO_MLP = "demo-mlp"
DEMO_LM = "demo-lm"
_SEED = 7
_ONNX_OPSET = 17
_ONNX_IR_VERSION = 8  # the IR version that introduced opset 17; ONNX Runtime 1.32 loads it
_INSTALL_HINT = "pip install 'verifiable-inference-node[cpu]'"
_EOS = "<|endoftext|>"
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_MLP_EXAMPLE: dict[str, Any] = {
    "kind": "ml",
    "tensors": {"x": {"dtype": "float32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]}},
}
_LM_EXAMPLE: dict[str, Any] = {
    "kind": "chat",
    "messages": [{"role": "user", "content": "Hello, node!"}],
    "params": {"max_tokens": 16, "seed": 7},
}


def build_demo_hub(root: Path, *, force: bool = False) -> HubIndex:
    """Create ``root/blobs/`` and ``root/index.json`` holding ``demo-mlp`` and ``demo-lm``.

    Idempotent: when the index already lists both demo models and every blob matches its
    digest, nothing is written and the existing index is returned (unless ``force``). Other
    models already listed in the index are kept. Building the LM needs the ``cpu`` extra.
    """
    root = Path(root)
    existing = _read_index(root)
    if existing is not None and not force and _demo_models_intact(root, existing):
        return existing
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    refs = [
        _publish(root, "blobs/demo-mlp-1.onnx", _build_mlp_bytes(), _mlp_ref),
        _publish(root, "blobs/demo-lm-1.tar", _build_lm_tar_bytes(), _lm_ref),
    ]
    if existing is not None:
        refs += [r for r in existing.models if r.name not in {DEMO_MLP, DEMO_LM}]
    index = HubIndex(models=sorted(refs, key=lambda r: r.name))
    text = json.dumps(index.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    _atomic_write(root / INDEX_FILE, text.encode())
    return index


def add_model(
    root: Path,
    name: str,
    model_format: ModelFormat,
    data: bytes,
    example_input: dict[str, Any],
    *,
    version: str = "1",
    description: str = "",
) -> ModelRef:
    """Publish one artifact into a local hub (replacing a model of the same name)."""
    root = Path(root)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    uri = f"blobs/{name}-{version}.{_EXTENSIONS[model_format]}"
    path = root / uri
    _atomic_write(path, data)
    ref = ModelRef(
        name=name,
        version=version,
        format=model_format,
        digest=sha256_file(path),
        size_bytes=len(data),
        uri=uri,
        example_input=example_input,
        description=description,
    )
    existing = _read_index(root)
    others = [r for r in existing.models if r.name != name] if existing is not None else []
    index = HubIndex(models=sorted([*others, ref], key=lambda r: r.name))
    text = json.dumps(index.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    _atomic_write(root / INDEX_FILE, text.encode())
    return ref


def add_fixed_latency_model(root: Path, name: str, latency_ms: float) -> ModelRef:
    """A ``fixed-latency`` model (see ``ModelFormat.FIXED_LATENCY``) for benches and tests."""
    data = json.dumps({"latency_ms": latency_ms}).encode()
    return add_model(
        root,
        name,
        ModelFormat.FIXED_LATENCY,
        data,
        _MLP_EXAMPLE,
        description=f"echo after {latency_ms} ms",
    )


_EXTENSIONS = {
    ModelFormat.ONNX: "onnx",
    ModelFormat.HF_CAUSAL_LM: "tar",
    ModelFormat.VLLM: "tar",
    ModelFormat.FIXED_LATENCY: "json",
}


def _read_index(root: Path) -> HubIndex | None:
    try:
        return HubIndex.model_validate_json((root / INDEX_FILE).read_bytes())
    except (OSError, ValueError):
        return None


def _demo_models_intact(root: Path, index: HubIndex) -> bool:
    for name in (DEMO_MLP, DEMO_LM):
        try:
            ref = index.get(name)
        except KeyError:
            return False
        blob = root / ref.uri
        if not blob.is_file() or sha256_file(blob) != ref.digest:
            return False
    return True


def _publish(root: Path, uri: str, data: bytes, make_ref: Any) -> ModelRef:
    path = root / uri
    _atomic_write(path, data)
    ref: ModelRef = make_ref(uri, sha256_file(path), len(data))
    return ref


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; hub files are meant to be shared
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _mlp_ref(uri: str, digest: str, size_bytes: int) -> ModelRef:
    return ModelRef(
        name=DEMO_MLP,
        version="1",
        format=ModelFormat.ONNX,
        digest=digest,
        size_bytes=size_bytes,
        uri=uri,
        example_input=_MLP_EXAMPLE,
        description="Random-weight MLP classifier: x float32[N,4] -> probabilities float32[N,3].",
    )


def _lm_ref(uri: str, digest: str, size_bytes: int) -> ModelRef:
    return ModelRef(
        name=DEMO_LM,
        version="1",
        format=ModelFormat.HF_CAUSAL_LM,
        digest=digest,
        size_bytes=size_bytes,
        uri=uri,
        example_input=_LM_EXAMPLE,
        description="Random-weight 2-layer GPT-2 (width 64) with a byte-level tokenizer.",
    )


def _build_mlp_bytes() -> bytes:
    """Gemm(4->16) + Relu + Gemm(16->3) + Softmax, weights from ``default_rng(7)``."""
    rng = np.random.default_rng(_SEED)
    weights = {
        "w1": (rng.standard_normal((4, 16)) * 0.5).astype(np.float32),
        "b1": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((16, 3)) * 0.5).astype(np.float32),
        "b2": (rng.standard_normal(3) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["h1_relu"], name="relu1"),
        helper.make_node("Gemm", ["h1_relu", "w2", "b2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_mlp",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(arr, name) for name, arr in weights.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _ONNX_OPSET)],
        producer_name="verifiable-inference-node",
        ir_version=_ONNX_IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen)
    are shifted to code points from U+0100 upwards, in byte order.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(0x100 + shifted))
            shifted += 1
    return symbols


def _build_lm_tar_bytes() -> bytes:
    """A random-weight GPT-2 plus tokenizer, saved with ``save_pretrained`` and tarred."""
    try:
        import torch
        import transformers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError as e:
        raise ImportError(f"building demo-lm needs torch and transformers: {_INSTALL_HINT}") from e
    # transformers' annotations are partial (untyped calls); treat it as dynamic here.
    hf: Any = transformers

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    vocab[_EOS] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([_EOS])
    tokenizer = hf.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=_EOS, bos_token=_EOS, pad_token=_EOS
    )
    tokenizer.chat_template = _CHAT_TEMPLATE

    eos_id = vocab[_EOS]
    config = hf.GPT2Config(
        vocab_size=len(vocab),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(_SEED)
    model = hf.GPT2LMHeadModel(config).eval()
    bars_were_enabled = hf.utils.logging.is_progress_bar_enabled()
    hf.utils.logging.disable_progress_bar()  # a one-shot build does not need "Writing shards" bars
    try:
        with tempfile.TemporaryDirectory(prefix="demo-lm-") as tmp:
            out = Path(tmp)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            return _deterministic_tar(out)
    finally:
        if bars_were_enabled:
            hf.utils.logging.enable_progress_bar()


def _deterministic_tar(directory: Path) -> bytes:
    """Tar ``directory``'s files with fixed metadata so equal content gives equal bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(path.relative_to(directory).as_posix())
            data = path.read_bytes()
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
