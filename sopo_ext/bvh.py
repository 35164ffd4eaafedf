"""BVH (Biovision Hierarchy) motion files, and the BVH form of a 22-joint T2M (HumanML3D) motion.

Generic part: :class:`BvhMotion` (a hierarchy with offsets, per-frame root positions and Euler
angles), :func:`write_bvh_file`, its own forward kinematics :meth:`BvhMotion.world`, and the
Euler conversions :func:`euler_to_matrix` / :func:`matrix_to_euler`.

Conventions of every file written here:

* rotation channels ``Zrotation Yrotation Xrotation``: a joint's local rotation is
  ``Rz(z) @ Ry(y) @ Rx(x)`` (intrinsic Z, then Y, then X; the usual BVH reading, which Blender,
  MotionBuilder and ``bvhio`` share); angles in degrees, unwrapped over time (no 360-degree jumps);
* the root has 6 channels ``Xposition Yposition Zposition Zrotation Yrotation Xrotation`` and
  ``OFFSET 0 0 0`` (so readers that add the root offset to its position channels and readers that
  replace it agree), every other joint 3 rotation channels;
* a joint's channels rotate the offsets of its children (and everything below them): world
  rotation ``W_j = W_parent(j) @ L_j``, position ``p_child = p_j + W_j @ offset_child``;
* y up, and the rest pose (all angles zero) is the T2M rest pose of ``RAW_OFFSETS``
  (body facing +z, its left at +x, legs and arms pointing down, feet and head pointing forward).

T2M part: :func:`t2m_bvh_motion` turns HumanML3D IK rotations (``skeleton.inverse_kinematics``)
on a fixed-offset skeleton into a :class:`BvhMotion` whose joints are exactly
``skeleton.forward_kinematics`` of those rotations. HumanML3D's FK gives every bone its own
rotation: the three bones leaving the pelvis (to the hips and spine1) and the three leaving spine3
(to the neck and collars) are rotated independently, which one BVH joint (one rotation for all its
children) cannot express. So the hierarchy has, besides the 22 T2M joints (SMPL names), four
zero-offset *branch* joints: ``left_hip_branch`` / ``right_hip_branch`` between pelvis and the hips,
``left_collar_branch`` / ``right_collar_branch`` between spine3 and the collars. The pelvis' own
rotation drives spine1, spine3's drives the neck. In an importer the branch bones run from the
pelvis to a hip (from spine3 to a collar): they are the pelvis' (chest's) side bones.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["EULER_ORDER", "CHANNELS_ROOT", "CHANNELS_JOINT", "BvhMotion", "euler_to_matrix",
           "matrix_to_euler", "write_bvh_file", "t2m_hierarchy", "t2m_bvh_motion",
           "bone_rotations", "BRANCH_SUFFIX"]

#: the rotation channel order of the files written here (local rotation Rz @ Ry @ Rx).
EULER_ORDER = "ZYX"
CHANNELS_ROOT = ("Xposition", "Yposition", "Zposition", "Zrotation", "Yrotation", "Xrotation")
CHANNELS_JOINT = ("Zrotation", "Yrotation", "Xrotation")
#: the name suffix of the zero-offset branch joints (see the module docstring).
BRANCH_SUFFIX = "_branch"


# --------------------------------------------------------------------------------------------
# Euler angles (ZYX intrinsic: R = Rz(z) @ Ry(y) @ Rx(x)), degrees, last axis (z, y, x)
# --------------------------------------------------------------------------------------------
def euler_to_matrix(zyx_deg) -> np.ndarray:
    """Rotation matrices [..., 3, 3] from angles [..., 3] = (z, y, x) in degrees: Rz @ Ry @ Rx."""
    a = np.radians(np.asarray(zyx_deg, dtype=np.float64))
    cz, sz = np.cos(a[..., 0]), np.sin(a[..., 0])
    cy, sy = np.cos(a[..., 1]), np.sin(a[..., 1])
    cx, sx = np.cos(a[..., 2]), np.sin(a[..., 2])
    m = np.stack([
        cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx,
        sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx,
        -sy, cy * sx, cy * cx,
    ], axis=-1)
    return m.reshape(a.shape[:-1] + (3, 3))


def matrix_to_euler(m, unwrap_axis: Optional[int] = None) -> np.ndarray:
    """Angles [..., 3] = (z, y, x) in degrees with ``Rz @ Ry @ Rx == m`` for rotation matrices
    ``m`` [..., 3, 3]; y in [-90, 90]. At gimbal lock (|y| = 90) x is set to 0. With
    ``unwrap_axis`` (the time axis), z and x are unwrapped along it (adding multiples of 360
    degrees, which changes no rotation) so that curves have no jumps."""
    m = np.asarray(m, dtype=np.float64)
    cy = np.hypot(m[..., 0, 0], m[..., 1, 0])
    y = np.arctan2(-m[..., 2, 0], cy)
    lock = cy < 1e-9
    z = np.where(lock, np.arctan2(-m[..., 0, 1], m[..., 1, 1]), np.arctan2(m[..., 1, 0], m[..., 0, 0]))
    x = np.where(lock, 0.0, np.arctan2(m[..., 2, 1], m[..., 2, 2]))
    if unwrap_axis is not None and m.ndim > 2 and m.shape[unwrap_axis] > 1:
        z = np.unwrap(z, axis=unwrap_axis)
        x = np.unwrap(x, axis=unwrap_axis)
    return np.degrees(np.stack([z, y, x], axis=-1))


# --------------------------------------------------------------------------------------------
# A BVH motion
# --------------------------------------------------------------------------------------------
@dataclass
class BvhMotion:
    """A BVH hierarchy and its motion.

    ``parents[j]`` is the parent index (-1 for the root, joint 0); joints are in depth-first
    pre-order (the order of the file's declarations and of its channel values).
    ``offsets`` [J, 3]: each joint's offset in its parent's frame (file units; the root's is
    zero). ``end_sites``: leaf joint -> End Site offset. ``root_position`` [T, 3] (file units) and
    ``rotations`` [T, J, 3] (degrees, (z, y, x), local rotation ``Rz @ Ry @ Rx``).
    """
    names: Tuple[str, ...]
    parents: Tuple[int, ...]
    offsets: np.ndarray
    root_position: np.ndarray
    rotations: np.ndarray
    end_sites: Dict[int, np.ndarray] = field(default_factory=dict)
    frame_time: float = 0.05

    def __post_init__(self):
        self.names = tuple(str(n) for n in self.names)
        self.parents = tuple(int(p) for p in self.parents)
        self.offsets = np.asarray(self.offsets, dtype=np.float64)
        self.root_position = np.asarray(self.root_position, dtype=np.float64)
        self.rotations = np.asarray(self.rotations, dtype=np.float64)
        j = len(self.names)
        if j < 1 or len(self.parents) != j:
            raise ValueError(f"names and parents must have the same positive length, got "
                             f"{len(self.names)} and {len(self.parents)}")
        if self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise ValueError(f"parents must be -1 for joint 0 and precede each joint, got "
                             f"{self.parents}")
        if _preorder(self.parents) != list(range(j)):
            raise ValueError("joints must be in depth-first pre-order (each subtree contiguous)")
        if len(set(self.names)) != j or any(not n or any(c.isspace() for c in n) for n in self.names):
            raise ValueError(f"joint names must be unique and contain no white space: {self.names}")
        if self.offsets.shape != (j, 3):
            raise ValueError(f"offsets must have shape [{j}, 3], got {list(self.offsets.shape)}")
        t = self.root_position.shape[0] if self.root_position.ndim == 2 else -1
        if self.root_position.shape != (t, 3) or t < 1:
            raise ValueError(f"root_position must have shape [T >= 1, 3], got "
                             f"{list(self.root_position.shape)}")
        if self.rotations.shape != (t, j, 3):
            raise ValueError(f"rotations must have shape [{t}, {j}, 3], got "
                             f"{list(self.rotations.shape)}")
        for name, a in (("offsets", self.offsets), ("root_position", self.root_position),
                        ("rotations", self.rotations)):
            if not np.isfinite(a).all():
                raise ValueError(f"{name} contains NaN or infinite values")
        leaves = {i for i in range(j) if i not in self.parents}
        self.end_sites = {int(k): np.asarray(v, dtype=np.float64).reshape(3)
                          for k, v in self.end_sites.items()}
        if not set(self.end_sites) <= leaves:
            raise ValueError(f"end_sites given for non-leaf joints {sorted(set(self.end_sites) - leaves)}")
        if not (isinstance(self.frame_time, (int, float)) and self.frame_time > 0):
            raise ValueError(f"frame_time must be a positive number, got {self.frame_time!r}")

    @property
    def num_frames(self) -> int:
        return int(self.root_position.shape[0])

    def children(self, j: int) -> List[int]:
        return [i for i, p in enumerate(self.parents) if p == j]

    def world(self) -> Tuple[np.ndarray, np.ndarray]:
        """Forward kinematics: world positions [T, J, 3] (file units) and world rotation
        matrices [T, J, 3, 3] of every joint, by the conventions of the module docstring."""
        local = euler_to_matrix(self.rotations)
        t, j = self.rotations.shape[:2]
        pos = np.zeros((t, j, 3))
        rot = np.zeros((t, j, 3, 3))
        pos[:, 0] = self.root_position + self.offsets[0]
        rot[:, 0] = local[:, 0]
        for i in range(1, j):
            p = self.parents[i]
            pos[:, i] = pos[:, p] + np.einsum("tab,b->ta", rot[:, p], self.offsets[i])
            rot[:, i] = rot[:, p] @ local[:, i]
        return pos, rot


def _preorder(parents: Sequence[int]) -> List[int]:
    kids: Dict[int, List[int]] = {}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
    order, stack = [], [0]
    while stack:
        i = stack.pop()
        order.append(i)
        stack.extend(reversed(kids.get(i, [])))
    return order


def _fmt(v: float) -> str:
    s = f"{v:.6f}"
    return "0.000000" if s == "-0.000000" else s


def write_bvh_file(path, motion: BvhMotion) -> str:
    """Write ``motion`` to ``path`` (parent directories are created); returns the path.
    Values are written with 6 decimals (1e-6 file units, 1e-6 degrees)."""
    path = os.fspath(path)
    lines = ["HIERARCHY"]

    def joint(i: int, depth: int):
        ind = "  " * depth
        lines.append(f"{ind}{'ROOT' if i == 0 else 'JOINT'} {motion.names[i]}")
        lines.append(f"{ind}{{")
        lines.append(f"{ind}  OFFSET " + " ".join(_fmt(v) for v in motion.offsets[i]))
        ch = CHANNELS_ROOT if i == 0 else CHANNELS_JOINT
        lines.append(f"{ind}  CHANNELS {len(ch)} " + " ".join(ch))
        kids = motion.children(i)
        for c in kids:
            joint(c, depth + 1)
        if not kids:
            end = motion.end_sites.get(i, np.zeros(3))
            lines.append(f"{ind}  End Site")
            lines.append(f"{ind}  {{")
            lines.append(f"{ind}    OFFSET " + " ".join(_fmt(v) for v in end))
            lines.append(f"{ind}  }}")
        lines.append(f"{ind}}}")

    joint(0, 0)
    lines.append("MOTION")
    lines.append(f"Frames: {motion.num_frames}")
    lines.append(f"Frame Time: {motion.frame_time:.6f}")
    # per frame: root position, then every joint's (z, y, x) in declaration order
    frames = np.concatenate([motion.root_position, motion.rotations.reshape(motion.num_frames, -1)],
                            axis=1)
    for row in frames:
        lines.append(" ".join(_fmt(v) for v in row))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="ascii", newline="\n") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The T2M skeleton as BVH
# --------------------------------------------------------------------------------------------
def t2m_hierarchy() -> List[dict]:
    """The BVH joints of the T2M skeleton in declaration (depth-first) order, each a dict:
    ``name``, ``parent`` (BVH index, -1 for the root), ``t2m`` (T2M joint index, None for a
    branch joint), ``offset_of`` (the T2M joint whose bone ``RAW_OFFSETS * length`` is this
    joint's offset; None: zero offset), ``bone`` (the T2M joint whose bone rotation is this
    joint's world rotation: the bone from this joint to its only child, the child on the
    spine for pelvis and spine3, the joint's own bone for a leaf). 26 joints: the 22 T2M joints
    and 4 branch joints."""
    from .data.skeleton import JOINT_NAMES, KINEMATIC_CHAIN, NUM_JOINTS, PARENTS
    spine = KINEMATIC_CHAIN[2]
    kids = {p: [c for c in range(NUM_JOINTS) if PARENTS[c] == p] for p in range(NUM_JOINTS)}
    out: List[dict] = []

    def add(j: int, parent: int):
        ch = kids[j]
        if not ch:
            bone = j
        elif len(ch) == 1:
            bone = ch[0]
        else:
            bone = next(c for c in ch if c in spine)
        me = len(out)
        out.append(dict(name=JOINT_NAMES[j], parent=parent, t2m=j, offset_of=j if j else None,
                        bone=bone))
        for c in ch:
            if len(ch) > 1 and c != bone:
                b = len(out)
                out.append(dict(name=JOINT_NAMES[c] + BRANCH_SUFFIX, parent=me, t2m=None,
                                offset_of=None, bone=c))
                add(c, b)
            else:
                add(c, me)

    add(0, -1)
    return out


def bone_rotations(quats: np.ndarray) -> np.ndarray:
    """World rotation matrices [..., 22, 3, 3] of the T2M bones from HumanML3D IK rotations
    [..., 22, 4] (``skeleton.inverse_kinematics``): entry j (j > 0) rotates bone parent(j) -> j
    from its rest direction, the product of the rotations along its chain from the root as
    ``skeleton.forward_kinematics`` composes them; entry 0 is the root rotation."""
    import torch
    from .data.skeleton import KINEMATIC_CHAIN, NUM_JOINTS, qmul, qnormalize, quat_to_matrix
    q = torch.as_tensor(np.asarray(quats, dtype=np.float64))
    glob = [None] * NUM_JOINTS
    glob[0] = q[..., 0, :]
    for chain in KINEMATIC_CHAIN:
        r = q[..., 0, :]
        for j in chain[1:]:
            r = qmul(r, q[..., j, :])
            glob[j] = r
    g = qnormalize(torch.stack(glob, dim=-2))
    return quat_to_matrix(g).numpy()


def t2m_bvh_motion(quats, root_position, bone_lengths, *, scale: float = 100.0,
                   frame_time: float = 0.05, end_site_fraction: float = 0.5) -> BvhMotion:
    """The BVH form of a T2M motion on a fixed skeleton: HumanML3D IK rotations ``quats``
    [T, 22, 4], root positions [T, 3] (metres) and ``bone_lengths`` [22] (metres; entry 0
    unused). Offsets are ``RAW_OFFSETS * bone_lengths * scale`` (``scale`` = file units per
    metre, 100: centimetres). Its joints (:meth:`BvhMotion.world`, divided by ``scale``) are
    ``skeleton.forward_kinematics(quats, root_position, skeleton_offsets(bone_lengths))``.
    Each leaf's End Site continues its bone by ``end_site_fraction`` of the bone's length."""
    from .data.skeleton import RAW_OFFSETS
    quats = np.asarray(quats, dtype=np.float64)
    root_position = np.asarray(root_position, dtype=np.float64)
    lengths = np.asarray(bone_lengths, dtype=np.float64).reshape(-1)
    if quats.ndim != 3 or quats.shape[1:] != (22, 4) or quats.shape[0] < 1:
        raise ValueError(f"quats must have shape [T >= 1, 22, 4], got {list(quats.shape)}")
    if root_position.shape != (quats.shape[0], 3):
        raise ValueError(f"root_position must have shape [{quats.shape[0]}, 3], got "
                         f"{list(root_position.shape)}")
    if lengths.shape != (22,):
        raise ValueError(f"bone_lengths must have 22 entries, got shape {list(lengths.shape)}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    raw = np.asarray(RAW_OFFSETS, dtype=np.float64)
    hier = t2m_hierarchy()
    world = bone_rotations(quats)                                     # [T, 22, 3, 3]
    w = np.stack([world[:, h["bone"]] for h in hier], axis=1)         # [T, J, 3, 3]
    local = w.copy()
    for i, h in enumerate(hier):
        if h["parent"] >= 0:
            local[:, i] = np.swapaxes(w[:, h["parent"]], -1, -2) @ w[:, i]
    offsets = np.stack([raw[h["offset_of"]] * lengths[h["offset_of"]] * scale
                        if h["offset_of"] is not None else np.zeros(3) for h in hier])
    parents = [h["parent"] for h in hier]
    ends = {i: raw[h["t2m"]] * lengths[h["t2m"]] * scale * end_site_fraction
            for i, h in enumerate(hier) if i not in parents}
    return BvhMotion(names=tuple(h["name"] for h in hier), parents=tuple(parents),
                     offsets=offsets, root_position=root_position * scale,
                     rotations=matrix_to_euler(local, unwrap_axis=0), end_sites=ends,
                     frame_time=frame_time)
