"""Export motions as MDM ``results.npy``, BVH files or GIFs: ``python -m sopo_ext.export``.

    python -m sopo_ext.export --ckpt mdm --text "a person waves with the left hand" --format bvh --out wave.bvh
    python -m sopo_ext.export --ckpt runs/sopo/model --text "a person jumps" --text "a person sits down" \\
        --length 4 --format npy --out samples/results.npy
    python -m sopo_ext.export --features new_joint_vecs/012314.npy --format bvh --out clip.bvh
    python -m sopo_ext.export --features gen.npy --stats-from mdm --format gif --out gen.gif

Motions come from a backbone checkpoint (``--ckpt``: a bundled name, ``mdm`` or ``mld``, or a
checkpoint directory such as the ``model/`` of ``python -m sopo_ext.train``) and captions
(``--text``, repeatable; ``--length`` in seconds, 20 fps), or from a HumanML3D 263-d features file
(``--features``: [T, 263] or [N, T, 263]; raw, or normalized with ``--mean``/``--std`` or
``--stats-from CKPT``; trailing all-zero rows are padding and are dropped). Joints are recovered
from features by the standard recovery (``skeleton.joints_from_features``, MDM's
``recover_from_ric``).

What is exported. Joints recovered from generated features have bone lengths that vary from frame
to frame, so no fixed skeleton reproduces them. The export fits one: the project's inverse
kinematics (``skeleton.inverse_kinematics``) gives every bone's rotation from its rest direction,
and forward kinematics (``skeleton.forward_kinematics``) applies the rotations to the fixed T2M
offsets (``RAW_OFFSETS`` times the motion's median bone lengths, or the dataset's
``BONE_LENGTHS`` with ``--bone-lengths standard``), from the motion's root trajectory. These
*skeleton joints* keep every bone's direction and the root path exactly; only bone lengths change,
so joints move by the accumulated length changes along their chain: nothing for dataset clips
(whose bones have fixed lengths), for the bundled MDM's samples about 1-3 mm on average and
1-9 cm at worst, more for the weaker bundled MLD (up to 1 cm on average, 17 cm at worst); the
command prints the figures of each motion and docs/export.md has measurements. The
BVH holds exactly the skeleton joints; the npy and GIF hold them too by default, or the raw
recovered joints with ``--joints raw`` (what MDM's own ``results.npy`` holds).

Formats:

* ``npy``: MDM's ``results.npy`` layout, ``{"motion": float32 [N, 22, 3, T_max] (metres, y up),
  "text": [N str], "lengths": int64 [N], "num_samples": N, "num_repetitions": 1}``; frames past a
  motion's length are zero.
* ``bvh``: one file per motion. ``--out X.bvh`` writes X.bvh for one motion and X_00.bvh,
  X_01.bvh, ... for several; any other ``--out`` is a directory (created) that receives
  motion_00.bvh, motion_01.bvh, .... Units: centimetres (``--scale 100``, file units per metre;
  ``--scale 1`` for metres), y up, 20 fps (Frame Time 0.05). Rotation channels
  ``Zrotation Yrotation Xrotation`` (local rotation Rz @ Ry @ Rx, degrees); the root also has
  ``Xposition Yposition Zposition``. 22 T2M joints with SMPL names plus four zero-offset branch
  joints (see ``sopo_ext.bvh``); End Sites on the five leaves.
* ``gif``: an animation (``sopo_ext.viz``); several motions side by side.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from . import bvh as _bvh
from ._cli import resolve_device, run_cli

__all__ = ["FPS", "DEFAULT_SCALE", "SkeletonMotion", "load_features", "sample_features",
           "recover_joints", "joints_for_export", "export_npy", "export_bvh", "write_bvh",
           "export_gif", "bvh_paths", "main", "parse_args", "run"]

FPS = 20
#: BVH file units per metre (centimetres).
DEFAULT_SCALE = 100.0
FEATURE_DIM = 263
NUM_JOINTS = 22
JOINTS_CHOICES = ("skeleton", "raw")
BONE_LENGTH_CHOICES = ("median", "standard")


# --------------------------------------------------------------------------------------------
# Motions on a fixed skeleton
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SkeletonMotion:
    """One motion fitted to a fixed-offset T2M skeleton (see the module docstring).

    ``raw`` [T, 22, 3]: the joints it was fitted to (metres). ``quats`` [T, 22, 4]: the IK
    rotations (``skeleton.inverse_kinematics`` convention: root rotation, then each bone's local
    rotation). ``bone_lengths`` [22] (metres, entry 0 is 0). ``joints`` [T, 22, 3]: the skeleton
    joints, ``forward_kinematics(quats, raw[:, 0], skeleton_offsets(bone_lengths))``, which is
    what the BVH holds.
    """
    raw: np.ndarray
    joints: np.ndarray
    quats: np.ndarray
    bone_lengths: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.joints.shape[0])

    def error_mm(self) -> dict:
        """How far the skeleton joints are from the raw ones: mean and max over frames and
        joints of the distance, in millimetres."""
        d = np.linalg.norm(self.joints - self.raw, axis=-1) * 1000.0
        return {"mean": float(d.mean()), "max": float(d.max())}

    def bvh(self, scale: float = DEFAULT_SCALE) -> _bvh.BvhMotion:
        """The BVH form (``sopo_ext.bvh.t2m_bvh_motion``), ``scale`` file units per metre."""
        return _bvh.t2m_bvh_motion(self.quats, self.raw[:, 0], self.bone_lengths, scale=scale,
                                   frame_time=1.0 / FPS)


def _real_array(x, name: str) -> np.ndarray:
    """``x`` (numpy, torch or nested lists) as float64; ValueError unless it is real numbers."""
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating)
                                 or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a.astype(np.float64)


def _check_joints(j, name: str) -> np.ndarray:
    a = _real_array(j, name)
    if a.ndim != 3 or a.shape[1:] != (NUM_JOINTS, 3) or a.shape[0] < 1:
        raise ValueError(f"{name} must have shape [T >= 1, 22, 3], got {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _bone_lengths(raw: np.ndarray, spec) -> np.ndarray:
    from .data.skeleton import BONE_LENGTHS, PARENTS
    if isinstance(spec, str):
        if spec == "median":
            par = [0] + list(PARENTS[1:])
            lengths = np.median(np.linalg.norm(raw - raw[:, par], axis=-1), axis=0)
            lengths[0] = 0.0
            return lengths
        if spec == "standard":
            return np.asarray(BONE_LENGTHS, dtype=np.float64)
        raise ValueError(f"bone_lengths must be one of {', '.join(BONE_LENGTH_CHOICES)} or an "
                         f"array of 22 lengths, got {spec!r}")
    a = np.asarray(spec, dtype=np.float64).reshape(-1)
    if a.shape != (NUM_JOINTS,) or not np.isfinite(a).all() or (a[1:] <= 0).any():
        raise ValueError(f"bone_lengths must be 22 finite lengths, positive after entry 0, got "
                         f"{np.asarray(spec).tolist()!r}")
    return a


def joints_for_export(raw_joints, bone_lengths: Union[str, Sequence[float]] = "median",
                      name: str = "motion") -> SkeletonMotion:
    """Fit a fixed-offset T2M skeleton to joints ``raw_joints`` [T, 22, 3] (metres): IK
    rotations of the raw joints (``skeleton.inverse_kinematics``, unsmoothed), FK on offsets
    ``RAW_OFFSETS * bone_lengths`` from the raw root trajectory. ``bone_lengths``: ``"median"``
    (per bone, the median over frames of this motion; the default), ``"standard"``
    (``skeleton.BONE_LENGTHS``, the dataset's skeleton) or 22 lengths (entry 0 unused).
    Every bone of the result has the raw bone's direction and the fixed length."""
    import torch
    from .data import skeleton as S
    raw = _check_joints(raw_joints, name)
    lengths = _bone_lengths(raw, bone_lengths)
    jt = torch.from_numpy(raw)
    quats = S.inverse_kinematics(jt)
    offsets = S.skeleton_offsets(torch.from_numpy(lengths), dtype=torch.float64)
    joints = S.forward_kinematics(quats, jt[:, 0], offsets).numpy()
    quats = quats.numpy()
    bad = ~(np.isfinite(joints).all(axis=(1, 2)) & np.isfinite(quats).all(axis=(1, 2)))
    if bad.any():
        raise ValueError(f"{name}: inverse kinematics is undefined at frame {int(np.argmax(bad))} "
                         f"(a bone of zero length, or one pointing exactly against its rest "
                         f"direction)")
    return SkeletonMotion(raw=raw, joints=joints, quats=quats, bone_lengths=lengths)


def _as_skeleton(motion, bone_lengths, name: str) -> SkeletonMotion:
    if isinstance(motion, SkeletonMotion):
        return motion
    return joints_for_export(motion, bone_lengths, name)


def _pick_joints(sm: SkeletonMotion, joints: str) -> np.ndarray:
    if joints not in JOINTS_CHOICES:
        raise ValueError(f"joints must be one of {', '.join(JOINTS_CHOICES)}, got {joints!r}")
    return sm.joints if joints == "skeleton" else sm.raw


# --------------------------------------------------------------------------------------------
# Features in
# --------------------------------------------------------------------------------------------
def _stat(v, name: str) -> np.ndarray:
    if isinstance(v, (str, os.PathLike)):
        v = _load_npy(v, name)
    try:
        import torch
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(v, dtype=np.float64)
    if a.size != FEATURE_DIM:
        raise ValueError(f"{name} must have {FEATURE_DIM} values, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a.reshape(FEATURE_DIM)


def _load_npy(path, name: str) -> np.ndarray:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such file {path!r}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{name}: {path!r} is not a plain numeric .npy array ({e})") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot read {path!r} as .npy ({e})") from None


def load_features(features, mean=None, std=None, name: str = "features") -> List[np.ndarray]:
    """Raw 263-d features, one float64 array [L_i, 263] per motion, from ``features``: an array
    (numpy or torch) or a .npy path, [T, 263] (one motion) or [N, T, 263]. Trailing rows that are
    exactly zero are padding (as sampling writes it) and are dropped. ``mean`` / ``std`` (arrays
    or .npy paths of 263 values, together) undo a normalization: ``f * std + mean``.
    Raises ``ValueError`` (``FileNotFoundError`` for a missing file) naming the problem."""
    if isinstance(features, (str, os.PathLike)):
        features = _load_npy(features, name)
    a = _real_array(features, name)
    if a.ndim == 2 and a.shape[1] == FEATURE_DIM:
        a = a[None]
    if a.ndim != 3 or a.shape[2] != FEATURE_DIM:
        raise ValueError(f"{name} must have shape [T, {FEATURE_DIM}] or [N, T, {FEATURE_DIM}] "
                         f"(HumanML3D features), got {list(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} has no motions or no frames: shape {list(a.shape)}")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        where = f"motion {bad[0]}, frame {bad[1]}" if a.shape[0] > 1 else f"frame {bad[1]}"
        raise ValueError(f"{name} contains NaN or infinite values (first at {where}, "
                         f"feature {bad[2]})")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together")
    m = s = None
    if mean is not None:
        m, s = _stat(mean, "mean"), _stat(std, "std")
    out = []
    for i, f in enumerate(a):
        nonzero = np.flatnonzero(np.any(f != 0, axis=1))
        if nonzero.size == 0:
            raise ValueError(f"{name}: motion {i} has only all-zero frames (padding)")
        f = f[:nonzero[-1] + 1]
        out.append(f * s + m if m is not None else f)
    return out


def _looks_normalized(features: Sequence[np.ndarray]) -> bool:
    """Raw features have the root height (feature 3) >= 0 (the floor is the lowest joint);
    normalized ones are centred on 0."""
    return any(f[:, 3].min() < -0.05 for f in features)


def _max_frames(ck) -> Optional[int]:
    cfg = ck.config
    for c in (cfg, getattr(cfg, "vae", None)):
        if c is not None and getattr(c, "max_frames", None):
            return int(c.max_frames)
    return None


def sample_features(ckpt, texts: Sequence[str], frames: Union[int, Sequence[int]], *,
                    seed: int = 0, guidance_scale: float = 2.5, steps: int = 50,
                    device="cpu", text_encoder=None) -> List[np.ndarray]:
    """Generate one motion per caption with a backbone checkpoint (``ckpt``: a bundled name such
    as ``"mdm"`` / ``"mld"``, a checkpoint directory, or a loaded ``Checkpoint``): DDIM with
    ``steps`` steps and classifier-free guidance, all captions in one batch from
    ``torch.Generator(device).manual_seed(seed)``. ``frames``: one length (frames at 20 fps) for
    all or one per caption, 1 ... the model's ``max_frames``. ``device``: a torch device or
    ``"auto"``; ``text_encoder``: default the one named in the checkpoint's meta (MiniLM).
    Returns raw (denormalized) features [frames_i, 263], float64, one per caption."""
    import torch
    from . import checkpoint as ckpt_io
    from .models.layers import lengths_to_mask
    from .sampling import diffusion_from_meta, generate
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(f"texts must be a non-empty list of captions, got {texts!r}")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"texts[{i}] must be a non-empty str, got {t!r}")
    ck = ckpt if isinstance(ckpt, ckpt_io.Checkpoint) else ckpt_io.load_checkpoint(ckpt)
    if ck.kind not in ("mdm", "mld"):
        raise ValueError(f"{ck.path}: needs an 'mdm' or 'mld' backbone, got a {ck.kind!r} "
                         f"checkpoint")
    if ck.mean is None or ck.std is None:
        raise ValueError(f"checkpoint {ck.path} stores no feature normalization (Mean/Std), so "
                         f"its samples cannot be turned into motions")
    if isinstance(frames, (int, np.integer)) and not isinstance(frames, bool):
        frames = [int(frames)] * len(texts)
    frames = [f for f in frames]
    if len(frames) != len(texts):
        raise ValueError(f"frames must be one length or one per caption ({len(texts)}), "
                         f"got {len(frames)}")
    top = _max_frames(ck)
    for f in frames:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1 or \
                (top is not None and f > top):
            raise ValueError(f"a motion length must be 1 ... {top} frames (the model's maximum, "
                             f"{top / FPS:g} s at {FPS} fps), got {f!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    dev = resolve_device(device) if device == "auto" else torch.device(device)
    if text_encoder is None:
        from .models.text import get_text_encoder
        text_encoder = get_text_encoder(ck.meta.get("text_encoder") or "minilm")
    emb = text_encoder.encode(list(texts)).to(dev)
    lengths = torch.tensor(frames, dtype=torch.long)
    mask = lengths_to_mask(lengths).to(dev)
    model = ck.model.to(dev).eval()
    g = torch.Generator(device=dev).manual_seed(int(seed))
    x = generate(model, diffusion_from_meta(ck.meta), emb, mask, steps=steps,
                 guidance_scale=float(guidance_scale), generator=g)
    x = x.detach().double().cpu().numpy()
    m, s = ck.mean.double().numpy(), ck.std.double().numpy()
    out = [x[i, :f] * s + m for i, f in enumerate(frames)]
    for i, f in enumerate(out):
        if not np.isfinite(f).all():
            raise FloatingPointError(f"the model generated non-finite values for {texts[i]!r}")
    return out


def recover_joints(features, name: str = "features") -> np.ndarray:
    """Joint positions [T, 22, 3] (float64, metres) from raw features [T, 263] by the standard
    recovery (``skeleton.joints_from_features``)."""
    import torch
    from .data.skeleton import joints_from_features
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != FEATURE_DIM or f.shape[0] < 1:
        raise ValueError(f"{name} must have shape [T >= 1, {FEATURE_DIM}], got {list(f.shape)}")
    j = joints_from_features(torch.from_numpy(np.ascontiguousarray(f))).numpy()
    if not np.isfinite(j).all():
        raise ValueError(f"{name}: the features give non-finite joint positions")
    return j


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
def _prepare(motions, texts, bone_lengths, what: str):
    if isinstance(motions, (np.ndarray, SkeletonMotion)) or not isinstance(motions, (list, tuple)):
        raise ValueError(f"motions must be a list of motions ([T, 22, 3] joints or "
                         f"SkeletonMotion), got {type(motions).__name__}")
    if not motions:
        raise ValueError("motions must contain at least one motion")
    sms = [_as_skeleton(m, bone_lengths, f"motions[{i}]") for i, m in enumerate(motions)]
    if texts is None:
        texts = [""] * len(sms)
    if isinstance(texts, str) or len(texts) != len(sms) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a list of {len(sms)} str (one per motion) for {what}, "
                         f"got {texts!r}")
    return sms, list(texts)


