"""Geometric checks of a motion against the built-in dataset's ground truth.

The built-in dataset (``sopo_ext.data.synthetic``) records in ``specs.json`` what every motion
does: the family and its parameters (which hand waves, which way the person turns, how many
jumps...). Its captions state those details, so for a caption of the test split we know the
right answer without asking a learned model. This module reads the answer off a motion's
features with a few robust signals, so "the base model was wrong about the hand" can be decided
by geometry instead of by the evaluator network (which the metrics already use):

* ``side``     left/right: which hand waves (higher wrist), which leg kicks (higher ankle), which
  way a side step goes (lateral root travel), which way a turn goes (summed root yaw rate);
* ``heading``  forward/backward for walking (root travel along the heading);
* ``count``    repetitions of jumps (feet leave the floor), squats (pelvis dips), kicks (ankle
  peaks), arm raises (wrist peaks) and waves (forearm swings while the hand is up).

Every check is exact on the dataset's own motions (``tests/test_judge.py`` checks all of them,
and that mirroring a motion flips its ``side``). Compositions and the speed words are not judged.
Features are un-normalized HumanML3D rows ``[T, 263]`` (valid frames only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from . import skeleton as sk

__all__ = ["DETAILS", "load_specs", "expected_details", "measure_details", "judge"]

#: family -> the details judged for it
DETAILS: Dict[str, tuple] = {
    "turn_left": ("side",), "turn_right": ("side",),
    "side_step": ("side",),
    "walk_forward": ("heading",), "walk_backward": ("heading",),
    "wave": ("side", "count"),
    "kick": ("side", "count"),
    "jump": ("count",), "squat": ("count",), "raise_arms": ("count",),
}

# joint ids of the 22-joint skeleton; RIC rows hold joints 1..21, hence the -1 below
_L_ELBOW, _R_ELBOW, _L_WRIST, _R_WRIST, _L_ANKLE, _R_ANKLE = 18, 19, 20, 21, 7, 8
# below these a motion does not turn / travel / lift one limb more than the other at all;
# the dataset's smallest values are at least 2.5x larger (0.26 yaw, 0.29 m side step, 0.64 m
# walking, checked in tests/test_judge.py)
_MIN_YAW = 0.1         # summed root rotation velocity (HumanML3D units)
_MIN_TRAVEL = 0.1      # metres of summed root velocity
_MIN_LIMB_GAP = 0.10   # metres between the left and right limb's highest point
_PROMINENCE = 0.4      # a repetition is a peak rising this fraction of the signal's range ...
# ... and at least this much (metres): 1/5 of the smallest range among the dataset's motions of
# the family (raise_arms 1.04, wave 0.34, squat 0.45, kick 0.54, jump 0.19), so jitter in a
# motion that barely moves is not counted as repetitions
_MIN_PEAK = {"raise_arms": 0.2, "wave": 0.065, "squat": 0.09, "kick": 0.1, "jump": 0.035}


def load_specs(root) -> dict:
    """The ground truth of a built-in dataset directory: ``{motion id: spec}`` from its
    ``specs.json``. FileNotFoundError for other datasets, which have none."""
    path = Path(root) / "specs.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: details are judged against the built-in dataset's ground truth "
            f"(specs.json), which other datasets do not have")
    return json.loads(path.read_text())


def expected_details(spec: dict) -> Dict[str, object]:
    """What the caption of ``spec`` says: ``{"side": "left"}``, ``{"count": 3}``, ... ({} for
    compositions and families without a judged detail)."""
    fam, p = spec.get("family"), spec.get("params", {})
    out: Dict[str, object] = {}
    for d in DETAILS.get(fam, ()):
        if d == "side":
            out[d] = {"turn_left": "left", "turn_right": "right"}.get(fam) or p.get("hand") or \
                p.get("leg") or p.get("direction")
        elif d == "heading":
            out[d] = "forward" if fam == "walk_forward" else "backward"
        elif d == "count":
            out[d] = int(p["count"])
    return out


def _count_peaks(sig: np.ndarray, family: str) -> int:
    from scipy.signal import find_peaks
    sig = np.asarray(sig, dtype=np.float64)
    if sig.size < 3:
        return 0
    rng = float(sig.max() - sig.min())
    floor = _MIN_PEAK[family]
    if rng < floor:
        return 0
    pad = np.concatenate([[sig.min()], sig, [sig.min()]])  # a peak at either end still counts
    peaks, _ = find_peaks(pad, prominence=max(_PROMINENCE * rng, floor))
    return int(len(peaks))


def _joint(ric: np.ndarray, j: int) -> np.ndarray:
    return ric[:, j - 1]


def measure_details(features, family: str) -> Dict[str, object]:
    """What the motion does, for the details judged for ``family``. ``side`` / ``heading`` may be
    ``"none"`` when the motion does not turn, travel or favour one limb at all."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != sk.FEATURE_DIM:
        raise ValueError(f"features must be [T, {sk.FEATURE_DIM}] un-normalized rows, got {tuple(x.shape)}")
    if family not in DETAILS:
        raise ValueError(f"no judged details for family {family!r}; known: {sorted(DETAILS)}")
    ric = x[:, sk.RIC].reshape(len(x), sk.NUM_JOINTS - 1, 3)
    yaw = float(x[:, sk.ROOT_ROT_VEL].sum())
    lateral, along = (float(v) for v in x[:, sk.ROOT_LIN_VEL].sum(0))
    out: Dict[str, object] = {}
    if family in ("turn_left", "turn_right"):
        out["side"] = "none" if abs(yaw) < _MIN_YAW else ("left" if yaw < 0 else "right")
    elif family == "side_step":
        out["side"] = "none" if abs(lateral) < _MIN_TRAVEL else ("left" if lateral > 0 else "right")
    elif family in ("walk_forward", "walk_backward"):
        out["heading"] = "none" if abs(along) < _MIN_TRAVEL else ("forward" if along > 0 else "backward")
    elif family == "wave":
        gap = float(_joint(ric, _L_WRIST)[:, 1].max() - _joint(ric, _R_WRIST)[:, 1].max())
        out["side"] = "none" if abs(gap) < _MIN_LIMB_GAP else ("left" if gap > 0 else "right")
        # swings of the forearm that is actually up (so the count is judged apart from the hand)
        left = gap >= 0
        w, e = (_L_WRIST, _L_ELBOW) if left else (_R_WRIST, _R_ELBOW)
        wrist_y = _joint(ric, w)[:, 1]
        up = wrist_y > wrist_y.min() + 0.5 * (wrist_y.max() - wrist_y.min())
        swing = (_joint(ric, w) - _joint(ric, e))[:, 0] * (-1.0 if left else 1.0)
        out["count"] = _count_peaks(swing[up], family)
    elif family == "kick":
        la, ra = _joint(ric, _L_ANKLE)[:, 1], _joint(ric, _R_ANKLE)[:, 1]
        gap = float(la.max() - ra.max())
        out["side"] = "none" if abs(gap) < _MIN_LIMB_GAP else ("left" if gap > 0 else "right")
        out["count"] = _count_peaks(np.maximum(la, ra), family)
    elif family == "jump":
        out["count"] = _count_peaks(np.minimum(_joint(ric, _L_ANKLE)[:, 1], _joint(ric, _R_ANKLE)[:, 1]),
                                    family)
    elif family == "squat":
        out["count"] = _count_peaks(-x[:, sk.ROOT_Y][:, 0], family)
    elif family == "raise_arms":
        out["count"] = _count_peaks(np.maximum(_joint(ric, _L_WRIST)[:, 1], _joint(ric, _R_WRIST)[:, 1]),
                                    family)
    return out


def judge(features, spec: dict) -> Optional[Dict[str, dict]]:
    """``{detail: {"expected", "measured", "correct"}}`` for the judged details of ``spec``, or
    ``None`` when nothing about it is judged (compositions, sit down, run)."""
    want = expected_details(spec)
    if not want:
        return None
    got = measure_details(features, spec["family"])
    return {d: {"expected": v, "measured": got[d], "correct": got[d] == v} for d, v in want.items()}
