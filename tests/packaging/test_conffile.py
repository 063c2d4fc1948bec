"""The packaged /etc/cnisup/config.yaml (packaging/deb/gen_config.py): the
production preset, every key of the configuration contract listed commented
out with the value it has anyway, so uncommenting a key changes nothing."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from cnisup.supervisor import config

GEN_CONFIG = Path(__file__).resolve().parents[2] / "packaging" / "deb" / "gen_config.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cnisup_gen_config", GEN_CONFIG)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _flat(d: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def _effective(text: str, tmp_path: Path, name: str) -> dict[str, Any]:
    path = tmp_path / name
    path.write_text(text)
    return config.load(path, environ={}).to_dict()


def test_as_shipped_it_is_the_production_preset(gen: ModuleType, tmp_path: Path) -> None:
    text = gen.render()
    assert yaml.safe_load(text) == {"preset": "production"}
    assert _effective(text, tmp_path, "shipped.yaml") == config.load(preset="production", environ={}).to_dict()


def test_every_key_is_listed_with_its_production_value(gen: ModuleType, tmp_path: Path) -> None:
    uncommented = gen.uncomment(gen.render())
    raw = yaml.safe_load(uncommented)
    assert _flat(raw) == set(config.field_docs()), "keys of the contract missing from the packaged config"
    assert _effective(uncommented, tmp_path, "all.yaml") == config.load(preset="production", environ={}).to_dict()


def test_plugins_are_looked_for_where_debian_and_upstream_put_them(gen: ModuleType) -> None:
    raw = yaml.safe_load(gen.uncomment(gen.render()))
    assert raw["cni"]["bin_dirs"] == ["/opt/cni/bin", "/usr/lib/cni"]
    assert config.load(preset="production", environ={}).cni.bin_dirs == ["/opt/cni/bin", "/usr/lib/cni"]


def test_every_key_has_its_doc_above_it(gen: ModuleType) -> None:
    sections = {part for key in config.field_docs() for part in key.split(".")[:-1]}
    lines = [gen.uncomment(line).strip() for line in gen.render().splitlines()]
    for i, line in enumerate(lines):
        match = re.match(r"([a-z_]+):", line)
        if match and match[1] not in sections and match[1] != "preset":
            assert lines[i - 1].startswith("# "), f"{line!r} has no comment above it"