def _check_suffix(path, suffix: str, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{what} path must be a non-empty str or path, got {path!r}")
    path = os.fspath(path)
    if not path.lower().endswith(suffix):
        raise ValueError(f"{what} path must end in {suffix}, got {path!r}")
    return path


def export_npy(path, motions, texts: Optional[Sequence[str]] = None, *, joints: str = "skeleton",
               bone_lengths="median") -> dict:
    """Write motions (``[T, 22, 3]`` joint arrays, metres, or :class:`SkeletonMotion`) to
    ``path`` (``.npy``) in MDM's ``results.npy`` layout::

        {"motion": float32 [N, 22, 3, T_max], "text": [N str], "lengths": int64 [N],
         "num_samples": N, "num_repetitions": 1}

    read with ``np.load(path, allow_pickle=True).item()``. Frames at or past ``lengths[i]`` are
    zero. ``joints="skeleton"`` (default) stores the skeleton joints (what the BVH holds),
    ``"raw"`` the given joints. Returns the dict written."""
    path = _check_suffix(path, ".npy", "npy")
    sms, texts = _prepare(motions, texts, bone_lengths, "npy")
    arrays = [_pick_joints(sm, joints) for sm in sms]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    motion = np.zeros((len(arrays), NUM_JOINTS, 3, int(lengths.max())), dtype=np.float32)
    for i, a in enumerate(arrays):
        motion[i, :, :, :len(a)] = a.transpose(1, 2, 0)
    doc = {"motion": motion, "text": texts, "lengths": lengths, "num_samples": len(arrays),
           "num_repetitions": 1}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, doc, allow_pickle=True)
    return doc


