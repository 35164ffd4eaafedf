"""Tests of sopo_ext.data.skeleton: the T2M skeleton, kinematics and the HumanML3D 263-d layout.

The conformance tests use the real clip 012314 in ``../shared/data/humanml3d-sample/`` (beside
the repository) and skip when it is absent. Tolerances (measured values in brackets):

* features -> joints on the real clip: 1e-5 m (float32: bit-exact, 0.0; float64: 2.1e-7, the
  float32 rounding of the stored joints).
* joints -> features -> joints: real clip (float64) 1e-6 m [2.9e-7]; FK-generated motion
  float64 1e-9 m, float32 1e-4 m.
* features from the real joints vs the real features, rows 0..89 (whose heading smoothing window,
  radius 80 frames, does not reach the clip's last source frame, which ``new_joints`` lacks):
  root / RIC / velocity blocks 1e-5 [<= 3.5e-7], 6D rotations 1e-4 [7.8e-6: the original ran its
  IK in float32], foot contacts and root height exact. Later rows differ because the original
  smoothed the heading over 171 frames and we see 170: up to [3e-4] root rotation velocity,
  [6.8e-3] RIC, [1.3e-2] 6D, [4.1e-4] velocities; asserted with loose bounds.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sopo_ext.data import skeleton as S

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "humanml3d-sample"
F64, F32 = torch.float64, torch.float32


def _load_sample():
    np = pytest.importorskip("numpy")
    fv = SAMPLE / "new_joint_vecs" / "012314.npy"
    fj = SAMPLE / "new_joints" / "012314.npy"
    if not (fv.is_file() and fj.is_file()):
        pytest.skip(f"real HumanML3D sample not found under {SAMPLE}")
    return torch.from_numpy(np.load(fv)), torch.from_numpy(np.load(fj))


@pytest.fixture(scope="module")
def sample():
    return _load_sample()


def _axis_angle_to_quat(aa):
    angle = aa.norm(dim=-1, keepdim=True)
    axis = aa / angle.clamp_min(1e-12)
    return torch.cat([torch.cos(angle / 2), axis * torch.sin(angle / 2)], dim=-1)


def _fk_motion(T=48, dtype=F64, seed=0, batch=()):
    """A smooth random motion made by FK on the standard skeleton: joint swings up to ~0.4 rad,
    heading turning within +-60 degrees, a wandering root trajectory."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=F64) / S.FPS
    shape = batch + (S.NUM_JOINTS, 3)
    amp = 0.4 * (torch.rand(shape, generator=g, dtype=F64) - 0.5)
    freq = 0.5 + 2.0 * torch.rand(shape, generator=g, dtype=F64)
    phase = 2 * math.pi * torch.rand(shape, generator=g, dtype=F64)
    aa = amp[..., None, :, :] * torch.sin(freq[..., None, :, :] * 2 * math.pi * t[:, None, None]
                                          + phase[..., None, :, :])      # [..., T, 22, 3]
    heading = (math.pi / 3) * torch.sin(0.7 * t + 0.3)
    aa[..., 0, :] = 0.0
    aa[..., 0, 1] = heading
    quats = _axis_angle_to_quat(aa)
    root = torch.stack([0.8 * t + 0.1 * torch.sin(3 * t), 0.9 + 0.03 * torch.sin(5 * t),
                        0.4 * torch.sin(t)], dim=-1)
    root = root.expand(batch + (T, 3))
    return S.forward_kinematics(quats, root).to(dtype)


# ------------------------------------------------------------------------------------------
# constants and layout
# ------------------------------------------------------------------------------------------
def test_layout_blocks_in_order_and_sum_to_263():
    names = [n for n, _ in S.FEATURE_BLOCKS]
    assert names == ["root_rot_vel", "root_lin_vel", "root_y", "ric", "rot6d", "local_vel",
                     "foot_contact"]
    sizes = [sl.stop - sl.start for _, sl in S.FEATURE_BLOCKS]
    assert sizes == [1, 2, 1, 63, 126, 66, 4]
    assert sum(sizes) == S.FEATURE_DIM == 263
    stop = 0
    for _, sl in S.FEATURE_BLOCKS:
        assert sl.start == stop and sl.step is None
        stop = sl.stop
    assert stop == 263
    assert (S.RIC, S.ROT6D, S.LOCAL_VEL, S.FOOT_CONTACT) == (
        slice(4, 67), slice(67, 193), slice(193, 259), slice(259, 263))


