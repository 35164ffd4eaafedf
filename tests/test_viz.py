"""Motion pictures (``sopo_ext.viz``): GIF / PNG output, input handling, comparison, CLI.

Renders small motions (an FK rest pose walking forward, and a short slice of the real clip
012314 from ``../shared/data/humanml3d-sample``, skipped when absent) to ``tmp_path`` and checks
the files with PIL. Skipped as a whole without matplotlib or pillow.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

np = pytest.importorskip("numpy")
pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from sopo_ext import viz as V  # noqa: E402
from sopo_ext.data import skeleton as S  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "humanml3d-sample"
REPO = Path(__file__).resolve().parents[1]


def rest_walk(t: int = 12) -> torch.Tensor:
    """FK rest pose (identity rotations) whose root moves forward (+z) 5 cm a frame, turning
    the head slightly so every frame differs: joints [t, 22, 3]."""
    quats = torch.zeros(t, S.NUM_JOINTS, 4, dtype=torch.float64)
    quats[..., 0] = 1.0
    root = torch.zeros(t, 3, dtype=torch.float64)
    root[:, 1] = S.BONE_LENGTHS[4] + S.BONE_LENGTHS[7] + 0.05
    root[:, 2] = 0.05 * torch.arange(t, dtype=torch.float64)
    return S.forward_kinematics(quats, root)


def real_clip():
    fv = SAMPLE / "new_joint_vecs" / "012314.npy"
    fj = SAMPLE / "new_joints" / "012314.npy"
    if not (fv.is_file() and fj.is_file()):
        pytest.skip(f"real HumanML3D sample not found under {SAMPLE}")
    return np.load(fj), np.load(fv)


def frames(path) -> int:
    with Image.open(path) as im:
        return getattr(im, "n_frames", 1)


def image_info(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format, im.size


def test_rest_pose_is_upright_and_plot_is_a_rotation():
    j = V.to_joints(rest_walk(3))
    assert j.shape == (3, 22, 3)
    assert j[0, 15, 1] > j[0, 0, 1] > j[0, 10, 1]           # head above pelvis above foot
    p = V._plot_coords(j)
    np.testing.assert_allclose(p[..., 2], j[..., 1])         # plot z is data y (up)
    m = np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]])         # data -> plot
    assert np.linalg.det(m) == pytest.approx(1.0)            # a rotation: no mirror image
    np.testing.assert_allclose(p, j @ m.T)


def test_gif_and_strip_rest_pose(tmp_path):
    m = rest_walk(12)
    g = V.save_gif(m, tmp_path / "rest.gif", caption="a stick figure glides forward " * 4)
    fmt, size = image_info(g)
    assert fmt == "GIF" and frames(g) == 12
    assert size[0] >= 200 and size[1] >= 200 and size[0] % 2 == 0 and size[1] % 2 == 0
    g2 = V.save_gif(m.numpy(), tmp_path / "rest_s.gif", stride=5, fps=20)
    assert frames(g2) == 3                                   # frames 0, 5, 10
    with Image.open(g2) as im:
        assert im.info.get("duration") == 250                # real time: 5 frames at 20 fps
    p = V.save_strip(m, tmp_path / "rest.png", caption="rest", num_frames=4)
    fmt, size = image_info(p)
    assert fmt == "PNG" and frames(p) == 1
    w4 = size[0]
    p2 = V.save_strip(m, tmp_path / "rest2.png", num_frames=2)
    assert image_info(p2)[1][0] < w4                        # panels side by side
    p3 = V.save_strip(m[:1], tmp_path / "one.png", num_frames=6)   # more key frames than T
    assert image_info(p3)[0] == "PNG"


def test_real_clip_gif_strip_and_features_path(tmp_path):
    joints, feats = real_clip()
    j_from_f = V.to_joints(feats)
    n = min(len(j_from_f), len(joints))
    np.testing.assert_allclose(j_from_f[:n], joints[:n], atol=1e-4)
    mean, std = np.load(SAMPLE / "Mean.npy"), np.load(SAMPLE / "Std.npy")
    normed = (feats - mean) / std
    np.testing.assert_allclose(V.to_joints(torch.from_numpy(normed), mean, std), j_from_f,
                               atol=1e-4)
    np.testing.assert_allclose(V.to_joints(normed[None], torch.from_numpy(mean),
                                           torch.from_numpy(std)), j_from_f, atol=1e-4)
    sl = slice(80, 110)
    g = V.save_gif(joints[sl], tmp_path / "real.gif", caption="walks", stride=2)
    assert image_info(g)[0] == "GIF" and frames(g) == 15
    pj = V.save_strip(joints[sl], tmp_path / "j.png", num_frames=3)
    pf = V.save_strip(feats, tmp_path / "f_full.png", num_frames=3, follow=True)
    assert image_info(pf)[0] == "PNG"
    # features and joints give the same picture (same pixels up to anti-aliasing)
    pf = V.save_strip(j_from_f[sl], tmp_path / "f.png", num_frames=3)
    a = np.asarray(Image.open(pj).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(pf).convert("RGB"), dtype=np.float64)
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0


def test_comparison(tmp_path):
    a = rest_walk(10)
    b = rest_walk(6) + torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    g = V.save_comparison([a, b], ["base", "SoPo"], tmp_path / "cmp.gif", caption="compare")
    assert image_info(g)[0] == "GIF" and frames(g) == 10
    single = V.save_gif(a, tmp_path / "single.gif")
    assert image_info(g)[1][0] > image_info(single)[1][0]   # two panels side by side
    p = V.save_comparison([a, b], None, tmp_path / "cmp.png", gif=False, num_frames=3)
    fmt, size = image_info(p)
    assert fmt == "PNG" and size[1] > size[0] / 3 * 1.5      # two rows


@pytest.mark.parametrize("bad, match", [
    (np.zeros((5, 21, 3)), "motion must have shape"),
    (np.zeros((5, 100)), "motion must have shape"),
    (np.zeros((0, 22, 3)), "motion must have at least one frame"),
    (np.zeros((0, 263)), "motion must have at least one frame"),
    (np.full((4, 22, 3), np.nan), "motion contains NaN"),
    (np.array(["a", "b"]), "motion must be a real numeric array"),
    (None, "motion must be an array"),
])
def test_bad_motion(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        V.save_gif(bad, tmp_path / "x.gif")
    with pytest.raises(ValueError, match=match):
        V.save_strip(bad, tmp_path / "x.png")
    assert not (tmp_path / "x.gif").exists() and not (tmp_path / "x.png").exists()


def test_bad_other_arguments(tmp_path):
    m = rest_walk(3)
    f = np.zeros((3, 263))
    with pytest.raises(ValueError, match="mean and std"):
        V.to_joints(f, mean=np.zeros(263))
    with pytest.raises(ValueError, match="mean must have 263"):
        V.to_joints(f, mean=np.zeros(10), std=np.ones(263))
    with pytest.raises(ValueError, match="std contains NaN"):
        V.to_joints(f, mean=np.zeros(263), std=np.full(263, np.nan))
    with pytest.raises(ValueError, match="mean/std apply to features"):
        V.to_joints(m, mean=np.zeros(263), std=np.ones(263))
    with pytest.raises(ValueError, match="stride"):
        V.save_gif(m, tmp_path / "x.gif", stride=0)
    with pytest.raises(ValueError, match="fps"):
        V.save_gif(m, tmp_path / "x.gif", fps=-1)
    with pytest.raises(ValueError, match="caption"):
        V.save_gif(m, tmp_path / "x.gif", caption=3)
    with pytest.raises(ValueError, match="num_frames"):
        V.save_strip(m, tmp_path / "x.png", num_frames=0)
    with pytest.raises(ValueError, match="labels"):
        V.save_comparison([m, m], ["one"], tmp_path / "x.gif")
    with pytest.raises(ValueError, match="motions must contain"):
        V.save_comparison([], [], tmp_path / "x.gif")
    with pytest.raises(ValueError, match=r"motions\[1\] contains NaN"):
        V.save_comparison([m, m * float("nan")], ["a", "b"], tmp_path / "x.gif")


def test_cli(tmp_path, capsys):
    m = rest_walk(8).numpy()
    np.save(tmp_path / "a.npy", m)
    np.save(tmp_path / "b.npy", m[:5] + np.array([0.4, 0.0, 0.0]))
    feats = S.features_from_joints(torch.from_numpy(m)).numpy()       # [7, 263]
    mean, std = feats.mean(0), feats.std(0) + 0.1
    np.save(tmp_path / "f.npy", (feats - mean) / std)
    np.save(tmp_path / "mean.npy", mean)
    np.save(tmp_path / "std.npy", std)
    assert V.main([str(tmp_path / "a.npy"), "--out", str(tmp_path / "a.png"),
                   "--caption", "rest"]) == 0
    assert image_info(tmp_path / "a.png")[0] == "PNG"
    assert V.main([str(tmp_path / "f.npy"), "--out", str(tmp_path / "f.gif"),
                   "--mean", str(tmp_path / "mean.npy"), "--std", str(tmp_path / "std.npy")]) == 0
    assert frames(tmp_path / "f.gif") == 7
    assert V.main([str(tmp_path / "a.npy"), "--out", str(tmp_path / "c.gif"),
                   "--compare", str(tmp_path / "b.npy"), "--labels", "base", "sopo"]) == 0
    assert frames(tmp_path / "c.gif") == 8
    np.save(tmp_path / "bad.npy", np.zeros((4, 5)))
    with pytest.raises(SystemExit) as e:
        V.main([str(tmp_path / "bad.npy"), "--out", str(tmp_path / "bad.png")])
    assert e.value.code == 2 and "motion must have shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        V.main([str(tmp_path / "a.npy"), "--out", str(tmp_path / "a.mp4")])
    # the module entry point, in a fresh interpreter
    env = dict(os.environ, MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-m", "sopo_ext.viz", str(tmp_path / "a.npy"),
                        "--out", str(tmp_path / "m.gif"), "--stride", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert frames(tmp_path / "m.gif") == 4