def bvh_paths(out, n: int) -> List[str]:
    """Where :func:`export_bvh` writes ``n`` motions: ``X.bvh`` -> ``[X.bvh]`` for one motion,
    ``[X_00.bvh, X_01.bvh, ...]`` for several; any other ``out`` is a directory:
    ``[out/motion_00.bvh, ...]``."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"bvh output must be a non-empty str or path, got {out!r}")
    out = os.fspath(out)
    width = max(2, len(str(n - 1)))
    if out.lower().endswith(".bvh"):
        if n == 1:
            return [out]
        stem = out[:-4]
        return [f"{stem}_{i:0{width}d}.bvh" for i in range(n)]
    return [os.path.join(out, f"motion_{i:0{width}d}.bvh") for i in range(n)]


def write_bvh(path, motion, *, bone_lengths="median", scale: float = DEFAULT_SCALE) -> SkeletonMotion:
    """Write one motion (joints [T, 22, 3] in metres, or a :class:`SkeletonMotion`) to the BVH
    file ``path``; ``scale`` file units per metre (100: centimetres). Returns the
    :class:`SkeletonMotion` written: ``.joints * scale`` are the file's T2M joint positions."""
    path = _check_suffix(path, ".bvh", "bvh")
    sm = _as_skeleton(motion, bone_lengths, "motion")
    _bvh.write_bvh_file(path, sm.bvh(scale))
    return sm


