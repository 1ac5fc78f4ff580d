from dataclasses import dataclass, field

import pytest

from maskattn import config


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float | None = 1.0
    name: str = "adam"


@dataclass
class Outer:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("steps = 20\n[inner]\nlr = 1\nbetas = [0.8, 0.9]\n")
    cfg = config.load(Outer(), path, ["inner.clip=none", "inner.name=sgd", "steps=30"])
    assert cfg == Outer(steps=30, inner=Inner(lr=1.0, betas=(0.8, 0.9), clip=None, name="sgd"))
    assert isinstance(cfg.inner.lr, float)


def test_errors_name_the_setting():
    with pytest.raises(KeyError, match=r"unknown setting 'inner.lrr'"):
        config.load(Outer(), None, ["inner.lrr=1"])
    with pytest.raises(TypeError, match=r"steps: expected int, got 'many'"):
        config.load(Outer(), None, ["steps=many"])
    with pytest.raises(TypeError, match="inner is a section"):
        config.load(Outer(), None, ["inner=3"])
    with pytest.raises(ValueError, match="key=value"):
        config.overrides(["steps"])


def test_describe_lists_every_field():
    assert "inner.lr = 0.001" in config.describe(Outer())
