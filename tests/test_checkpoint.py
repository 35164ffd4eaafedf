"""sopo_ext.checkpoint: round trips, atomic replacement, and the errors a user sees when a
checkpoint does not fit."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sopo_ext import checkpoint as C
from sopo_ext.models import build_model, model_classes
from sopo_ext.models.mdm import MDMConfig

TINY = dict(d_model=32, num_layers=1, num_heads=2, ff_size=64, text_dim=16)


def tiny_mdm(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("mdm", **{**TINY, **kw})


def test_round_trip_weights_config_meta_and_normalization(tmp_path):
    m = tiny_mdm()
    mean, std = torch.randn(263), torch.rand(263) + 0.5
    C.save_checkpoint(tmp_path / "ck", m, meta={"seed": 3, "note": "x"}, mean=mean, std=std)
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    c = C.load_checkpoint(tmp_path / "ck", "mdm")
    assert c.kind == "mdm" and c.meta == {"seed": 3, "note": "x"}
    assert c.config == m.config and not c.model.training
    for (k, a), (k2, b) in zip(m.state_dict().items(), c.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(c.mean, mean) and torch.equal(c.std, std)
    # the loaded model computes the same function
    m.eval()
    x, t, e = torch.randn(2, 9, 263), torch.tensor([3, 7]), torch.randn(2, 16)
    torch.testing.assert_close(c.model(x, t, e), m(x, t, e), rtol=0, atol=0)
    # the file path itself is accepted too
    assert C.load_checkpoint(tmp_path / "ck" / "model.safetensors").kind == "mdm"


def test_save_replaces_atomically_and_keeps_train_state(tmp_path):
    d = tmp_path / "ck"
    C.save_checkpoint(d, tiny_mdm(0), meta={"v": 1})
    C.save_checkpoint(d, tiny_mdm(1), meta={"v": 2}, train_state={"step": 5, "x": torch.ones(2)})
    c = C.load_checkpoint(d)
    assert c.meta == {"v": 2} and c.train_state()["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary leftovers
    ref = tiny_mdm(1).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in c.model.state_dict().items())


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    C.save_checkpoint(d, tiny_mdm(0), meta={"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(d, tiny_mdm(1), meta={"v": 2}, train_state={"step": 1})
    assert C.load_checkpoint(d).meta == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        C.load_checkpoint(tmp_path / "nope")
    C.save_checkpoint(tmp_path / "ck", tiny_mdm())
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        C.load_checkpoint(tmp_path / "ck")


def test_wrong_kind_is_reported(tmp_path):
    C.save_checkpoint(tmp_path / "ck", tiny_mdm())
    with pytest.raises(C.CheckpointError, match="holds a 'mdm' model, expected 'tmr'"):
        C.load_checkpoint(tmp_path / "ck", "tmr")


def test_shape_mismatch_between_config_and_weights(tmp_path):
    C.save_checkpoint(tmp_path / "ck", tiny_mdm())
    cfg = tmp_path / "ck" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["config"]["d_model"] = 64
    doc["config"]["num_heads"] = 2
    cfg.write_text(json.dumps(doc))
    with pytest.raises(C.CheckpointError, match="wrong shape"):
        C.load_checkpoint(tmp_path / "ck")
    doc["config"]["d_model"] = 32
    doc["config"]["num_layers"] = 2
    cfg.write_text(json.dumps(doc))
    with pytest.raises(C.CheckpointError, match="missing"):
        C.load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["config"].update(bogus=1), r"unknown field\(s\) \['bogus'\]"),
    (lambda d: d["config"].update(num_heads=3), "invalid MDMConfig"),
    (lambda d: d.update(format="other"), "not a sopo_ext checkpoint"),
    (lambda d: d.update(version=99), "format version 99"),
    (lambda d: d.update(kind="nonsense"), "unknown model kind 'nonsense'"),
    (lambda d: d.pop("config"), "has no 'config' entry"),
])
def test_config_problems_are_reported(tmp_path, edit, match):
    C.save_checkpoint(tmp_path / "ck", tiny_mdm())
    cfg = tmp_path / "ck" / "config.json"
    doc = json.loads(cfg.read_text())
    edit(doc)
    cfg.write_text(json.dumps(doc))
    with pytest.raises(C.CheckpointError, match=match):
        C.load_checkpoint(tmp_path / "ck")


def test_corrupt_files(tmp_path):
    C.save_checkpoint(tmp_path / "ck", tiny_mdm())
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(C.CheckpointError, match="not valid JSON"):
        C.load_checkpoint(tmp_path / "ck")
    C.save_checkpoint(tmp_path / "ck", tiny_mdm())
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(C.CheckpointError, match="not a readable safetensors"):
        C.load_checkpoint(tmp_path / "ck")


def test_normalization_check(tmp_path):
    mean, std = torch.zeros(263), torch.ones(263)
    C.save_checkpoint(tmp_path / "ck", tiny_mdm(), mean=mean, std=std)
    c = C.load_checkpoint(tmp_path / "ck")
    C.check_normalization(c, mean.numpy(), std.numpy())  # same: fine
    with pytest.raises(C.CheckpointError, match="another feature normalization"):
        C.check_normalization(c, mean + 0.1, std, what="my data")
    with pytest.raises(C.CheckpointError, match="263-d features"):
        C.check_normalization(c, torch.zeros(10), torch.ones(10))


def test_config_from_dict_nested_and_tuples():
    cfg_cls, _ = model_classes("mld")
    base = C.config_to_dict(cfg_cls())
    back = C.config_from_dict(cfg_cls, base)
    assert back == cfg_cls()
    with pytest.raises(C.CheckpointError, match="unknown field"):
        C.config_from_dict(MDMConfig, {"d_model": 32, "x": 1})


def test_unknown_bundled_name():
    with pytest.raises(ValueError, match="unknown bundled checkpoint"):
        C.bundled_checkpoint_dir("gpt")


def test_atomic_write_text(tmp_path):
    p = tmp_path / "a" / "f.txt"
    C.atomic_write_text(p, "one")
    C.atomic_write_text(p, "two")
    assert p.read_text() == "two" and sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]


def test_checkpoint_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        C.save_checkpoint(tmp_path / "ck", tiny_mdm(), train_state={"step": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "ck").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


def test_a_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    d = tmp_path / "last"
    C.save_checkpoint(d, tiny_mdm(0), meta={"v": 1})
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old one is moved away; the process "dies" before the new one
            raise KeyboardInterrupt
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(d, tiny_mdm(1), meta={"v": 2})
    monkeypatch.setattr(os, "rename", real_rename)
    assert not d.exists()
    assert C.load_checkpoint(d).meta == {"v": 1}  # the previous checkpoint is back
    assert C.recover(d) is False