def test_parents_consistent_with_chains():
    assert len(S.PARENTS) == S.NUM_JOINTS and S.PARENTS[0] == -1
    seen = {0}
    for chain in S.KINEMATIC_CHAIN:
        assert chain[0] in seen           # every chain starts at an already placed joint
        for a, b in zip(chain[:-1], chain[1:]):
            assert S.PARENTS[b] == a
            seen.add(b)
    assert seen == set(range(S.NUM_JOINTS))
    assert S.PARENTS == (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19)
    raw = torch.tensor(S.RAW_OFFSETS, dtype=F64)
    assert torch.equal(raw[0], torch.zeros(3, dtype=F64))
    assert torch.allclose(raw[1:].norm(dim=-1), torch.ones(21, dtype=F64))
    assert S.BONE_LENGTHS[0] == 0 and all(0.05 < b < 0.5 for b in S.BONE_LENGTHS[1:])
    # mirror permutation: an involution pairing left and right joints with mirrored offsets
    perm = list(S.MIRROR_PERM)
    assert [perm[p] for p in perm] == list(range(S.NUM_JOINTS))
    assert torch.equal(raw[perm] * torch.tensor([-1.0, 1, 1], dtype=F64), raw)


def test_real_bone_lengths_match_constants(sample):
    _, joints = sample
    j = joints.double()
    par = torch.tensor(S.PARENTS[1:])
    lengths = (j[:, 1:] - j[:, par]).norm(dim=-1)             # [T, 21]
    assert torch.allclose(lengths, torch.tensor(S.BONE_LENGTHS[1:], dtype=F64).expand_as(lengths),
                          atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# rotations and kinematics
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64])
def test_rotation_helpers(dtype):
    g = torch.Generator().manual_seed(1)
    q = S.qnormalize(torch.randn(5, 7, 4, generator=g, dtype=F64)).to(dtype)
    v = torch.randn(5, 7, 3, generator=g, dtype=F64).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == F32 else dict(atol=1e-12, rtol=1e-12)
    m = S.quat_to_matrix(q)
    assert m.dtype == dtype and m.shape == (5, 7, 3, 3)
    torch.testing.assert_close(S.qrot(q, v), (m @ v[..., None])[..., 0], **tol)
    eye = torch.eye(3, dtype=dtype).expand_as(m)
    torch.testing.assert_close(m @ m.transpose(-1, -2), eye, **tol)
    torch.testing.assert_close(S.cont6d_to_matrix(S.matrix_to_cont6d(m)), m, **tol)
    torch.testing.assert_close(S.quat_to_cont6d(q), S.matrix_to_cont6d(m), **tol)
    p = S.qnormalize(torch.randn(5, 7, 4, generator=g, dtype=F64)).to(dtype)
    torch.testing.assert_close(S.qrot(S.qmul(p, q), v), S.qrot(p, S.qrot(q, v)), **tol)
    torch.testing.assert_close(S.qrot(S.qinv(q), S.qrot(q, v)), v, **tol)
    w = torch.randn(5, 7, 3, generator=g, dtype=F64).to(dtype)
    b = S.qbetween(v, w)
    torch.testing.assert_close(S.qrot(b, v / v.norm(dim=-1, keepdim=True)),
                               w / w.norm(dim=-1, keepdim=True), **tol)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_fk_identity_is_rest_pose(dtype):
    quats = torch.zeros(3, S.NUM_JOINTS, 4, dtype=dtype)
    quats[..., 0] = 1
    root = torch.tensor([[0.0, 0.9, 0.0], [1.0, 1.0, -2.0], [0.5, 0.0, 0.5]], dtype=dtype)
    joints = S.forward_kinematics(quats, root)
    assert joints.shape == (3, S.NUM_JOINTS, 3) and joints.dtype == dtype
    raw = torch.tensor(S.RAW_OFFSETS, dtype=dtype)
    lengths = torch.tensor(S.BONE_LENGTHS, dtype=dtype)
    tol = dict(atol=1e-6, rtol=0) if dtype == F32 else dict(atol=1e-14, rtol=0)
    torch.testing.assert_close(joints[:, 0], root, **tol)
    for j in range(1, S.NUM_JOINTS):
        p = S.PARENTS[j]
        torch.testing.assert_close(joints[:, j] - joints[:, p], (raw[j] * lengths[j]).expand(3, 3),
                                   **tol)
    # same with 6D identity rotations
    d6 = torch.zeros(3, S.NUM_JOINTS, 6, dtype=dtype)
    d6[..., 0] = 1
    d6[..., 4] = 1
    torch.testing.assert_close(S.forward_kinematics_cont6d(d6, root), joints, **tol)
    # rest pose: left hip at +x, feet below the pelvis, head above
    assert (joints[:, 1, 0] > joints[:, 0, 0]).all() and (joints[:, 2, 0] < joints[:, 0, 0]).all()
    assert (joints[:, 10, 1] < joints[:, 0, 1]).all() and (joints[:, 15, 1] > joints[:, 0, 1]).all()


