"""The 22-joint T2M (HumanML3D) skeleton and its 263-d motion features, in PyTorch.

Conventions follow the public HumanML3D processing (``EricGuo5513/HumanML3D``:
``paramUtil.py``, ``common/skeleton.py``, ``motion_representation``; the recovery is MDM's
``recover_from_ric``). Re-implemented here, batched, for float32 and float64.

Coordinates: metres, y up; the body's left is +x, a body facing Z+ has its left hip at +x.
Quaternions are ``(w, x, y, z)``, unit norm, and act on column vectors (``qrot(q, v)``).

Feature layout per frame (``FEATURE_DIM = 263``; ``T`` joint frames give ``T - 1`` feature rows):

========================  =========  ==============================================================
block                     slice      content
========================  =========  ==============================================================
``ROOT_ROT_VEL``          0:1        heading change to the next frame about y, **half** the angle
                                     (``arcsin`` of the y part of the relative quaternion)
``ROOT_LIN_VEL``          1:3        root xz displacement to the next frame, in the next frame's
                                     heading frame
``ROOT_Y``                3:4        root height above the floor
``RIC``                   4:67       joints 1..21 relative to the root on x and z (y stays
                                     absolute height), rotated into the heading frame
``ROT6D``                 67:193     joints 1..21 local rotations (IK), first two matrix columns
``LOCAL_VEL``             193:259    all 22 joints' displacement to the next frame, heading frame
``FOOT_CONTACT``          259:263    left feet (7, 10) then right feet (8, 11): squared
                                     displacement < 0.002
========================  =========  ==============================================================

The heading of each frame is computed from the hips and shoulders (joints 2, 1, 17, 16) and
smoothed over time with a Gaussian (sigma 20 frames, edge replicate), exactly as the original
(``inverse_kinematics_np(..., smooth_forward=True)``); frame 0's heading is forced to the
identity (the original does this too; preprocessing turned frame 0 to face Z+).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "NUM_JOINTS", "FEATURE_DIM", "JOINT_NAMES", "KINEMATIC_CHAIN", "PARENTS", "RAW_OFFSETS",
    "BONE_LENGTHS",
    "FACE_JOINTS", "FOOT_LEFT", "FOOT_RIGHT", "FEET_THRESHOLD", "FPS", "LEFT_RIGHT_PAIRS",
    "MIRROR_PERM", "ROOT_ROT_VEL", "ROOT_LIN_VEL", "ROOT_Y", "RIC", "ROT6D", "LOCAL_VEL",
    "FOOT_CONTACT", "FEATURE_BLOCKS",
    "qnormalize", "qmul", "qinv", "qrot", "qbetween", "quat_to_matrix", "matrix_to_cont6d",
    "cont6d_to_matrix", "quat_to_cont6d", "skeleton_offsets", "forward_kinematics",
    "forward_kinematics_cont6d", "inverse_kinematics", "uniform_skeleton", "normalize_joints",
    "joints_from_rot_features",
    "features_from_joints", "joints_from_features", "mirror_joints", "mirror_features",
]

# --------------------------------------------------------------------------------------------
# Skeleton constants
# --------------------------------------------------------------------------------------------
NUM_JOINTS = 22
FPS = 20

#: the SMPL names of the 22 joints, in index order (the first 22 SMPL body joints).
JOINT_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist",
)
assert len(JOINT_NAMES) == NUM_JOINTS

#: right leg, left leg, spine-head, right arm, left arm (joint 0 = pelvis).
KINEMATIC_CHAIN = (
    (0, 2, 5, 8, 11),
    (0, 1, 4, 7, 10),
    (0, 3, 6, 9, 12, 15),
    (9, 14, 17, 19, 21),
    (9, 13, 16, 18, 20),
)


def _parents_from_chains(chains) -> tuple:
    parents = [-2] * NUM_JOINTS
    parents[0] = -1
    for chain in chains:
        for a, b in zip(chain[:-1], chain[1:]):
            parents[b] = a
    assert all(p != -2 for p in parents)
    return tuple(parents)


#: parent of each joint (-1 for the root), derived from ``KINEMATIC_CHAIN``.
PARENTS = _parents_from_chains(KINEMATIC_CHAIN)

#: unit rest directions of the bone parent(j) -> j (x left, y up, z forward); row 0 is zero.
RAW_OFFSETS = (
    (0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, -1, 0), (0, 1, 0), (0, -1, 0),
    (0, -1, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (0, 1, 0), (1, 0, 0), (-1, 0, 0), (0, 0, 1),
    (0, -1, 0), (0, -1, 0), (0, -1, 0), (0, -1, 0), (0, -1, 0), (0, -1, 0),
)

#: length (m) of the bone parent(j) -> j; entry 0 is 0. The dataset's target skeleton comes from
#: its clip 000021 (not available here). Every HumanML3D clip is retargeted to that skeleton by
#: FK, so the bone lengths of any processed clip are the target's: these are the medians over
#: frames of the bone lengths of the real clip 012314's ``new_joints`` (they vary over frames by
#: < 3e-7 m, so they are the target skeleton's lengths to float32 precision). Note the target is
#: slightly asymmetric (left hip 0.1031 vs right hip 0.1099).
BONE_LENGTHS = (
    0.0, 0.103074, 0.109883, 0.131568, 0.393623, 0.390188, 0.143190, 0.432433, 0.425643,
    0.057365, 0.143382, 0.149419, 0.219360, 0.137487, 0.143383, 0.103039, 0.131614, 0.122984,
    0.256840, 0.263092, 0.266012, 0.269876,
)

#: right hip, left hip, right shoulder, left shoulder (the original's ``face_joint_indx``).
FACE_JOINTS = (2, 1, 17, 16)
FOOT_RIGHT = (8, 11)
FOOT_LEFT = (7, 10)
FEET_THRESHOLD = 0.002
#: the original's leg joints for the retargeting scale (``l_idx1, l_idx2``).
_LEG_JOINTS = (5, 8)
_SMOOTH_SIGMA = 20.0

#: (left, right) joint pairs.
LEFT_RIGHT_PAIRS = ((1, 2), (4, 5), (7, 8), (10, 11), (13, 14), (16, 17), (18, 19), (20, 21))


def _mirror_perm() -> tuple:
    perm = list(range(NUM_JOINTS))
    for a, b in LEFT_RIGHT_PAIRS:
        perm[a], perm[b] = b, a
    return tuple(perm)


#: ``mirrored[j] = reflect(original[MIRROR_PERM[j]])``.
MIRROR_PERM = _mirror_perm()

# --------------------------------------------------------------------------------------------
# Feature layout
# --------------------------------------------------------------------------------------------
ROOT_ROT_VEL = slice(0, 1)
ROOT_LIN_VEL = slice(1, 3)
ROOT_Y = slice(3, 4)
RIC = slice(4, 4 + 3 * (NUM_JOINTS - 1))                    # 4:67
ROT6D = slice(RIC.stop, RIC.stop + 6 * (NUM_JOINTS - 1))    # 67:193
LOCAL_VEL = slice(ROT6D.stop, ROT6D.stop + 3 * NUM_JOINTS)  # 193:259
FOOT_CONTACT = slice(LOCAL_VEL.stop, LOCAL_VEL.stop + 4)    # 259:263
FEATURE_DIM = FOOT_CONTACT.stop
#: the blocks in layout order.
FEATURE_BLOCKS = (
    ("root_rot_vel", ROOT_ROT_VEL), ("root_lin_vel", ROOT_LIN_VEL), ("root_y", ROOT_Y),
    ("ric", RIC), ("rot6d", ROT6D), ("local_vel", LOCAL_VEL), ("foot_contact", FOOT_CONTACT),
)
assert FEATURE_DIM == 263


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check(name: str, x, tail: Sequence[Optional[int]], min_extra: int = 0) -> torch.Tensor:
    """x must be a floating tensor [..., *tail] with at least ``min_extra`` leading dims.
    ``None`` in ``tail`` means any size."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    n = len(tail)
    if x.dim() < n + min_extra or any(
            t is not None and s != t for s, t in zip(x.shape[x.dim() - n:], tail)):
        want = "[" + ", ".join(["..."] + ["*" if t is None else str(t) for t in tail]) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------
