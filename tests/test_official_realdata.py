"""Real features end to end: a HumanML3D-layout directory around the real clip of
../shared/data/humanml3d-sample (and its mirror) trains the released MDM (a save directory in
the release's format) for a few steps on the CPU. Skips where the sample is absent (it derives
from AMASS, so it is not part of this repository)."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("open_clip")

from official_helpers import (SAMPLE_DIR, make_clip_weights, make_release, sample_humanml3d_dir,  # noqa: E402
                              t2m_release_layout)
from tiny_configs import TINY  # noqa: E402

from sopo_ext import checkpoint as C  # noqa: E402
from sopo_ext import evaluate, pretrain, train  # noqa: E402
from sopo_ext.data.humanml3d import HumanML3D  # noqa: E402

pytestmark = pytest.mark.skipif(not (SAMPLE_DIR / "new_joint_vecs" / "012314.npy").is_file(),
                                reason=f"the real HumanML3D sample is not at {SAMPLE_DIR}")


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_assets):  # tiny_assets: its embedding-cache location for the session
    root = tmp_path_factory.mktemp("real")
    data = sample_humanml3d_dir(root / "HumanML3D")
    reward = root / "reward"
    # a reward model normalized like this data (the bundled one is the built-in data's)
    assert pretrain.main(["reward", "--data", str(data), "--out", str(reward), "--steps", "1",
                          "--batch-size", "4", "--text-encoder", "hash", "--no-progress", "--threads", "1",
                          "--warmup", "0", "--evaluator", "none", "--reward", "none", "--no-final-eval",
                          "--set", *TINY["reward"]]) == 0
    return {"data": data, "reward": reward / "model", "release": make_release(root / "save" / "humanml"),
            "clip": make_clip_weights(root / "open_clip_model.safetensors")}


def test_the_directory_is_real_humanml3d(real):
    train_split = HumanML3D(real["data"], "train")
    assert len(train_split) == 8 and train_split.num_captions == 8
    assert {s.clip_id for s in train_split.samples} == {"012314", "M012314"}


def test_train_the_released_mdm_on_real_features(real, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main(["--backbone", "mdm-official", "--base", str(real["release"]), "--clip-weights",
                     str(real["clip"]), "--data", str(real["data"]), "--reward", str(real["reward"]),
                     "--evaluator", "none", "--out", str(out), "--steps", "3", "--batch-size", "4", "--k", "2",
                     "--sampling-steps", "2", "--warmup", "1", "--no-animation", "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    tuned = C.load_checkpoint(out / "model", "mdm_official")
    mean = torch.from_numpy(__import__("numpy").load(real["data"] / "Mean.npy"))
    assert torch.allclose(tuned.mean, mean)  # the fine-tune records the real normalization
    import csv
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len([r for r in rows if r.get("loss")]) == 3
    assert all(math.isfinite(float(r["loss"])) for r in rows if r.get("loss"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    # and the standard evaluation of the fine-tune, with the T2M evaluator in its release's layout
    t2m = t2m_release_layout(tmp_path / "mdm-repo")
    j = tmp_path / "eval.json"
    rc = evaluate.main(["--ckpt", str(out / "model"), "--clip-weights", str(real["clip"]), "--data",
                        str(real["data"]), "--evaluator", f"t2m-official:{t2m}", "--reward", str(real["reward"]),
                        "--replications", "2", "--mm-captions", "2", "--mm-repeats", "2", "--steps", "2",
                        "--json", str(j), "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(j.read_text())
    assert doc["replications"] == 2 and len(doc["per_replication"]["MM-Dist"]) == 2
    for k in ("MM-Dist", "Diversity", "MultiModality", "detail accuracy", "judged details"):
        if k == "judged details":
            assert k not in doc["summary"]  # a real directory has no ground-truth specs
        else:
            assert math.isfinite(doc["summary"][k]["mean"]), k
