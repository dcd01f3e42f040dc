"""Config assembly: layer order, validation errors, hashing."""

from __future__ import annotations

import pytest

from mmbalance.config import assemble, config_hash, load_yaml, parse_overrides
from mmbalance.data import DatasetPlugin
from mmbalance.errors import ConfigError
from mmbalance.method import Method


class DS(DatasetPlugin):
    name = "ds"
    defaults = {"lr": 0.5, "epochs": 7, "backbone": {"a": {"name": "mlp", "hidden": 8}}}
    options = {"noise": 0.0}
    method_defaults = {"meth": {"alpha": 0.3}}


class Meth(Method):
    name = "meth"
    options = {"alpha": 0.9, "mode": __import__("mmbalance.config").config.Option("x", choices=("x", "y"))}
    defaults = {"lr": 0.25, "batch_size": 16}


def test_layer_order_dataset_method_paper_yaml_cli(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("batch_size: 8\nbackbone:\n  a: {hidden: 4}\n")
    cfg = assemble(DS, Meth, load_yaml(yml), parse_overrides(["epochs=3", "backbone.b=cnn"]))
    assert cfg["lr"] == 0.25  # method default beats dataset default
    assert cfg["alpha"] == 0.3  # the dataset's paper value for this method beats the method default
    assert cfg["batch_size"] == 8  # YAML beats method default
    assert cfg["epochs"] == 3  # CLI beats dataset default
    assert cfg["backbone"] == {"a": {"name": "mlp", "hidden": 4}, "b": {"name": "cnn"}}
    assert cfg["method"] == "meth" and cfg["dataset"] == "ds"


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"Unknown config key 'alpah'.*Did you mean 'alpha'"):
        assemble(DS, Meth, None, {"alpah": 1})


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [("epochs", "ten", "expected an int"), ("mode", "z", "allowed values are x, y"),
     ("checkpoint", 3, "true or false"), ("lr", True, "expected a number")],
)
def test_bad_values(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        assemble(DS, Meth, None, {key: value})


def test_values_are_parsed_like_yaml():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=null", "e=[x, y]", "f=hello"]) == {
        "a": 1, "b": 0.5, "c": True, "d": None, "e": ["x", "y"], "f": "hello"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_modalities_accepts_comma_list():
    assert assemble(DS, Meth, None, {"modalities": "a,b"})["modalities"] == ["a", "b"]


def test_hash_ignores_device_and_paths_but_not_seed():
    a = assemble(DS, Meth, None, {"device": "cpu", "records": "x"})
    b = assemble(DS, Meth, None, {"device": "cuda", "records": "y", "data_root": "/d"})
    c = assemble(DS, Meth, None, {"seed": 1})
    assert config_hash(a) == config_hash(b) != config_hash(c)