def export_bvh(out, motions, *, bone_lengths="median", scale: float = DEFAULT_SCALE) -> List[str]:
    """Write one BVH file per motion at :func:`bvh_paths` ``(out, len(motions))``; returns the
    paths. See :func:`write_bvh` and ``sopo_ext.bvh`` for the file's conventions."""
    sms, _ = _prepare(motions, None, bone_lengths, "bvh")
    paths = bvh_paths(out, len(sms))
    for p, sm in zip(paths, sms):
        write_bvh(p, sm, scale=scale)
    return paths


def export_gif(path, motions, texts: Optional[Sequence[str]] = None, *, joints: str = "skeleton",
               bone_lengths="median", stride: int = 1) -> str:
    """An animated GIF (``sopo_ext.viz``): one motion with its text as the title, or several
    side by side labelled with their texts. ``joints`` as in :func:`export_npy`."""
    from . import viz
    path = _check_suffix(path, ".gif", "gif")
    sms, texts = _prepare(motions, texts, bone_lengths, "gif")
    arrays = [_pick_joints(sm, joints) for sm in sms]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if len(arrays) == 1:
        return viz.save_gif(arrays[0], path, texts[0] or None, FPS, stride=stride)
    labels = [t or f"motion {i}" for i, t in enumerate(texts)]
    return viz.save_comparison(arrays, labels, path, None, gif=True, fps=FPS, stride=stride)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _frames_from_seconds(seconds: Sequence[float], n: int) -> List[int]:
    if len(seconds) not in (1, n):
        raise ValueError(f"--length must be given once or once per --text ({n}), got "
                         f"{len(seconds)} values")
    out = []
    for s in seconds:
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"--length must be a positive number of seconds, got {s!r}")
        out.append(max(1, int(round(s * FPS))))
    return out * n if len(out) == 1 else out