def test_ik_fk_round_trip_real(sample):
    _, joints = sample
    j = joints.double()
    q = S.inverse_kinematics(j)
    torch.testing.assert_close(S.forward_kinematics(q, j[:, 0]), j, atol=1e-5, rtol=0)  # [1.6e-6]
    q = S.inverse_kinematics(j, smooth_forward=True)
    torch.testing.assert_close(S.forward_kinematics(q, j[:, 0]), j, atol=1e-5, rtol=0)


def test_uniform_skeleton_retargets_bone_lengths():
    j = _fk_motion(T=12) * 1.1                     # a 10% larger person
    out = S.uniform_skeleton(j)
    par = torch.tensor(S.PARENTS[1:])
    lengths = (out[..., 1:, :] - out[..., par, :]).norm(dim=-1)
    want = torch.tensor(S.BONE_LENGTHS[1:], dtype=F64).expand_as(lengths)
    torch.testing.assert_close(lengths, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(out[..., 0, :], j[..., 0, :] / 1.1, atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------
# features <-> joints on the real sample
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64])
def test_joints_from_features_reproduces_real_joints(sample, dtype):
    feats, joints = sample
    rec = S.joints_from_features(feats.to(dtype))
    assert rec.shape == joints.shape == (170, 22, 3) and rec.dtype == dtype
    assert (rec - joints.to(dtype)).abs().max().item() < 1e-5


def test_joints_from_rot_features_reproduces_real_joints(sample):
    feats, joints = sample
    rec = S.joints_from_rot_features(feats.double())
    assert (rec - joints.double()).abs().max().item() < 1e-5      # [1.6e-6]


def test_features_from_real_joints_match_real_features(sample):
    feats, joints = sample
    ours = S.features_from_joints(joints.double())
    ref = feats.double()[:-1]
    assert ours.shape == (169, 263)
    # this clip turns < 180 degrees: the wrap fix changes nothing
    assert torch.equal(S.features_from_joints(joints.double(), fix_heading_wrap=True), ours)
    head = slice(0, 90)

    def err(rows, sl):
        return (ours[rows, sl] - ref[rows, sl]).abs().max().item()

    for sl in (S.ROOT_ROT_VEL, S.ROOT_LIN_VEL, S.ROOT_Y, S.RIC, S.LOCAL_VEL):
        assert err(head, sl) < 1e-5
    assert err(head, S.ROT6D) < 1e-4
    assert err(slice(None), S.ROOT_Y) < 1e-6
    assert err(slice(None), S.FOOT_CONTACT) == 0.0
    # the tail: heading smoothing saw one more frame in the original
    assert err(slice(None), S.ROOT_ROT_VEL) < 2e-3
    assert err(slice(None), S.ROOT_LIN_VEL) < 2e-3
    assert err(slice(None), S.RIC) < 3e-2
    assert err(slice(None), S.ROT6D) < 5e-2
    assert err(slice(None), S.LOCAL_VEL) < 2e-3


