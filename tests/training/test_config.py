"""The typed config loader: strict keys, types, Literal choices, nested dataclasses, presets and overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from training.config_io import CONFIG_DIR, ConfigError, from_dict, load_config, parse_overrides, to_dict


@dataclass
class Inner:
    depth: int = 2  # blocks
    width: float = 1.0  # multiplier
    kind: Literal["unet", "dit"] = "dit"  # architecture
    tags: list[str] = field(default_factory=list)
    size: tuple[int, int] = (8, 8)

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth: {self.depth} must be >= 1")


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    lr: Optional[float] = None
    flag: bool = False


def test_nested_build_and_defaults():
    cfg = from_dict(Outer, {"inner": {"depth": 4, "tags": ["a"], "size": [16, 32]}, "lr": 1})
    assert cfg.inner.depth == 4 and cfg.inner.tags == ["a"] and cfg.inner.size == (16, 32)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.name == "x" and cfg.inner.kind == "dit"


def test_unknown_key_suggests_close_name():
    with pytest.raises(ConfigError, match=r"inner\.dept: unknown key; did you mean 'depth'"):
        from_dict(Outer, {"inner": {"dept": 3}})


def test_wrong_type_names_key_value_and_expected():
    with pytest.raises(ConfigError, match=r"inner\.depth: got 'four' \(str\); expected int"):
        from_dict(Outer, {"inner": {"depth": "four"}})
    with pytest.raises(ConfigError, match=r"flag: got 1 \(int\); expected bool"):
        from_dict(Outer, {"flag": 1})
    with pytest.raises(ConfigError, match=r"inner\.size: got 3 items"):
        from_dict(Outer, {"inner": {"size": [1, 2, 3]}})


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"inner\.kind: got 'dti'; allowed: 'unet', 'dit' \(did you mean 'dit'\?\)"):
        from_dict(Outer, {"inner": {"kind": "dti"}})


def test_post_init_error_reported_under_dotted_key():
    with pytest.raises(ConfigError, match=r"^inner\.depth: 0 must be >= 1"):
        from_dict(Outer, {"inner": {"depth": 0}})


def test_overrides_parse_yaml_values():
    assert parse_overrides(["inner.depth=3", "inner.tags=[a, b]", "lr=null", "name=run 1"]) == {
        "inner": {"depth": 3, "tags": ["a", "b"]},
        "lr": None,
        "name": "run 1",
    }
    with pytest.raises(ConfigError, match="expected dotted key=value"):
        parse_overrides(["inner.depth"])


def test_files_then_overrides_with_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"name": "base", "inner": {"depth": 5, "width": 2.0}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"_base_": "base.yaml", "inner": {"depth": 6}}))
    cfg = load_config(Outer, [tmp_path / "child.yaml"], ["inner.width=3"])
    assert (cfg.name, cfg.inner.depth, cfg.inner.width) == ("base", 6, 3.0)
    # round trip through to_dict
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_base_loop_and_bad_yaml_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(Outer, [tmp_path / "a.yaml"])
    (tmp_path / "bad.yaml").write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, [tmp_path / "bad.yaml"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="no preset of that name"):
        load_config(Outer, ["definitely-not-a-preset"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads_and_validates(preset):
    """Each YAML in configs/ builds a valid RunConfig as shipped (types, allowed values, cross-field checks): a
    preset a user copies must not stop at its first line (the SVD presets once asked for a bfloat16 cache)."""
    from training.run_config import RunConfig

    cfg = load_config(RunConfig, [preset])
    assert cfg.pipeline, preset
