"""Built-in procedural text-motion dataset in the HumanML3D on-disk layout.

``python -m sopo_ext.data.synthetic --out DIR [--num N] [--seed S]`` (or :func:`generate`) writes::

    DIR/new_joint_vecs/<id>.npy   float32 [T, 263] (40 <= T <= 196 feature rows, 20 fps)
    DIR/new_joints/<id>.npy       float32 [T + 1, 22, 3] the joint positions the features came from
    DIR/texts/<id>.txt            3-5 paraphrased captions ``caption#word/POS ...#0.0#0.0``
    DIR/train.txt val.txt test.txt   80 / 10 / 10 % of the ids (``000000`` ...)
    DIR/Mean.npy, Std.npy         float32 [263] over all frames of the train split; Std is
                                  floored at ``STD_FLOOR`` (1e-3) for (near-)constant features
    DIR/specs.json                the sampled parameters of every motion
    DIR/README.txt

so ``sopo_ext.data.humanml3d.HumanML3D(DIR, split=...)`` loads it.

Motions: per-joint local rotations (pitch about x, roll about z; see ``_Channels``) over time plus
a root yaw and a root velocity in the heading frame, run through the skeleton's
``forward_kinematics`` (batched over all motions of one length), put on the floor per frame
(the lowest foot joint at y = 0, plus an airborne lift for jumps), then
``features_from_joints(..., fix_heading_wrap=True)`` (exact heading for 180-degree turns; the
real files keep the original's sign quirk). Families: ``FAMILIES``; two-part compositions
("walks forward, then turns left") are concatenated with a smoothstep cross-fade of all channels.
Deterministic: the same seed gives byte-identical files (single-threaded torch CPU math).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from . import skeleton as sk

__all__ = ["FAMILIES", "SPEC", "STD_FLOOR", "MIN_LEN", "MAX_LEN", "sample_spec", "sample_specs",
           "synthesize_joints", "synthesize_batch", "captions_for", "pos_tag", "generate", "main"]

FPS = sk.FPS
MIN_LEN, MAX_LEN = 40, 196  # feature rows; the joints have one frame more
STD_FLOOR = 1e-3
COMPOSITION_P = 0.15

#: the action families and their parameters (values sampled uniformly unless noted).
SPEC: Dict[str, Dict[str, list]] = {
    "walk_forward": {"speed": ["slow", "normal", "fast"]},
    "walk_backward": {"speed": ["slow", "normal"]},
    "run": {"speed": ["normal", "fast"]},
    "turn_left": {"angle": [45, 90, 180], "speed": ["slow", "normal"]},
    "turn_right": {"angle": [45, 90, 180], "speed": ["slow", "normal"]},
    "side_step": {"direction": ["left", "right"], "speed": ["slow", "normal"]},
    "jump": {"count": [1, 2, 3, 4], "direction": ["in place", "forward"]},
    "squat": {"count": [1, 2, 3, 4], "speed": ["slow", "normal", "fast"]},
    "wave": {"hand": ["left", "right"], "count": [1, 2, 3, 4]},
    "raise_arms": {"count": [1, 2, 3], "direction": ["sideways", "forward"]},
    "kick": {"leg": ["left", "right"], "count": [1, 2, 3]},
    "sit_down": {"speed": ["slow", "normal"]},
}
FAMILIES = tuple(SPEC)

_SPEED_MUL = {"slow": 0.7, "normal": 1.0, "fast": 1.35}
_COUNT_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times"}
_NUM_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_ANGLE_WORDS = {45: "45 degrees", 90: "90 degrees", 180: "180 degrees"}


# --------------------------------------------------------------------------------------------
# Spec sampling (cheap, no kinematics)
# --------------------------------------------------------------------------------------------
def _rand_frames(rng, lo, hi) -> int:
    lo, hi = min(max(MIN_LEN, int(lo)), MAX_LEN), min(MAX_LEN, int(hi))
    hi = max(hi, lo)
    return int(rng.integers(lo, hi + 1))


def _min_frames(family: str, p: dict) -> int:
    """A plausible minimum duration (feature rows) for the parameters."""
    c = p.get("count", 1)
    sm = _SPEED_MUL.get(p.get("speed", "normal"), 1.0)
    return {
        "jump": 14 + 22 * c, "squat": int(12 + c * 34 / sm), "wave": 30 + 12 * c,
        "raise_arms": 10 + 36 * c, "kick": 16 + 24 * c, "sit_down": int(50 / sm),
        "turn_left": 44, "turn_right": 44,
    }.get(family, MIN_LEN)


def _sample_single(rng, family: Optional[str] = None, lo: int = MIN_LEN, hi: int = MAX_LEN) -> dict:
    if family is None:
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    params = {k: v[int(rng.integers(len(v)))] for k, v in SPEC[family].items()}
    params = {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in params.items()}
    frames = _rand_frames(rng, max(lo, _min_frames(family, params)), hi)
    return {"family": family, "params": params, "frames": frames}


def sample_spec(rng: np.random.Generator) -> dict:
    """One motion spec: ``{"family", "params", "frames"}`` or a composition
    ``{"family": "composition", "parts": [spec, spec], "frames"}``."""
    if rng.random() < COMPOSITION_P:
        a = _sample_single(rng, hi=110)
        b = _sample_single(rng, hi=110)
        for s in (a, b):  # parts may be shorter than MIN_LEN on their own
            s["frames"] = int(min(s["frames"], max(_min_frames(s["family"], s["params"]), 48)))
        total = a["frames"] + b["frames"]
        if total > MAX_LEN:
            scale = MAX_LEN / total
            a["frames"] = int(a["frames"] * scale)
            b["frames"] = MAX_LEN - a["frames"]
        return {"family": "composition", "parts": [a, b], "frames": a["frames"] + b["frames"]}
    return _sample_single(rng)


def sample_specs(num: int, seed: int = 0) -> List[dict]:
    rng = np.random.default_rng([int(seed), 7919])
    return [sample_spec(rng) for _ in range(int(num))]


# --------------------------------------------------------------------------------------------
# Motion channels
# --------------------------------------------------------------------------------------------
class _Channels:
    """Per-frame pose channels of one motion with ``n`` joint frames (radians, metres/frame):
    pitch[n, 22] / roll[n, 22] local rotation of bone parent(j) -> j about x then z (a positive
    pitch moves a downward bone backward, an upward bone forward; a positive roll moves a downward
    bone to +x = the body's left); yaw_rate[n] (positive = turn left); vel[n, 2] root (x, z) step
    in the heading frame; lift[n] extra root height (jumps); plant[n] in [0, 1]: weight of the
    extra root step that keeps the stance foot fixed on the floor (gaits: no foot slide);
    stance[n]: which foot is the stance foot (-1 the lower one, 0 left, 1 right)."""

    def __init__(self, n: int):
        self.n = n
        self.pitch = np.zeros((n, sk.NUM_JOINTS))
        self.roll = np.zeros((n, sk.NUM_JOINTS))
        self.yaw_rate = np.zeros(n)
        self.vel = np.zeros((n, 2))
        self.lift = np.zeros(n)
        self.plant = np.zeros(n)
        self.stance = np.full(n, -1.0)  # -1: the lower foot, 0: left foot, 1: right foot
        self.pitch[:, 15] = -math.pi / 2          # head bone (rest +z) points up
        self.roll[:, 18] = 0.12                   # arms slightly away from the body
        self.roll[:, 19] = -0.12

    def fields(self):
        return ("pitch", "roll", "yaw_rate", "vel", "lift", "plant", "stance")


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _ramp(n, t0, t1):
    t = np.arange(n, dtype=np.float64)
    return _smoothstep((t - t0) / max(t1 - t0, 1e-6))


def _bump(n, t0, t1):
    """0 -> 1 -> 0 (raised cosine) on [t0, t1], 0 elsewhere."""
    t = np.arange(n, dtype=np.float64)
    x = np.clip((t - t0) / max(t1 - t0, 1e-6), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(2 * math.pi * x)


_LEG_LEN = sk.BONE_LENGTHS[4] + sk.BONE_LENGTHS[7]


def _gait(c: _Channels, speed_mps: float, amp: float, knee: float, arm: float, env=None,
          phase0: float = 0.0, lateral: bool = False):
    """Alternating legs; root moves at ``speed_mps`` (sign = direction) along z (or x if
    ``lateral``). The step frequency matches the stance foot's backward sweep to the speed."""
    n = c.n
    env = np.ones(n) if env is None else env
    v = speed_mps / FPS
    omega = abs(v) * math.pi / (2 * _LEG_LEN * amp) if abs(v) > 1e-6 else 0.25
    if lateral and abs(v) > 1e-6:  # one foot-width shift of L sin(amp) per cycle
        omega = abs(v) * 2 * math.pi / (_LEG_LEN * math.sin(amp))
    omega = float(np.clip(omega, 0.12, 0.6)) * (1 if (v >= 0 or lateral) else -1)
    ph = phase0 + omega * np.arange(n)
    s, co = np.sin(ph), np.cos(ph)
    kl, kr = knee * np.maximum(0, co) * env, knee * np.maximum(0, -co) * env
    if lateral:
        # the leading leg steps out (lifted), then the trailing foot closes up (lifted) while the
        # leading foot, planted, carries the root sideways
        if v < 0:
            kl, kr = kr, kl
        lead = 4 if v >= 0 else 5
        c.roll[:, lead] += amp * 0.5 * (1 + s) * env * (1 if v >= 0 else -1)
        c.pitch[:, 4] += -0.3 * kl
        c.pitch[:, 5] += -0.3 * kr
    else:
        c.pitch[:, 4] += -amp * s * env
        c.pitch[:, 5] += amp * s * env
        c.pitch[:, 18] += arm * s * env
        c.pitch[:, 19] += -arm * s * env
    if abs(v) > 1e-6:
        c.plant = np.maximum(c.plant, env)
        c.stance = np.where(kl > kr, 1.0, 0.0)  # the foot that is not lifted
    c.pitch[:, 7] += kl
    c.pitch[:, 8] += kr


def _flat_feet(c: _Channels):
    c.pitch[:, 10] = -(c.pitch[:, 4] + c.pitch[:, 7])
    c.pitch[:, 11] = -(c.pitch[:, 5] + c.pitch[:, 8])


def _channels_single(spec: dict, n: int, rng: np.random.Generator) -> _Channels:
    fam, p = spec["family"], spec["params"]
    c = _Channels(n)
    sm = _SPEED_MUL.get(p.get("speed", "normal"), 1.0)
    t = np.arange(n, dtype=np.float64)
    ph0 = float(rng.uniform(0, 2 * math.pi))
    ease = np.minimum(_ramp(n, 0, 8), 1 - _ramp(n, n - 9, n - 1)) if n > 20 else np.ones(n)
    if fam == "walk_forward":
        spd = 1.2 * sm * rng.uniform(0.9, 1.1)
        _gait(c, spd, 0.3 + 0.1 * sm, 0.9, 0.35, env=ease, phase0=ph0)
    elif fam == "walk_backward":
        spd = -0.8 * sm * rng.uniform(0.9, 1.1)
        _gait(c, spd, 0.3, 0.8, 0.2, env=ease, phase0=ph0)
    elif fam == "run":
        spd = (2.6 if p["speed"] == "normal" else 3.4) * rng.uniform(0.9, 1.1)
        _gait(c, spd, 0.6, 1.6, 0.6, env=ease, phase0=ph0)
        c.pitch[:, 20] += -1.3
        c.pitch[:, 21] += -1.3
        c.pitch[:, 3] += 0.2 * ease
    elif fam in ("turn_left", "turn_right"):
        # jittered so the heading never lands exactly on 180 degrees (qbetween is undefined there)
        ang = math.radians(p["angle"]) * (1 if fam == "turn_left" else -1) * rng.uniform(0.93, 0.99)
        dur = min(n - 8, max(16, int(abs(ang) / (math.radians(110) * sm) * FPS)))
        t0 = int(rng.integers(2, max(3, n - dur - 2)))
        yaw = ang * _ramp(n, t0, t0 + dur)
        c.yaw_rate = np.diff(yaw, prepend=0.0)
        env = _bump(n, t0 - 4, t0 + dur + 4) ** 0.5
        _gait(c, 0.0, 0.18, 0.7, 0.1, env=env, phase0=ph0)
    elif fam == "side_step":
        d = 1.0 if p["direction"] == "left" else -1.0
        _gait(c, 0.35 * sm * d, 0.35, 0.5, 0.0, env=ease, phase0=ph0, lateral=True)
    elif fam == "jump":
        cnt = p["count"]
        per = (n - 8) / cnt
        for i in range(cnt):
            s = 4 + i * per
            crouch = _bump(n, s, s + 10) + _bump(n, s + 10, s + 20) * 0.6
            c.pitch[:, 4] += -0.8 * crouch
            c.pitch[:, 5] += -0.8 * crouch
            c.pitch[:, 7] += 1.5 * crouch
            c.pitch[:, 8] += 1.5 * crouch
            swing = 0.5 * _bump(n, s - 2, s + 6) - 1.6 * _bump(n, s + 3, s + 19)
            c.pitch[:, 18] += swing
            c.pitch[:, 19] += swing
            air = np.clip((t - (s + 6)) / 8.0, 0, 1)
            inair = (t > s + 6) & (t < s + 14)
            h = rng.uniform(0.18, 0.35)
            c.lift += np.where(inair, 4 * h * air * (1 - air), 0.0)
            if p["direction"] == "forward":
                c.vel[:, 1] += np.where(inair, rng.uniform(0.5, 0.8) / 8.0, 0.0)
    elif fam == "squat":
        cnt = p["count"]
        per = (n - 8) / cnt
        for i in range(cnt):
            b = _bump(n, 4 + i * per, 4 + (i + 1) * per - 2)
            c.pitch[:, 4] += -1.4 * b
            c.pitch[:, 5] += -1.4 * b
            c.pitch[:, 7] += 2.2 * b
            c.pitch[:, 8] += 2.2 * b
            c.pitch[:, 3] += 0.5 * b
            c.pitch[:, 18] += -1.4 * b
            c.pitch[:, 19] += -1.4 * b
    elif fam == "wave":
        left = p["hand"] == "left"
        up, fore = (18, 20) if left else (19, 21)
        sg = 1.0 if left else -1.0
        r0, r1 = 6.0, float(n - 6)
        env = np.minimum(_ramp(n, 1, 14), 1 - _ramp(n, n - 14, n - 1))
        c.roll[:, up] += sg * 2.5 * env
        per = max(6.0, (r1 - r0 - 8) / p["count"])
        osc = np.sin(2 * math.pi * np.clip(t - 12, 0, None) / per)
        osc = np.where((t >= 12) & (t <= 12 + per * p["count"]), osc, 0.0)
        c.roll[:, fore] += sg * (0.3 + 0.5 * osc) * env
    elif fam == "raise_arms":
        cnt = p["count"]
        per = (n - 6) / cnt
        b = sum(np.minimum(1.0, 1.6 * _bump(n, 3 + i * per, 3 + (i + 1) * per - 2))
                for i in range(cnt))
        if p["direction"] == "sideways":
            c.roll[:, 18] += 2.8 * b
            c.roll[:, 19] += -2.8 * b
        else:
            c.pitch[:, 18] += -2.9 * b
            c.pitch[:, 19] += -2.9 * b
    elif fam == "kick":
        hip, knee = (4, 7) if p["leg"] == "left" else (5, 8)
        cnt = p["count"]
        per = (n - 8) / cnt
        for i in range(cnt):
            s = 4 + i * per
            c.pitch[:, knee] += 1.3 * _bump(n, s, s + 10)
            c.pitch[:, hip] += -1.3 * _bump(n, s + 2, s + 16)
            c.pitch[:, 3] += -0.15 * _bump(n, s + 2, s + 16)
        sg = 1.0 if hip == 4 else -1.0
        c.pitch[:, 18] += -0.5 * sg * np.clip(-c.pitch[:, hip], 0, None)
        c.pitch[:, 19] += 0.5 * sg * np.clip(-c.pitch[:, hip], 0, None)
    elif fam == "sit_down":
        dur = min(n - 10, int(rng.uniform(25, 40) / sm))
        t0 = int(rng.integers(2, max(3, n - dur - 4)))
        r = _ramp(n, t0, t0 + dur)
        c.pitch[:, 4] += -1.5 * r
        c.pitch[:, 5] += -1.5 * r
        c.pitch[:, 7] += 1.5 * r
        c.pitch[:, 8] += 1.5 * r
        c.pitch[:, 3] += 0.25 * r
        c.pitch[:, 18] += -0.4 * r
        c.pitch[:, 19] += -0.4 * r
    else:
        raise ValueError(f"unknown family {fam!r}")
    _flat_feet(c)
    return c


def _concat(a: _Channels, b: _Channels, w: int = 8) -> _Channels:
    """Concatenate with a smoothstep cross-fade of every channel over 2w frames at the seam."""
    out = _Channels(a.n + b.n)
    k = a.n
    lo, hi = max(0, k - w), min(out.n - 1, k + w)
    s = _smoothstep((np.arange(lo, hi + 1) - lo) / max(hi - lo, 1))
    for f in out.fields():
        x = np.concatenate([getattr(a, f), getattr(b, f)], axis=0)
        if f == "stance":  # discrete
            setattr(out, f, x)
            continue
        xa, xb = x[lo], x[hi]
        shape = (-1,) + (1,) * (x.ndim - 1)
        x[lo:hi + 1] = xa[None] * (1 - s.reshape(shape)) + xb[None] * s.reshape(shape)
        setattr(out, f, x)
    return out


def _channels(spec: dict, rng: np.random.Generator) -> _Channels:
    n = spec["frames"] + 1
    if spec["family"] == "composition":
        a, b = spec["parts"]
        ca = _channels_single(a, a["frames"], rng)
        cb = _channels_single(b, n - a["frames"], rng)
        return _concat(ca, cb)
    return _channels_single(spec, n, rng)


def _axis_quat(angle: torch.Tensor, axis: int) -> torch.Tensor:
    q = torch.zeros(angle.shape + (4,), dtype=angle.dtype)
    q[..., 0] = torch.cos(angle / 2)
    q[..., 1 + axis] = torch.sin(angle / 2)
    return q


def synthesize_batch(chans: List[_Channels], dtype=torch.float64) -> torch.Tensor:
    """Joints [B, n, 22, 3] (y up, feet on the floor) of channel sets of equal length n."""
    pitch = torch.as_tensor(np.stack([c.pitch for c in chans]), dtype=dtype)
    roll = torch.as_tensor(np.stack([c.roll for c in chans]), dtype=dtype)
    yaw = torch.as_tensor(np.cumsum(np.stack([c.yaw_rate for c in chans]), axis=1), dtype=dtype)
    quats = sk.qmul(_axis_quat(roll, 2), _axis_quat(pitch, 0))        # [B, n, 22, 4]
    root_q = _axis_quat(yaw, 1)
    quats[..., 0, :] = root_q
    zero = torch.zeros(quats.shape[:2] + (3,), dtype=dtype)
    quats[..., 0, :] = _axis_quat(torch.zeros_like(yaw), 1)
    local = sk.forward_kinematics(quats, zero)                         # heading frame, root at 0
    feet = list(sk.FOOT_LEFT + sk.FOOT_RIGHT)
    fy = local[..., feet, 1]                                             # [B, n, 4]
    floor = fy.amin(-1)                                                  # [B, n]
    # stance-foot planting: the lower foot's xz motion relative to the root, negated
    left_low = (fy[..., :2].amin(-1) <= fy[..., 2:].amin(-1))            # [B, n]
    stance = torch.as_tensor(np.stack([c.stance for c in chans]))
    left_low = torch.where(stance < 0, left_low, stance == 0)
    dfoot = torch.zeros_like(local[..., 0, :])
    dfoot[:, 1:] = local[:, 1:, sk.FOOT_LEFT[0]] - local[:, :-1, sk.FOOT_LEFT[0]]
    dright = torch.zeros_like(dfoot)
    dright[:, 1:] = local[:, 1:, sk.FOOT_RIGHT[0]] - local[:, :-1, sk.FOOT_RIGHT[0]]
    low_prev = torch.cat([left_low[:, :1], left_low[:, :-1]], dim=1)
    dstance = torch.where(low_prev[..., None], dfoot, dright)           # stance foot of frame t-1
    plant = torch.as_tensor(np.stack([c.plant for c in chans]), dtype=dtype)
    vel = torch.as_tensor(np.stack([c.vel for c in chans]), dtype=dtype)  # [B, n, 2]
    step = torch.zeros(vel.shape[:2] + (3,), dtype=dtype)
    step[..., 0] = vel[..., 0] - plant * dstance[..., 0]
    step[..., 2] = vel[..., 1] - plant * dstance[..., 2]
    root_q = _axis_quat(yaw, 1)
    step = sk.qrot(root_q, step)
    root = torch.cumsum(step, dim=1) - step[:, :1]
    joints = sk.qrot(root_q[:, :, None, :], local) + root[:, :, None, :]
    lift = torch.as_tensor(np.stack([c.lift for c in chans]), dtype=dtype)
    joints[..., 1] += (lift - floor)[..., None]
    return joints


def synthesize_joints(spec: dict, seed: int = 0) -> torch.Tensor:
    """Joints [frames + 1, 22, 3] float64 of one spec (its own rng from ``seed``)."""
    rng = np.random.default_rng([int(seed), 104729])
    return synthesize_batch([_channels(spec, rng)])[0]


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------
_SUBJECTS = ["a person", "someone", "a man", "the person", "a woman", "a figure"]
_SPEED_ADV = {"slow": ["slowly", "at a slow pace", "leisurely"],
              "normal": ["", "at a normal pace", "steadily"],
              "fast": ["quickly", "fast", "briskly"]}


def _vps(spec: dict) -> List[str]:
    """Verb-phrase paraphrases (third person) stating the spec's parameters."""
    f, p = spec["family"], spec["params"]
    sp = p.get("speed", "normal")
    a0, a1, a2 = _SPEED_ADV[sp]
    cnt = p.get("count")
    cw = _COUNT_WORDS.get(cnt, "")
    nw = _NUM_WORDS.get(cnt, "")
    if f == "walk_forward":
        return [f"walks forward {a0}", f"walks straight ahead {a1}",
                f"takes a few steps forward {a2}", f"moves forward on foot {a0}"]
    if f == "walk_backward":
        return [f"walks backward {a0}", f"steps backwards {a1}",
                f"moves back while facing forward {a2}", f"walks in reverse {a0}"]
    if f == "run":
        adv = "very fast" if sp == "fast" else "at a jog"
        return [f"runs forward {adv}", f"jogs straight ahead {'quickly' if sp == 'fast' else ''}",
                f"sprints forward" if sp == "fast" else "runs forward", f"is running ahead {adv}"]
    if f in ("turn_left", "turn_right"):
        d = "left" if f == "turn_left" else "right"
        ang = p["angle"]
        aw = _ANGLE_WORDS[ang]
        extra = "turns around to the " + d if ang == 180 else \
            ("turns slightly to the " + d if ang == 45 else "makes a quarter turn to the " + d)
        return [f"turns {d} by {aw}", f"turns to the {d} {a0}", extra,
                f"rotates {aw} to the {d}"]
    if f == "side_step":
        d = p["direction"]
        return [f"side steps to the {d} {a0}", f"shuffles sideways to the {d}",
                f"steps sideways toward the {d} {a1}", f"moves to the {d} with side steps"]
    if f == "jump":
        where = "in place" if p["direction"] == "in place" else "forward"
        j = "jump" if cnt == 1 else "jumps"
        return [f"jumps {where} {cw}", f"does {nw} {j} {where}", f"hops {where} {cw}",
                f"leaps {where} {nw} {'time' if cnt == 1 else 'times'}"]
    if f == "squat":
        s = "squat" if cnt == 1 else "squats"
        return [f"squats {cw} {a0}", f"does {nw} {s} {a1}", f"bends the knees and squats down {cw}",
                f"performs {nw} {s} {a2}"]
    if f == "wave":
        h = p["hand"]
        return [f"waves the {h} hand {cw}", f"raises the {h} hand and waves {cw}",
                f"waves {cw} with the {h} arm", f"lifts the {h} arm and waves hello {cw}"]
    if f == "raise_arms":
        d = "out to the sides" if p["direction"] == "sideways" else "in front over the head"
        return [f"raises both arms {d} {cw}", f"lifts both arms {d} {cw}",
                f"puts both hands up {d} {cw}", f"raises the arms {p['direction']} {cw}"]
    if f == "kick":
        lg = p["leg"]
        k = "kick" if cnt == 1 else "kicks"
        return [f"kicks with the {lg} leg {cw}", f"does {nw} {k} with the {lg} foot",
                f"kicks the {lg} leg forward {cw}", f"lifts the {lg} leg and kicks {cw}"]
    if f == "sit_down":
        return [f"sits down {a0}", f"lowers into a sitting position {a1}",
                f"bends the knees and sits down {a2}", f"sits down on a chair {a0}"]
    raise ValueError(f)


_POS = {}
for _w in "a an the".split():
    _POS[_w] = "DET"
for _w in ("to with by in on over toward into of from at while and then before after"
           ).split():
    _POS[_w] = "ADP"
_POS.update({"and": "CCONJ", "then": "ADV", "person": "NOUN", "someone": "PRON", "man": "NOUN",
             "woman": "NOUN", "figure": "NOUN"})
for _w in ("forward backward backwards ahead straight slowly quickly fast briskly leisurely "
           "steadily sideways around slightly very back down up out first reverse hello afterwards"
           ).split():
    _POS[_w] = "ADV"
for _w in ("left right slow normal few both sitting quarter front").split():
    _POS[_w] = "ADJ"
for _w in ("one two three four 45 90 180 once twice").split():
    _POS[_w] = "NUM"
for _w in ("walks walk takes moves move runs jogs sprints is running turns turn rotates makes "
           "steps side shuffles jumps jump hops leaps does squats squat bends performs waves wave "
           "raises lifts puts kicks kick lowers sits facing").split():
    if _w not in _POS:
        _POS[_w] = "VERB"
_POS["side"] = "NOUN"


def pos_tag(word: str) -> str:
    """A tiny POS heuristic: NOUN/VERB/ADJ/ADV/ADP/DET/NUM/PRON/CCONJ/OTHER."""
    w = word.lower()
    if w in _POS:
        return _POS[w]
    if w.isdigit():
        return "NUM"
    if not w.isalpha():
        return "OTHER"
    if w.endswith("ly"):
        return "ADV"
    if w.endswith("ing"):
        return "VERB"
    return "NOUN"


def _line(text: str) -> str:
    text = " ".join(text.split())
    words = [w.strip(".,") for w in text.split()]
    toks = " ".join(f"{w.lower()}/{pos_tag(w)}" for w in words if w)
    return f"{text}#{toks}#0.0#0.0"


def captions_for(spec: dict, rng: np.random.Generator, k: Optional[int] = None) -> List[str]:
    """3-5 distinct caption strings (without the token/timing fields)."""
    k = int(rng.integers(3, 6)) if k is None else k
    out: List[str] = []
    if spec["family"] == "composition":
        va, vb = _vps(spec["parts"][0]), _vps(spec["parts"][1])
        pats = ["{s} {a}, then {b}", "{s} first {a} and then {b}", "{s} {a} and afterwards {b}",
                "{s} {a}, and after that {b}"]
        for i in range(k):
            s = _SUBJECTS[int(rng.integers(len(_SUBJECTS)))]
            out.append(pats[i % len(pats)].format(s=s, a=va[int(rng.integers(len(va)))].strip(),
                                                  b=vb[int(rng.integers(len(vb)))].strip()))
    else:
        vps = _vps(spec)
        order = rng.permutation(len(vps))
        for i in range(k):
            s = _SUBJECTS[int(rng.integers(len(_SUBJECTS)))]
            out.append(f"{s} {vps[order[i % len(vps)]].strip()}")
    return [" ".join(c.split()) + "." for c in out]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
_README = """sopo_ext built-in synthetic text-motion dataset (procedural, HumanML3D layout)
=============================================================================
Generated by: python -m sopo_ext.data.synthetic --out DIR --num {num} --seed {seed}
Motions: {num} ({n_train} train / {n_val} val / {n_test} test), 20 fps, 40..196 feature rows.
Files: new_joint_vecs/<id>.npy float32 [T, 263] (HumanML3D features of the joints),
  new_joints/<id>.npy float32 [T+1, 22, 3], texts/<id>.txt (3-5 captions, word/POS tokens,
  0.0#0.0 = whole clip), train/val/test.txt, Mean.npy / Std.npy over all train frames
  (Std floored at {floor} for constant features), specs.json (parameters of every motion).
Families: {families} plus two-part compositions ("A, then B", cross-faded).
Parameters: speed, direction, turn angle, hand/leg, repetition count (1-4), duration.
Motions are procedural joint rotations + forward kinematics on the T2M skeleton; they are not
real human motion capture. Same seed -> byte-identical files.
"""


def generate(out_dir, num: int = 3000, seed: int = 0, verbose: bool = False) -> dict:
    """Write the dataset into ``out_dir``; returns a summary dict."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    (out / "new_joint_vecs").mkdir(parents=True, exist_ok=True)
    (out / "new_joints").mkdir(parents=True, exist_ok=True)
    (out / "texts").mkdir(parents=True, exist_ok=True)
    num = int(num)
    if num < 3:
        raise ValueError(f"num must be >= 3, got {num}")
    specs = sample_specs(num, seed)
    rng = np.random.default_rng([int(seed), 31337])
    chans = [_channels(s, rng) for s in specs]
    caps = [captions_for(s, rng) for s in specs]
    ids = [f"{i:06d}" for i in range(num)]
    groups: Dict[int, List[int]] = {}
    for i, c in enumerate(chans):
        groups.setdefault(c.n, []).append(i)
    feats: List[Optional[np.ndarray]] = [None] * num
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible reductions
    try:
        for n in sorted(groups):
            idx = groups[n]
            for b0 in range(0, len(idx), 64):
                part = idx[b0:b0 + 64]
                joints = synthesize_batch([chans[i] for i in part])
                f = sk.features_from_joints(joints, fix_heading_wrap=True)
                if not torch.isfinite(f).all():
                    raise RuntimeError("non-finite features generated")
                jn = sk.normalize_joints(joints)
                for k, i in enumerate(part):
                    feats[i] = f[k].to(torch.float32).numpy()
                    np.save(out / "new_joint_vecs" / f"{ids[i]}.npy", feats[i])
                    np.save(out / "new_joints" / f"{ids[i]}.npy", jn[k].to(torch.float32).numpy())
    finally:
        torch.set_num_threads(old_threads)
    for i in range(num):
        with open(out / "texts" / f"{ids[i]}.txt", "w", encoding="utf-8", newline="\n") as fh:
            fh.write("\n".join(_line(c) for c in caps[i]) + "\n")
    perm = np.random.default_rng([int(seed), 4242]).permutation(num)
    n_val = max(1, int(round(num * 0.1)))
    n_test = max(1, int(round(num * 0.1)))
    n_train = num - n_val - n_test
    splits = {"train": sorted(perm[:n_train]), "val": sorted(perm[n_train:n_train + n_val]),
              "test": sorted(perm[n_train + n_val:])}
    for name, sel in splits.items():
        (out / f"{name}.txt").write_text("".join(ids[i] + "\n" for i in sel), encoding="utf-8")
    # two-pass float64 mean / population std over all train frames (no big concatenation)
    n_frames = sum(feats[i].shape[0] for i in splits["train"])
    mean64 = sum(feats[i].astype(np.float64).sum(0) for i in splits["train"]) / n_frames
    var64 = sum(((feats[i].astype(np.float64) - mean64) ** 2).sum(0)
                for i in splits["train"]) / n_frames
    raw_std = np.sqrt(var64)
    mean = mean64.astype(np.float32)
    std = np.maximum(raw_std, STD_FLOOR).astype(np.float32)
    np.save(out / "Mean.npy", mean)
    np.save(out / "Std.npy", std)
    with open(out / "specs.json", "w", encoding="utf-8") as fh:
        json.dump({ids[i]: specs[i] for i in range(num)}, fh, indent=0, sort_keys=True)
    (out / "README.txt").write_text(_README.format(
        num=num, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, floor=STD_FLOOR,
        families=", ".join(FAMILIES)), encoding="utf-8")
    fam_counts: Dict[str, int] = {}
    for s in specs:
        fam_counts[s["family"]] = fam_counts.get(s["family"], 0) + 1
    summary = {"out_dir": str(out), "num": num, "seed": int(seed),
               "splits": {k: len(v) for k, v in splits.items()},
               "frames_total": int(sum(x.shape[0] for x in feats)),
               "families": dict(sorted(fam_counts.items())),
               "std_floored": int((raw_std < STD_FLOOR).sum()),
               "seconds": round(time.perf_counter() - t_start, 3)}
    if verbose:
        print(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sopo_ext.data.synthetic",
                                 description="Write the built-in synthetic text-motion dataset "
                                             "(HumanML3D layout).")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--num", type=int, default=3000, help="number of motions (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    generate(a.out, num=a.num, seed=a.seed, verbose=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
