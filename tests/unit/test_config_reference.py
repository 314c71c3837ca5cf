"""docs/CONFIGURATION.md: current with the settings models, and its environment variable names
really configure what they claim (checked by setting them and reading the settings back)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from client.settings import ClientSettings
from settlement.settings import SettlementSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "CONFIGURATION.md"
SETTINGS = {"worker": WorkerSettings, "settlement": SettlementSettings, "client": ClientSettings}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "config_generate", ROOT / "docs" / "config" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def test_committed_reference_is_current() -> None:
    assert DOC.read_text() == GEN.render(), (
        "docs/CONFIGURATION.md is stale: run `python docs/config/generate.py`"
    )
    assert GEN.main(["--check"]) == 0


def _numeric_rows() -> list[tuple[str, Any]]:
    rows = []
    for _, _, _, _, sections in GEN.collect():
        for section in sections:
            for row in section.rows:
                if row.env and row.type in ("int", "float") and row.default.startswith("`"):
                    rows.append((f"{section.title}.{row.name}", row))
    return rows


def test_every_documented_field_is_covered() -> None:
    documented = {
        f"{section.title}.{row.name}"
        for _, _, _, _, sections in GEN.collect()
        for section in sections
        for row in section.rows
    }
    for service, cls in SETTINGS.items():
        for name in cls.model_fields:
            assert f"{service}.{name}" in documented


def test_documented_environment_variables_configure_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT / "docs")  # no stray .env file
    checked = 0
    for path, row in _numeric_rows():
        service, *attrs = path.split(".")
        default = float(row.default.strip("`"))
        value: float = default + 1
        with monkeypatch.context() as env:
            env.setenv(row.env, str(int(value) if row.type == "int" else value))
            try:
                settings: Any = SETTINGS[service]()
            except ValidationError:
                continue  # default + 1 breaks a constraint (e.g. at its maximum)
        for attr in attrs:
            settings = getattr(settings, attr)
        assert settings == value, f"{row.env} did not set {path}"
        checked += 1
    assert checked >= 30


class _Inner(BaseModel):
    depth_m: int = 3
    """How deep (a docstring under the field)."""


class _Tdx(BaseModel):
    kind: Literal["tdx"] = "tdx"
    quote_path: Path = Path("/dev/tdx")


class _Dev(BaseModel):
    kind: Literal["dev"] = "dev"


class _Item(BaseModel):
    name: str
    inner: _Inner = Field(default_factory=_Inner)


class _Synthetic(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OG_X_", env_nested_delimiter="__")

    token: SecretStr | None = None
    inner: _Inner = Field(default_factory=_Inner, description="nested | piped")
    attestation: _Tdx | _Dev = Field(default_factory=_Dev, discriminator="kind")
    items: list[_Item] = Field(default_factory=list)
    by_name: dict[str, _Item] = Field(default_factory=dict)
    ratio: float = Field(default=0.5, ge=0, le=1)


def test_nested_models_are_walked_generically() -> None:
    sections: list[Any] = []
    GEN._walk(_Synthetic, "x", "OG_X_", sections, (), "")
    by_title: dict[str, list[Any]] = {}
    for s in sections:
        by_title.setdefault(s.title, []).append(s)
    top = {r.name: r for r in by_title["x"][0].rows}
    assert top["token"].type == "secret \\| none"
    assert top["inner"].env == "OG_X_INNER__*"
    assert top["inner"].description == "nested \\| piped"
    assert top["ratio"].description == "(≥ 0, ≤ 1)"
    inner = by_title["x.inner"][0]
    assert inner.env and inner.rows[0].env == "OG_X_INNER__DEPTH_M"
    assert inner.rows[0].description == "How deep (a docstring under the field)."
    variants = by_title["x.attestation"]
    assert [v.model for v in variants] == ["_Tdx", "_Dev"]
    assert variants[0].rows[1].env == "OG_X_ATTESTATION__QUOTE_PATH"
    items = by_title["x.items[]"][0]
    assert not items.env and "`OG_X_ITEMS` (JSON)" in items.note
    assert by_title["x.items[].inner"][0].rows[0].env is None
    assert "x.by_name[]" in by_title