# Quaternion and 6D helpers (batched over leading dims, any floating dtype)
# --------------------------------------------------------------------------------------------
def qnormalize(q: torch.Tensor) -> torch.Tensor:
    return q / q.norm(dim=-1, keepdim=True)


def qmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b (apply b first, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack((
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ), dim=-1)


def qinv(q: torch.Tensor) -> torch.Tensor:
    """Conjugate (the inverse of a unit quaternion)."""
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def qrot(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate vectors v [..., 3] by unit quaternions q [..., 4] (broadcasting)."""
    w = q[..., :1]
    u = q[..., 1:]
    u, v = torch.broadcast_tensors(u, v)
    uv = torch.linalg.cross(u, v, dim=-1)
    uuv = torch.linalg.cross(u, uv, dim=-1)
    return v + 2.0 * (w * uv + uuv)


def qbetween(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The shortest-arc unit quaternion rotating direction v0 onto v1 (undefined if opposite)."""
    v0, v1 = torch.broadcast_tensors(v0, v1)
    v = torch.linalg.cross(v0, v1, dim=-1)
    w = torch.sqrt((v0 * v0).sum(-1, keepdim=True) * (v1 * v1).sum(-1, keepdim=True)) \
        + (v0 * v1).sum(-1, keepdim=True)
    return qnormalize(torch.cat([w, v], dim=-1))


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """[..., 4] -> rotation matrices [..., 3, 3] (q need not be normalized)."""
    w, x, y, z = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    m = torch.stack((
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    ), dim=-1)
    return m.reshape(q.shape[:-1] + (3, 3))


def matrix_to_cont6d(m: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> [..., 6]: the first column then the second column (HumanML3D order)."""
    return torch.cat([m[..., :, 0], m[..., :, 1]], dim=-1)


def cont6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """[..., 6] -> [..., 3, 3] by Gram-Schmidt (columns x, y, z = x cross y)."""
    a, b = d6[..., :3], d6[..., 3:]
    x = a / a.norm(dim=-1, keepdim=True)
    z = torch.linalg.cross(x, b, dim=-1)
    z = z / z.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x, dim=-1)
    return torch.stack([x, y, z], dim=-1)


def quat_to_cont6d(q: torch.Tensor) -> torch.Tensor:
    return matrix_to_cont6d(quat_to_matrix(q))


# --------------------------------------------------------------------------------------------
# Kinematics
# --------------------------------------------------------------------------------------------
def skeleton_offsets(bone_lengths: Optional[torch.Tensor] = None, *,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Rest-pose offsets [22, 3] (parent -> joint): ``RAW_OFFSETS * bone_lengths``."""
    raw = torch.tensor(RAW_OFFSETS, dtype=dtype, device=device)
    if bone_lengths is None:
        bone_lengths = torch.tensor(BONE_LENGTHS, dtype=dtype, device=device)
    bone_lengths = _check("bone_lengths", torch.as_tensor(bone_lengths, dtype=dtype, device=device),
                          (NUM_JOINTS,))
    return raw * bone_lengths[..., None]


def forward_kinematics(quats: torch.Tensor, root_pos: torch.Tensor,
                       offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Joint positions [..., 22, 3] from rotations [..., 22, 4] and root positions [..., 3].

    HumanML3D convention: ``quats[..., 0]`` is the root's global rotation and ``quats[..., j]``
    (j > 0) the local rotation of the bone parent(j) -> j; every chain restarts from the root
    rotation (so the collars 13, 14 are relative to the root, not to the spine joint 9), and
    ``joint[j] = joint[parent] + R_j offsets[j]`` with ``R_j`` the product along the chain.
    ``offsets``: [22, 3] or [..., 22, 3]; default ``skeleton_offsets()``.
    """
    _check("quats", quats, (NUM_JOINTS, 4))
    _check("root_pos", root_pos, (3,))
    if offsets is None:
        offsets = skeleton_offsets(dtype=quats.dtype, device=quats.device)
    _check("offsets", offsets, (NUM_JOINTS, 3))
    batch = torch.broadcast_shapes(quats.shape[:-2], root_pos.shape[:-1], offsets.shape[:-2])
    quats = quats.expand(batch + quats.shape[-2:])
    offsets = offsets.to(quats.dtype).expand(batch + offsets.shape[-2:])
    joints = [None] * NUM_JOINTS
    joints[0] = root_pos.to(quats.dtype).expand(batch + (3,))
    for chain in KINEMATIC_CHAIN:
        r = quats[..., 0, :]
        for i in range(1, len(chain)):
            j = chain[i]
            r = qmul(r, quats[..., j, :])
            joints[j] = joints[chain[i - 1]] + qrot(r, offsets[..., j, :])
    return torch.stack(joints, dim=-2)


def forward_kinematics_cont6d(cont6d: torch.Tensor, root_pos: torch.Tensor,
                              offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """As ``forward_kinematics`` with 6D rotations [..., 22, 6]."""
    _check("cont6d", cont6d, (NUM_JOINTS, 6))
    _check("root_pos", root_pos, (3,))
    if offsets is None:
        offsets = skeleton_offsets(dtype=cont6d.dtype, device=cont6d.device)
    _check("offsets", offsets, (NUM_JOINTS, 3))
    mats = cont6d_to_matrix(cont6d)
    batch = torch.broadcast_shapes(mats.shape[:-3], root_pos.shape[:-1], offsets.shape[:-2])
    mats = mats.expand(batch + mats.shape[-3:])
    offsets = offsets.to(cont6d.dtype).expand(batch + offsets.shape[-2:])
    joints = [None] * NUM_JOINTS
    joints[0] = root_pos.to(cont6d.dtype).expand(batch + (3,))
    for chain in KINEMATIC_CHAIN:
        r = mats[..., 0, :, :]
        for i in range(1, len(chain)):
            j = chain[i]
            r = r @ mats[..., j, :, :]
            joints[j] = joints[chain[i - 1]] + (r @ offsets[..., j, :, None])[..., 0]
    return torch.stack(joints, dim=-2)


def _gaussian_smooth_time(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian filter along dim -2 (time), edge replicate; scipy ``gaussian_filter1d(x, sigma,
    axis=-2, mode='nearest')`` with its default truncation at 4 sigma."""
    radius = int(4.0 * sigma + 0.5)
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (k / sigma) ** 2)
    w = w / w.sum()
    t = x.shape[-2]
    idx = (torch.arange(t, device=x.device)[:, None]
           + torch.arange(-radius, radius + 1, device=x.device)[None, :]).clamp_(0, t - 1)
    gathered = x[..., idx, :]                     # [..., T, 2r+1, C]
    return (gathered * w[:, None]).sum(-2)


def _forward_direction(joints: torch.Tensor) -> torch.Tensor:
    """Unnormalized horizontal facing direction [..., 3] of poses [..., 22, 3], as the original
    ``inverse_kinematics_np`` computes it. Its unpacking ``l_hip, r_hip, sdr_r, sdr_l =
    face_joint_idx`` with ``face_joint_idx = [2, 1, 17, 16]`` makes the hip term
    ``joint1 - joint2`` (left minus right) while the shoulder term is ``joint17 - joint16``
    (right minus left): the two partly cancel, the wider shoulders win. Reproduced as is: the
    real features of clip 012314 are reproduced only with this (see tests)."""
    r_hip, l_hip, sdr_r, sdr_l = FACE_JOINTS
    across = (joints[..., l_hip, :] - joints[..., r_hip, :]) \
        + (joints[..., sdr_r, :] - joints[..., sdr_l, :])
    across = across / across.norm(dim=-1, keepdim=True)
    up = torch.zeros_like(across)
    up[..., 1] = 1.0
    return torch.linalg.cross(up, across, dim=-1)


def inverse_kinematics(joints: torch.Tensor, smooth_forward: bool = False) -> torch.Tensor:
    """Rotations [..., T, 22, 4] such that ``forward_kinematics`` with this skeleton's bone
    lengths reproduces the bone directions of ``joints`` [..., T, 22, 3] (swing only: twist about
    a bone is not observable from positions and is zero).

    As the original: the root rotation turns the (optionally Gaussian-smoothed, sigma 20) facing
    direction onto Z+, and frame 0's root rotation is set to the identity.
    """
    _check("joints", joints, (None, NUM_JOINTS, 3))
    if joints.shape[-3] < 1:
        raise ValueError(f"joints must have at least one frame, got {list(joints.shape)}")
    forward = _forward_direction(joints)
    if smooth_forward:
        forward = _gaussian_smooth_time(forward, _SMOOTH_SIGMA)
    forward = forward / forward.norm(dim=-1, keepdim=True)
    target = torch.zeros_like(forward)
    target[..., 2] = 1.0
    root_quat = qbetween(forward, target)
    ident = torch.zeros_like(root_quat[..., :1, :])
    ident[..., 0] = 1.0
    root_quat = torch.cat([ident, root_quat[..., 1:, :]], dim=-2)

    raw = torch.tensor(RAW_OFFSETS, dtype=joints.dtype, device=joints.device)
    quats = [None] * NUM_JOINTS
    quats[0] = root_quat
    for chain in KINEMATIC_CHAIN:
        r = root_quat
        for a, b in zip(chain[:-1], chain[1:]):
            v = joints[..., b, :] - joints[..., a, :]
            v = v / v.norm(dim=-1, keepdim=True)
            rot_uv = qbetween(raw[b].expand_as(v), v)
            local = qmul(qinv(r), rot_uv)
            quats[b] = local
            r = qmul(r, local)
    return torch.stack(quats, dim=-2)


def uniform_skeleton(joints: torch.Tensor,
                     bone_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Retarget ``joints`` [..., T, 22, 3] onto a skeleton with ``bone_lengths`` (default
    ``BONE_LENGTHS``), as the original's ``uniform_skeleton``: IK (unsmoothed), FK with the target
    offsets, root trajectory scaled by the ratio of the leg lengths (right thigh + shin, the bones
    ending at joints 5 and 8) of frame 0 to the target's."""
    _check("joints", joints, (None, NUM_JOINTS, 3))
    tgt = skeleton_offsets(bone_lengths, dtype=joints.dtype, device=joints.device)
    first = joints[..., 0, :, :]
    src_len = torch.stack([(first[..., j, :] - first[..., PARENTS[j], :]).norm(dim=-1)
                           for j in _LEG_JOINTS], dim=-1)           # [..., 2]
    # the original takes max |component| of length * raw direction, i.e. the bone length.
    tgt_len = torch.stack([tgt[j].abs().max() for j in _LEG_JOINTS])
    scale = tgt_len.sum() / src_len.sum(-1)                         # [...]
    quats = inverse_kinematics(joints, smooth_forward=False)
    root = joints[..., :, 0, :] * scale[..., None, None]
    return forward_kinematics(quats, root, tgt)


# --------------------------------------------------------------------------------------------
# Features <-> joints
# --------------------------------------------------------------------------------------------
def _y_quat(half_angle: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(half_angle)
    return torch.stack([torch.cos(half_angle), z, torch.sin(half_angle), z], dim=-1)


def normalize_joints(joints: torch.Tensor) -> torch.Tensor:
    """The original's normalization of a clip [..., T, 22, 3]: put on the floor (the lowest joint
    over the clip at y = 0), move frame 0's root to x = z = 0, and rotate about y so that frame 0
    faces Z+ (facing = up x across, across = (right hip - left hip) + (right shoulder - left
    shoulder), joints 2, 1, 17, 16)."""
    _check("joints", joints, (None, NUM_JOINTS, 3))
    if joints.shape[-3] < 1:
        raise ValueError(f"joints must have at least one frame, got {list(joints.shape)}")
    floor = joints[..., 1].amin(dim=(-2, -1))                        # [...]
    shift = torch.stack([joints[..., 0, 0, 0], floor, joints[..., 0, 0, 2]], dim=-1)
    pos = joints - shift[..., None, None, :]
    r_hip, l_hip, sdr_r, sdr_l = FACE_JOINTS
    f0 = pos[..., 0, :, :]
    across = (f0[..., r_hip, :] - f0[..., l_hip, :]) + (f0[..., sdr_r, :] - f0[..., sdr_l, :])
    across = across / across.norm(dim=-1, keepdim=True)
    up = torch.zeros_like(across)
    up[..., 1] = 1.0
    fwd = torch.linalg.cross(up, across, dim=-1)
    fwd = fwd / fwd.norm(dim=-1, keepdim=True)
    tgt = torch.zeros_like(fwd)
    tgt[..., 2] = 1.0
    q0 = qbetween(fwd, tgt)
    return qrot(q0[..., None, None, :], pos)


def features_from_joints(joints: torch.Tensor, *, feet_threshold: float = FEET_THRESHOLD,
                         preprocess: bool = True,
                         retarget: bool = False,
                         bone_lengths: Optional[torch.Tensor] = None,
                         fix_heading_wrap: bool = False) -> torch.Tensor:
    """HumanML3D features [..., T-1, 263] from joint positions [..., T, 22, 3] (T >= 2).

    ``preprocess`` (default) applies ``normalize_joints`` first (floor, origin, frame 0 faces Z+),
    as the original does; without it the input must already be normalized for
    ``joints_from_features`` to give it back. ``retarget=True`` first runs
    ``uniform_skeleton`` onto ``bone_lengths`` (the original always does this with the dataset's
    target skeleton; off by default because data that is already on the target skeleton, such as
    ``new_joints``, would only pick up IK round-off). Computed in the dtype of ``joints``.

    Known quirk of the original, reproduced by default: the root angular velocity is
    ``arcsin(y)`` of the relative heading quaternion, whose sign is not fixed; when the heading
    crosses 180 degrees from frame 0's, that frame's value gets the wrong sign (error: twice the
    true step) and the recovered motion is rotated from then on by a few degrees.
    ``fix_heading_wrap=True`` uses ``arcsin(sign(w) y)`` instead: identical otherwise, and exact
    round trips for any turning (not what the dataset's files contain for such clips).
    """
    _check("joints", joints, (None, NUM_JOINTS, 3))
    if joints.shape[-3] < 2:
        raise ValueError(f"joints must have at least 2 frames, got {list(joints.shape)}")
    pos = joints
    if retarget:
        pos = uniform_skeleton(pos, bone_lengths)
    if preprocess:
        pos = normalize_joints(pos)

    # foot contacts (global positions)
    def contact(ids):
        d = pos[..., 1:, list(ids), :] - pos[..., :-1, list(ids), :]
        return ((d * d).sum(-1) < feet_threshold).to(pos.dtype)

    feet_l, feet_r = contact(FOOT_LEFT), contact(FOOT_RIGHT)

    quats = inverse_kinematics(pos, smooth_forward=True)
    cont6d = quat_to_cont6d(quats)                                  # [..., T, 22, 6]
    r_rot = quats[..., 0, :]                                        # [..., T, 4]

    root = pos[..., 0, :]
    velocity = qrot(r_rot[..., 1:, :], root[..., 1:, :] - root[..., :-1, :])
    r_velocity = qmul(r_rot[..., 1:, :], qinv(r_rot[..., :-1, :]))
    y = r_velocity[..., 2:3]
    if fix_heading_wrap:
        y = torch.where(r_velocity[..., 0:1] < 0, -y, y)
    rot_vel = torch.asin(y.clamp(-1.0, 1.0))

    local = pos.clone()
    local[..., 0] = local[..., 0] - pos[..., 0:1, 0]
    local[..., 2] = local[..., 2] - pos[..., 0:1, 2]
    local = qrot(r_rot[..., None, :], local)                        # [..., T, 22, 3]

    local_vel = qrot(r_rot[..., :-1, None, :], pos[..., 1:, :, :] - pos[..., :-1, :, :])

    lead = pos.shape[:-3]
    t1 = pos.shape[-3] - 1
    return torch.cat([
        rot_vel,
        velocity[..., [0, 2]],
        local[..., :-1, 0, 1:2],
        local[..., :-1, 1:, :].reshape(lead + (t1, 3 * (NUM_JOINTS - 1))),
        cont6d[..., :-1, 1:, :].reshape(lead + (t1, 6 * (NUM_JOINTS - 1))),
        local_vel.reshape(lead + (t1, 3 * NUM_JOINTS)),
        feet_l, feet_r,
    ], dim=-1)


def _root_heading_and_position(features: torch.Tensor):
    """Heading quaternions [..., T, 4] and root positions [..., T, 3] by integrating the root
    angular velocity (half angles) and xz velocity from frame 0 (identity heading, x = z = 0)."""
    rot_vel = features[..., 0]
    ang = torch.cat([torch.zeros_like(rot_vel[..., :1]), rot_vel[..., :-1]], dim=-1)
    ang = torch.cumsum(ang, dim=-1)
    heading = _y_quat(ang)
    step = torch.zeros(features.shape[:-1] + (3,), dtype=features.dtype, device=features.device)
    step[..., 1:, 0] = features[..., :-1, 1]
    step[..., 1:, 2] = features[..., :-1, 2]
    step = qrot(qinv(heading), step)
    root = torch.cumsum(step, dim=-2)
    root[..., 1] = features[..., 3]
    return heading, root


def joints_from_features(features: torch.Tensor) -> torch.Tensor:
    """Joint positions [..., T, 22, 3] from features [..., T, 263] by the standard recovery
    (MDM's ``recover_from_ric``): root height from feature 3, root xz and heading integrated
    from features 0-2, joints 1..21 = RIC block rotated back by the heading plus root xz.
    Uses only features 0..66 (root and RIC blocks)."""
    _check("features", features, (None, FEATURE_DIM))
    heading, root = _root_heading_and_position(features)
    ric = features[..., RIC].reshape(features.shape[:-1] + (NUM_JOINTS - 1, 3))
    pos = qrot(qinv(heading)[..., None, :], ric)
    pos = pos + torch.stack([root[..., 0], torch.zeros_like(root[..., 0]), root[..., 2]],
                            dim=-1)[..., None, :]
    return torch.cat([root[..., None, :], pos], dim=-2)


# --------------------------------------------------------------------------------------------
# Mirroring
# --------------------------------------------------------------------------------------------
def _reflect_x(v: torch.Tensor) -> torch.Tensor:
    return v * v.new_tensor([-1.0, 1.0, 1.0])


def mirror_joints(joints: torch.Tensor) -> torch.Tensor:
    """Left-right mirror [..., 22, 3]: swap left/right joints, negate x. An involution."""
    _check("joints", joints, (NUM_JOINTS, 3))
    return _reflect_x(joints[..., list(MIRROR_PERM), :])


def mirror_features(features: torch.Tensor) -> torch.Tensor:
    """Left-right mirror of features [..., 263], consistent with ``mirror_joints``:
    ``joints_from_features(mirror_features(f)) == mirror_joints(joints_from_features(f))`` and
    (up to round-off) ``features_from_joints(mirror_joints(j)) ==
    mirror_features(features_from_joints(j))``. Root angular velocity and x components negate;
    per-joint blocks swap left/right; a local rotation R becomes M R M (M = diag(-1, 1, 1)), i.e.
    6D ``(c0, c1) -> ((c0x, -c0y, -c0z), (-c1x, c1y, c1z))``; foot contacts swap left/right."""
    _check("features", features, (FEATURE_DIM,))
    lead = features.shape[:-1]
    perm = list(MIRROR_PERM)
    out_rot = -features[..., ROOT_ROT_VEL]
    out_lin = features[..., ROOT_LIN_VEL] * features.new_tensor([-1.0, 1.0])
    out_y = features[..., ROOT_Y]
    ric = features[..., RIC].reshape(lead + (NUM_JOINTS - 1, 3))
    ric = torch.cat([torch.zeros_like(ric[..., :1, :]), ric], dim=-2)
    ric = _reflect_x(ric[..., perm, :])[..., 1:, :].reshape(lead + (3 * (NUM_JOINTS - 1),))
    rot = features[..., ROT6D].reshape(lead + (NUM_JOINTS - 1, 6))
    rot = torch.cat([torch.zeros_like(rot[..., :1, :]), rot], dim=-2)[..., perm, :][..., 1:, :]
    rot = (rot * rot.new_tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0])).reshape(
        lead + (6 * (NUM_JOINTS - 1),))
    vel = features[..., LOCAL_VEL].reshape(lead + (NUM_JOINTS, 3))
    vel = _reflect_x(vel[..., perm, :]).reshape(lead + (3 * NUM_JOINTS,))
    feet = features[..., FOOT_CONTACT]
    feet = torch.cat([feet[..., 2:4], feet[..., 0:2]], dim=-1)
    return torch.cat([out_rot, out_lin, out_y, ric, rot, vel, feet], dim=-1)


def joints_from_rot_features(features: torch.Tensor,
                             offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Joint positions [..., T, 22, 3] from the root blocks and the 6D rotation block by FK
    (the original's ``recover_from_rot``), on ``offsets`` (default ``skeleton_offsets()``).
    Only bone directions come from the features, so this agrees with ``joints_from_features``
    when the motion is on the same skeleton."""
    _check("features", features, (None, FEATURE_DIM))
    heading, root = _root_heading_and_position(features)
    rot = features[..., ROT6D].reshape(features.shape[:-1] + (NUM_JOINTS - 1, 6))
    cont6d = torch.cat([quat_to_cont6d(heading)[..., None, :], rot], dim=-2)
    return forward_kinematics_cont6d(cont6d, root, offsets)