def run(args) -> List[SkeletonMotion]:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt is not None:
        from . import checkpoint as ckpt_io
        ck = ckpt_io.load_checkpoint(args.ckpt)
        if ck.kind not in ("mdm", "mld"):
            raise ValueError(f"--ckpt {args.ckpt}: needs an 'mdm' or 'mld' backbone, got a "
                             f"{ck.kind!r} checkpoint")
        frames = _frames_from_seconds(args.length or [6.0], len(args.text))
        top = _max_frames(ck)
        for s, f in zip(args.length or [6.0] * len(frames), frames):
            if top is not None and f > top:
                raise ValueError(f"--length {s:g} s is {f} frames, more than the model's maximum "
                                 f"of {top} frames ({top / FPS:g} s)")
        feats = sample_features(ck, args.text, frames, seed=args.seed,
                                guidance_scale=args.guidance_scale, steps=args.steps,
                                device=resolve_device(args.device))
        texts = list(args.text)
    else:
        mean = std = None
        if args.stats_from is not None:
            from . import checkpoint as ckpt_io
            ck = ckpt_io.load_checkpoint(args.stats_from)
            if ck.mean is None or ck.std is None:
                raise ValueError(f"--stats-from {args.stats_from}: the checkpoint stores no "
                                 f"feature normalization (Mean/Std)")
            mean, std = ck.mean, ck.std
        elif args.mean is not None:
            mean, std = _stat(args.mean, "--mean"), _stat(args.std, "--std")
        feats = load_features(args.features, mean, std, name=f"--features {args.features}")
        if mean is None and _looks_normalized(feats):
            print("warning: the features look normalized (negative root heights); pass "
                  "--mean/--std or --stats-from if they are", file=sys.stderr)
        stem = Path(args.features).stem
        texts = [stem] if len(feats) == 1 else [f"{stem}[{i}]" for i in range(len(feats))]
    sms = []
    for i, (f, t) in enumerate(zip(feats, texts)):
        raw = recover_joints(f, name=f"motion {i}")
        sms.append(joints_for_export(raw, args.bone_lengths, name=f"motion {i} ({t!r})"))
    if args.format == "npy":
        export_npy(args.out, sms, texts, joints=args.joints)
        written = [args.out]
    elif args.format == "bvh":
        written = export_bvh(args.out, sms, scale=args.scale)
    else:
        written = [export_gif(args.out, sms, texts, joints=args.joints)]
    for i, (sm, t) in enumerate(zip(sms, texts)):
        e = sm.error_mm()
        print(f"[export] motion {i} {t!r}: {sm.num_frames} frames ({sm.num_frames / FPS:g} s); "
              f"skeleton joints vs recovered joints: mean {e['mean']:.2f} mm, max {e['max']:.2f} mm")
    for p in written:
        print(p)
    return sms