def test_round_trip_real(sample):
    _, joints = sample
    j = joints.double()
    rec = S.joints_from_features(S.features_from_joints(j))
    assert rec.shape == (169, 22, 3)
    assert (rec - j[:-1]).abs().max().item() < 1e-6


# ------------------------------------------------------------------------------------------
# features <-> joints on FK-generated motion
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-9), (F32, 1e-4)])
def test_round_trip_fk_motion(dtype, tol):
    j = _fk_motion(T=48, dtype=dtype)
    feats = S.features_from_joints(j)
    assert feats.shape == (47, 263) and feats.dtype == dtype
    rec = S.joints_from_features(feats)
    ref = S.normalize_joints(j)[:-1]
    assert (rec - ref).abs().max().item() < tol
    # normalized clip: on the floor, root starts at x = z = 0
    assert abs(S.normalize_joints(j)[..., 1].min().item()) < tol
    assert S.normalize_joints(j)[0, 0, [0, 2]].abs().max().item() < tol
    # the 6D block decodes, by FK on the same skeleton, to the same joints
    rec_rot = S.joints_from_rot_features(feats)
    assert (rec_rot - ref).abs().max().item() < max(tol, 1e-7) * 10
    # foot contacts are 0/1
    fc = feats[..., S.FOOT_CONTACT]
    assert ((fc == 0) | (fc == 1)).all()


def test_preprocess_invariance():
    """Features do not depend on where the clip starts or which way it faces."""
    j = _fk_motion(T=30)
    q = S.qnormalize(torch.tensor([math.cos(0.6), 0.0, math.sin(0.6), 0.0], dtype=F64))
    moved = S.qrot(q, j) + torch.tensor([3.0, 0.25, -1.0], dtype=F64)
    torch.testing.assert_close(S.features_from_joints(moved), S.features_from_joints(j),
                               atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------
# mirroring
# ------------------------------------------------------------------------------------------
def test_mirror_twice_is_identity():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 9, 263, generator=g, dtype=F64)
    j = torch.randn(2, 9, 22, 3, generator=g, dtype=F64)
    assert torch.equal(S.mirror_features(S.mirror_features(f)), f)
    assert torch.equal(S.mirror_joints(S.mirror_joints(j)), j)


def test_mirror_swaps_hands():
    j = _fk_motion(T=10)
    m = S.mirror_joints(j)
    flip = torch.tensor([-1.0, 1.0, 1.0], dtype=F64)
    assert torch.equal(m[..., 20, :], j[..., 21, :] * flip)      # left wrist <- right wrist
    assert torch.equal(m[..., 21, :], j[..., 20, :] * flip)
    assert torch.equal(m[..., 15, :], j[..., 15, :] * flip)      # head stays, x negated


def test_mirror_features_consistent_with_joints():
    j = _fk_motion(T=40, seed=5)
    f = S.features_from_joints(j)
    # extracting features of the mirrored motion == mirroring the features (all blocks)
    torch.testing.assert_close(S.features_from_joints(S.mirror_joints(j)), S.mirror_features(f),
                               atol=1e-9, rtol=0)
    torch.testing.assert_close(S.joints_from_features(S.mirror_features(f)),
                               S.mirror_joints(S.joints_from_features(f)), atol=1e-9, rtol=0)
    # the mirrored 6D block decodes by FK on the mirrored skeleton (left/right lengths swapped)
    lengths = torch.tensor(S.BONE_LENGTHS, dtype=F64)[list(S.MIRROR_PERM)]
    torch.testing.assert_close(
        S.joints_from_rot_features(S.mirror_features(f), S.skeleton_offsets(lengths, dtype=F64)),
        S.mirror_joints(S.joints_from_features(f)), atol=1e-7, rtol=0)


def test_mirror_real_sample(sample):
    feats, joints = sample
    f = feats.double()
    torch.testing.assert_close(S.joints_from_features(S.mirror_features(f)),
                               S.mirror_joints(joints.double()), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# batching, dtypes, validation
# ------------------------------------------------------------------------------------------
def test_batch_dims():
    j = _fk_motion(T=20, batch=(2, 3))
    assert j.shape == (2, 3, 20, 22, 3)
    f = S.features_from_joints(j)
    assert f.shape == (2, 3, 19, 263)
    for a in range(2):
        for b in range(3):
            torch.testing.assert_close(f[a, b], S.features_from_joints(j[a, b]), atol=1e-12, rtol=0)
    rec = S.joints_from_features(f)
    assert rec.shape == (2, 3, 19, 22, 3)
    torch.testing.assert_close(rec[1, 2], S.joints_from_features(f[1, 2]), atol=1e-12, rtol=0)
    assert S.mirror_features(f).shape == f.shape and S.mirror_joints(j).shape == j.shape


def test_float32_matches_float64():
    j = _fk_motion(T=30)
    f64 = S.features_from_joints(j)
    f32 = S.features_from_joints(j.float())
    assert f32.dtype == F32
    cont = [sl for n, sl in S.FEATURE_BLOCKS if n != "foot_contact"]
    for sl in cont:
        assert (f32[:, sl].double() - f64[:, sl]).abs().max().item() < 1e-4
    r32 = S.joints_from_features(f64.float())
    assert r32.dtype == F32
    assert (r32.double() - S.joints_from_features(f64)).abs().max().item() < 1e-5


@pytest.mark.parametrize("call,name", [
    (lambda: S.features_from_joints(torch.zeros(10, 21, 3)), "joints"),
    (lambda: S.features_from_joints(torch.zeros(10, 22, 4)), "joints"),
    (lambda: S.features_from_joints(torch.zeros(22, 3)), "joints"),
    (lambda: S.features_from_joints(torch.zeros(1, 22, 3)), "joints"),
    (lambda: S.features_from_joints(torch.zeros(10, 22, 3, dtype=torch.int64)), "joints"),
    (lambda: S.features_from_joints([[0.0] * 3] * 22), "joints"),
    (lambda: S.joints_from_features(torch.zeros(10, 262)), "features"),
    (lambda: S.joints_from_features(torch.zeros(263)), "features"),
    (lambda: S.joints_from_rot_features(torch.zeros(4, 264)), "features"),
    (lambda: S.mirror_features(torch.zeros(4, 260)), "features"),
    (lambda: S.mirror_joints(torch.zeros(4, 21, 3)), "joints"),
    (lambda: S.forward_kinematics(torch.zeros(4, 22, 3), torch.zeros(4, 3)), "quats"),
    (lambda: S.forward_kinematics(torch.zeros(4, 22, 4), torch.zeros(4, 2)), "root_pos"),
    (lambda: S.forward_kinematics(torch.zeros(4, 22, 4), torch.zeros(4, 3), torch.zeros(21, 3)),
     "offsets"),
    (lambda: S.inverse_kinematics(torch.zeros(4, 20, 3)), "joints"),
    (lambda: S.skeleton_offsets(torch.ones(21)), "bone_lengths"),
])
def test_bad_shapes_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_heading_wrap_quirk_and_fix():
    """Turning in place by 300 degrees: the original's arcsin convention mis-signs the step at
    which the heading crosses 180 degrees (recovery then off by ~4 cm here); the fix is exact."""
    T = 60
    aa = torch.zeros(T, S.NUM_JOINTS, 3, dtype=F64)
    aa[:, 0, 1] = torch.linspace(0, 5.2, T, dtype=F64)
    j = S.forward_kinematics(_axis_angle_to_quat(aa),
                             torch.tensor([0.0, 0.9, 0.0], dtype=F64).expand(T, 3))
    ref = S.normalize_joints(j)[:-1]
    orig = S.features_from_joints(j)
    fixed = S.features_from_joints(j, fix_heading_wrap=True)
    assert (S.joints_from_features(fixed) - ref).abs().max().item() < 1e-9
    err = (S.joints_from_features(orig) - ref).abs().amax(dim=(-1, -2))
    assert err[:30].max().item() < 1e-9 and err.max().item() > 1e-2
    differ = (orig[:, 0] != fixed[:, 0]).nonzero().flatten().tolist()
    assert len(differ) == 1 and torch.equal(orig[:, 1:], fixed[:, 1:])