def default_out(name: str, fmt: str, folder: str = "exports") -> str:
    """``exports/<name as a file name>.<fmt>``, numbered (``_1``, ``_2``, ...) rather than
    replacing an earlier export."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()[:60] or "motion"
    for i in range(10000):
        path = Path(folder) / f"{stem}{'' if i == 0 else f'_{i}'}.{fmt}"
        # a BVH export of several motions writes <stem>_00.bvh, ...: check those names too
        if not path.exists() and not list(path.parent.glob(f"{path.stem}_[0-9][0-9].{fmt}")):
            return str(path)
    raise ValueError(f"no free file name for {stem!r} in {folder}/: pass --out")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m sopo_ext.export",
                                 description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", default=None,
                     help="backbone checkpoint: bundled name (mdm, mld) or directory (e.g. RUN/model)")
    src.add_argument("--features", default=None, metavar="FILE.npy",
                     help="HumanML3D features [T,263] or [N,T,263] instead of sampling")
    a("--text", action="append", default=None,
      help="caption to generate (repeatable; with --ckpt)")
    a("--format", choices=("npy", "bvh", "gif"), default="npy", help="output format (default npy)")
    a("--out", default=None,
      help="output: X.npy / X.gif; X.bvh (X_00.bvh, ... for several motions) or a directory "
           "(default exports/<first caption or features file>.<format>, never an existing file)")
    a("--length", type=float, action="append", default=None, metavar="SECONDS",
      help="motion length in seconds at 20 fps (once, or once per --text; default 6)")
    a("--seed", type=int, default=0)
    a("--guidance-scale", type=float, default=2.5, help="classifier-free guidance (default 2.5)")
    a("--steps", type=int, default=50, help="DDIM steps (default 50)")
    a("--device", default="auto")
    a("--threads", type=int, default=None)
    a("--mean", default=None, help="Mean.npy: --features are normalized (with --std)")
    a("--std", default=None, help="Std.npy: --features are normalized (with --mean)")
    a("--stats-from", default=None, metavar="CKPT",
      help="--features are normalized with this checkpoint's stored Mean/Std (e.g. mdm)")
    a("--joints", choices=JOINTS_CHOICES, default="skeleton",
      help="npy/gif: the fixed-skeleton joints the BVH holds (default) or the raw recovered ones")
    a("--bone-lengths", choices=BONE_LENGTH_CHOICES, default="median",
      help="skeleton bone lengths: the motion's median (default) or the dataset's BONE_LENGTHS")
    a("--scale", type=float, default=DEFAULT_SCALE,
      help="BVH units per metre (default 100: centimetres; 1: metres)")
    args = ap.parse_args(argv)
    if args.features is not None:
        for flag, v in (("--text", args.text), ("--length", args.length)):
            if v:
                ap.error(f"{flag} cannot be used with --features (the motions come from the file)")
    else:
        if not args.text:
            ap.error("--ckpt needs at least one --text caption")
        if any(not t.strip() for t in args.text):
            ap.error("--text must not be empty")
        for flag in ("mean", "std", "stats_from"):
            if getattr(args, flag) is not None:
                ap.error(f"--{flag.replace('_', '-')} is for --features; with --ckpt the "
                         f"checkpoint's stored normalization is used")
    if (args.mean is None) != (args.std is None):
        ap.error("--mean and --std must be given together")
    if args.stats_from is not None and args.mean is not None:
        ap.error("give either --mean/--std or --stats-from, not both")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.scale) or args.scale <= 0:
        ap.error(f"--scale must be a positive number, got {args.scale:g}")
    if not math.isfinite(args.guidance_scale):
        ap.error("--guidance-scale must be finite")
    if args.out is None:
        args.out = default_out(args.text[0] if args.text else Path(args.features).stem, args.format)
    suffix = {"npy": ".npy", "gif": ".gif"}.get(args.format)
    if suffix and not args.out.lower().endswith(suffix):
        ap.error(f"--format {args.format} needs --out ending in {suffix}, got {args.out!r}")
    if args.format == "bvh" and args.out.lower().endswith((".npy", ".gif")):
        ap.error(f"--format bvh needs --out ending in .bvh or a directory, got {args.out!r}")
    args.argv = argv
    return args


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
