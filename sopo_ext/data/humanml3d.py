"""HumanML3D text-motion dataset over the real on-disk layout.

Layout (``root``)::

    new_joint_vecs/<id>.npy   float32 [T, 263], 20 fps
    texts/<id>.txt            one caption per line: ``caption#tok/POS tok/POS ...#start#end``
    Mean.npy, Std.npy         float32 [263]
    train.txt / val.txt / test.txt   one id per line (mirrored ``M<id>`` clips are listed there)

Samples (same convention as Text2MotionDatasetV2 of MDM / text-to-motion):

* every caption with ``start == end == 0`` (or NaN, which the original maps to 0) belongs to the
  *whole clip*; the clip is one sample holding all those captions;
* every caption with another start/end makes its *own* sample: frames
  ``int(start * 20) : int(end * 20)`` with that single caption, named ``C<line>_<id>``
  (the original uses a random letter prefix; ours is deterministic);
* one caption is drawn per access, deterministically from ``(seed, epoch, index)``
  (call :meth:`HumanML3D.set_epoch` each epoch).

Length rule. The original first drops a clip (with *all* its crops) unless its whole length is
``40 <= T < 200``; then it keeps a whole or cropped motion iff ``40 <= T < 200`` and at access
crops it to a multiple of ``unit_length`` (4), which brings 196..199 down to 196 (and randomly
one unit shorter). Here the first gate is always applied as in the original
(``min_len <= T_clip < 200``, counted as ``clip_length_gate``), then per sample:

* ``length_rule="strict"`` (default): keep iff ``min_len <= T <= max_len``; nothing longer than
  ``max_len`` ever reaches the model and nothing is cropped at access (unless ``unit_length``).
  This is the original's sample set minus the samples of 197..199 frames.
* ``length_rule="original"``: keep iff ``min_len <= T < 200`` (the original's filter, so the
  standard train split gives the original's 23,384 samples); samples longer than ``max_len``
  are cropped at access to a random ``max_len`` window (deterministic per seed/epoch).
* ``unit_length=k`` (optional, MDM: 4): at access, the length is floored to a multiple of ``k``
  and a random window of that length is taken (the original also sometimes drops one more unit;
  we do not).

Normalization: ``(x - Mean) / Std_safe`` with ``Std_safe = where(Std < std_eps, 1, Std)``: a
(near-)constant feature is centred but not divided by ~0 (no blow-up); ``denormalize`` uses the
same ``Std_safe`` so round trips are exact. The real Std has min 0.0128, so it is unaffected.

Errors vs skips (all decided in ``__init__``, never during training):

* missing root / split file / Mean.npy / Std.npy / new_joint_vecs / texts dir ->
  ``FileNotFoundError`` naming the path; Mean/Std of the wrong shape or non-finite -> ``ValueError``.
* a split id whose ``.npy`` or ``.txt`` is missing -> ``FileNotFoundError`` naming the path
  (``strict=False``: counted skip; the original silently skips it).
* a caption line that is structurally malformed (fewer than 4 ``#`` fields, non-numeric,
  negative or infinite start/end) -> ``ValueError`` naming file and line number
  (``strict=False``: counted skip of that line; the original silently drops the whole clip).
  Blank lines are ignored. A crop with ``end <= start`` (or starting past the clip's end) is an
  empty slice, dropped like the original's length filter does, counted as ``empty_crop``.
  Lines whose caption text is empty are a counted skip; an empty token part is accepted (``tokens == []``) and counted, because the
  real data is ragged there. Extra ``#`` fields are joined back into the token part.
* features not ``[T, 263]`` -> ``ValueError`` naming the file (always; a wrong layout is never
  data to silently drop).
* non-finite (NaN/inf) features -> the clip (and its crops) is skipped and counted; one warning.
* a clip left without any captions -> counted skip.
* nothing left after filtering -> ``ValueError`` listing the filters and the skip counts.

All counted skips are summarized in ``self.skipped`` (a dict) and in one ``UserWarning`` at the
end of loading (no progress bars).
"""
from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["HumanML3D", "Caption", "collate_motions", "to_mdm_layout", "parse_caption_line",
           "FPS", "NFEATS", "ORIGINAL_MAX_EXCLUSIVE"]

FPS = 20
NFEATS = 263
ORIGINAL_MAX_EXCLUSIVE = 200  # the original drops T >= 200


@dataclass(frozen=True)
class Caption:
    text: str
    tokens: Tuple[str, ...]
    start: float  # seconds; 0.0 together with end 0.0 means the whole clip
    end: float
    line: int  # 1-based line number in the texts file

    @property
    def whole_clip(self) -> bool:
        return self.start == 0.0 and self.end == 0.0


class _LineError(ValueError):
    """A malformed caption line (converted to a ValueError naming file and line)."""


def _parse_time(s: str, what: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise _LineError(f"{what} {s!r} is not a number") from None
    if math.isnan(v):
        return 0.0  # the original maps NaN to 0.0
    if math.isinf(v) or v < 0:
        raise _LineError(f"{what} {s!r} must be a finite non-negative number of seconds")
    return v


def parse_caption_line(line: str, lineno: int = 0) -> Caption:
    """Parse ``caption#tok/POS ...#start#end``; raises ``ValueError`` if malformed."""
    parts = line.strip().split("#")
    if len(parts) < 4:
        raise _LineError(f"expected 'caption#tokens#start#end' (4 '#'-separated fields), "
                         f"got {len(parts)}")
    text = parts[0].strip()
    tok_part = "#".join(parts[1:-2])
    start = _parse_time(parts[-2], "start")
    end = _parse_time(parts[-1], "end")
    tokens = tuple(t for t in tok_part.strip().split(" ") if t)
    return Caption(text=text, tokens=tokens, start=start, end=end, line=lineno)


@dataclass
class _Sample:
    name: str  # sample name (clip id, or C<line>_<id> for a crop)
    clip_id: str
    start: int  # frame range inside the clip's .npy
    stop: int
    captions: List[Caption] = field(default_factory=list)
    data: Optional[np.ndarray] = None  # normalized features (eager mode)

    @property
    def length(self) -> int:
        return self.stop - self.start


class HumanML3D(Dataset):
    """HumanML3D split as a map-style dataset; items are dicts (see :meth:`__getitem__`).

    Args:
        root: the HumanML3D directory (holding ``new_joint_vecs``, ``texts``, Mean/Std, splits).
        split: ``"train"``, ``"val"``, ``"test"`` (reads ``<root>/<split>.txt``) or a path to a
            split file.
        min_len, max_len: length filter in frames (see the module doc for the exact rule).
        normalize: return ``(x - Mean) / Std_safe`` (else raw features).
        seed: base seed of the per-access caption / crop choice.
        lazy: keep only file paths and frame ranges in memory and read the ``.npy`` (memory-mapped)
            at access; the files are still fully validated once at construction.
        length_rule: ``"strict"`` or ``"original"`` (module doc).
        unit_length: optional MDM-style crop to a multiple of this many frames at access.
        strict: raise on missing per-id files and malformed caption lines (else count & skip).
        std_eps: Std entries below this are replaced by 1 (module doc).
        mean_path, std_path: override ``<root>/Mean.npy`` and ``<root>/Std.npy``.
        ids: use these clip ids instead of reading the split file's ids (the file must exist).
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", min_len: int = 40,
                 max_len: int = 196, normalize: bool = True, seed: int = 0, *, lazy: bool = False,
                 length_rule: str = "strict", unit_length: Optional[int] = None,
                 strict: bool = True, std_eps: float = 1e-8,
                 mean_path: Optional[Union[str, os.PathLike]] = None,
                 std_path: Optional[Union[str, os.PathLike]] = None,
                 ids: Optional[Sequence[str]] = None):
        if length_rule not in ("strict", "original"):
            raise ValueError(f"length_rule must be 'strict' or 'original', got {length_rule!r}")
        if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
            raise ValueError(f"need integers 1 <= min_len <= max_len, got {min_len}, {max_len}")
        if unit_length is not None and not (isinstance(unit_length, int) and 1 <= unit_length <= min_len):
            raise ValueError(f"unit_length must be an int in [1, min_len], got {unit_length!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"HumanML3D root directory not found: {self.root}")
        self.split = split
        sp = Path(split)
        self.split_path = sp if (sp.suffix == ".txt" and (sp.is_absolute() or os.sep in split)) \
            else self.root / f"{split}.txt"
        self.mean_path = Path(mean_path) if mean_path is not None else self.root / "Mean.npy"
        self.std_path = Path(std_path) if std_path is not None else self.root / "Std.npy"
        self.motion_dir = self.root / "new_joint_vecs"
        self.text_dir = self.root / "texts"
        for p, what in ((self.split_path, "split file"), (self.mean_path, "Mean file"),
                        (self.std_path, "Std file")):
            if not p.is_file():
                raise FileNotFoundError(f"HumanML3D {what} not found: {p}")
        for p in (self.motion_dir, self.text_dir):
            if not p.is_dir():
                raise FileNotFoundError(f"HumanML3D directory not found: {p}")

        self.min_len, self.max_len = min_len, max_len
        self.normalize, self.seed, self.epoch = normalize, int(seed), 0
        self.lazy, self.length_rule, self.unit_length = lazy, length_rule, unit_length
        self.strict, self.std_eps = strict, std_eps
        self.mean = self._load_stat(self.mean_path)
        self.std = self._load_stat(self.std_path)
        if (self.std < 0).any():
            raise ValueError(f"Std file {self.std_path} has negative entries")
        self.std_safe = np.where(self.std < std_eps, np.float32(1), self.std).astype(np.float32)

        if ids is None:
            with open(self.split_path, encoding="utf-8") as f:
                ids = [ln.strip() for ln in f]
        ids = [i for i in ids if i]
        self.skipped: Counter = Counter()
        self._warn_details: Dict[str, List[str]] = {}
        self.samples: List[_Sample] = []
        for clip_id in ids:
            self._load_clip(clip_id)
        self.skipped = Counter({k: v for k, v in self.skipped.items() if v})
        if self.skipped:
            det = "; ".join(f"{k}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                            for k, v in self._warn_details.items())
            warnings.warn(f"HumanML3D({self.split_path}): kept {len(self.samples)} samples from "
                          f"{len(ids)} ids; skipped {dict(self.skipped)}" + (f" [{det}]" if det else ""),
                          stacklevel=2)
        if not self.samples:
            hi = (f"<= max_len={max_len}" if length_rule == "strict"
                  else f"< {ORIGINAL_MAX_EXCLUSIVE} (length_rule='original')")
            raise ValueError(
                f"HumanML3D split {self.split_path} is empty after filtering: {len(ids)} ids, "
                f"clips need min_len={min_len} <= T_clip < {ORIGINAL_MAX_EXCLUSIVE}, kept samples "
                f"need min_len={min_len} <= T {hi}, finite features and at least one valid "
                f"caption; skipped counts: {dict(self.skipped) or 'none'}")

    # ------------------------------------------------------------------ loading
    def _load_stat(self, path: Path) -> np.ndarray:
        try:
            a = np.load(path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read {path}: {e}") from e
        if np.shape(a) != (NFEATS,):
            raise ValueError(f"{path} must have shape [{NFEATS}], got {list(np.shape(a))}")
        a = np.asarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{path} contains NaN/inf")
        return a

    def _skip(self, reason: str, detail: Optional[str] = None, n: int = 1) -> None:
        self.skipped[reason] += n
        if detail is not None:
            self._warn_details.setdefault(reason, []).append(detail)

    def _keep_len(self, T: int) -> bool:
        if T < self.min_len:
            return False
        if self.length_rule == "strict":
            return T <= self.max_len
        return T < ORIGINAL_MAX_EXCLUSIVE

    def _read_motion(self, path: Path) -> np.ndarray:
        try:
            m = np.load(path, mmap_mode="r" if self.lazy else None)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read motion file {path}: {e}") from e
        if m.ndim != 2 or m.shape[1] != NFEATS:
            raise ValueError(f"motion file {path} must be [T, {NFEATS}] features, got shape "
                             f"{list(m.shape)}")
        return m

    def _read_captions(self, path: Path) -> List[Caption]:
        caps = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    c = parse_caption_line(line, lineno)
                except _LineError as e:
                    msg = f"{path}:{lineno}: malformed caption line {line.rstrip()!r}: {e}"
                    if self.strict:
                        raise ValueError(msg) from None
                    self._skip("bad_caption_line", f"{path.name}:{lineno}")
                    continue
                if not c.text:
                    self._skip("empty_caption_text", f"{path.name}:{lineno}")
                    continue
                if not c.tokens:
                    self.skipped["captions_with_empty_tokens_kept"] += 1
                caps.append(c)
        return caps

    def _load_clip(self, clip_id: str) -> None:
        mpath = self.motion_dir / f"{clip_id}.npy"
        tpath = self.text_dir / f"{clip_id}.txt"
        for p in (mpath, tpath):
            if not p.is_file():
                if self.strict:
                    raise FileNotFoundError(f"HumanML3D file for id {clip_id!r} (split "
                                            f"{self.split_path}) not found: {p}")
                self._skip("missing_file", str(p.name))
                return
        motion = self._read_motion(mpath)
        captions = self._read_captions(tpath)
        if not captions:
            self._skip("no_valid_caption", clip_id)
            return
        T = motion.shape[0]
        if not (self.min_len <= T < ORIGINAL_MAX_EXCLUSIVE):
            # the original's gate: the whole clip's length decides for the clip *and its crops*
            self._skip("clip_length_gate")
            return
        if not bool(np.isfinite(motion).all()):
            self._skip("nonfinite_features", clip_id)
            return
        whole = [c for c in captions if c.whole_clip]
        new: List[_Sample] = []
        if whole:  # a clip without whole-clip captions is only used through its crops
            if self._keep_len(T):
                new.append(_Sample(clip_id, clip_id, 0, T, whole))
            else:
                self._skip("length_filter")
        for c in captions:
            if c.whole_clip:
                continue
            a, b = int(c.start * FPS), min(int(c.end * FPS), T)
            if b <= a:
                self._skip("empty_crop", f"{tpath.name}:{c.line}")  # end <= start or past the end
                continue
            if not self._keep_len(b - a):
                self._skip("length_filter")  # the original drops these crops too
                continue
            new.append(_Sample(f"C{c.line}_{clip_id}", clip_id, a, b, [c]))
        if not self.lazy:
            for s in new:
                s.data = self._prep(np.asarray(motion[s.start:s.stop]))
        self.samples.extend(new)

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.normalize:
            x = (x - self.mean) / self.std_safe
        return np.ascontiguousarray(x, dtype=np.float32)

    # ------------------------------------------------------------------ access
    def set_epoch(self, epoch: int) -> None:
        """Caption and crop choices depend on (seed, epoch, index) only."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_captions(self) -> int:
        return sum(len(s.captions) for s in self.samples)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch & 0xFFFFFFFF, index])

    def __getitem__(self, index: int) -> dict:
        """Returns ``{"motion": float32 [T, 263] tensor, "length": T, "caption": str,
        "tokens": list[str], "id": sample name, "clip_id": source id, "start", "end": seconds}``."""
        if index < 0:
            index += len(self)
        s = self.samples[index]
        rng = self._rng(index)
        cap = s.captions[int(rng.integers(len(s.captions)))]
        if s.data is not None:
            x = s.data
        else:
            x = self._prep(self._read_motion(self.motion_dir / f"{s.clip_id}.npy")[s.start:s.stop])
        T = x.shape[0]
        L = T
        if self.length_rule == "original" and L > self.max_len:
            L = self.max_len
        if self.unit_length:
            L = (L // self.unit_length) * self.unit_length
        if L < T:
            off = int(rng.integers(T - L + 1))
            x = x[off:off + L]
        return {"motion": torch.from_numpy(np.array(x, dtype=np.float32, copy=True)),
                "length": int(L), "caption": cap.text, "tokens": list(cap.tokens),
                "id": s.name, "clip_id": s.clip_id, "start": cap.start, "end": cap.end}

    # ------------------------------------------------------------------ helpers
    def denormalize(self, x: Union[torch.Tensor, np.ndarray]) -> Union[torch.Tensor, np.ndarray]:
        """Inverse of the normalization; the feature axis must be last ([..., 263])."""
        return denormalize(x, self.mean, self.std_safe)

    def normalize_features(self, x: Union[torch.Tensor, np.ndarray]):
        if isinstance(x, torch.Tensor):
            m = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
            s = torch.as_tensor(self.std_safe, dtype=x.dtype, device=x.device)
            return (x - m) / s
        return (np.asarray(x) - self.mean) / self.std_safe

    def summary(self) -> str:
        return (f"HumanML3D(split={self.split_path}, samples={len(self)}, captions="
                f"{self.num_captions}, skipped={dict(self.skipped)})")

    __repr__ = summary


def denormalize(x, mean, std):
    """``x * std + mean`` over the last axis (tensor or array; ``std`` should be the safe std)."""
    if isinstance(x, torch.Tensor):
        m = torch.as_tensor(np.asarray(mean), dtype=x.dtype, device=x.device)
        s = torch.as_tensor(np.asarray(std), dtype=x.dtype, device=x.device)
        return x * s + m
    return np.asarray(x) * np.asarray(std) + np.asarray(mean)


def collate_motions(batch: Sequence[dict], max_len: Optional[int] = None) -> dict:
    """Pad to the batch's max length (or to a fixed ``max_len``) with zeros.

    Returns ``motion`` [B, T, 263] float32, ``mask`` bool [B, T] (True = valid frame),
    ``lengths`` int64 [B], and lists ``captions``, ``tokens``, ``ids``.
    """
    if len(batch) == 0:
        raise ValueError("collate_motions: empty batch")
    lengths = [int(b["motion"].shape[0]) for b in batch]
    T = max(lengths) if max_len is None else int(max_len)
    if max(lengths) > T:
        raise ValueError(f"collate_motions: a motion has {max(lengths)} frames > max_len={T}")
    F = batch[0]["motion"].shape[1]
    motion = torch.zeros(len(batch), T, F, dtype=torch.float32)
    mask = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, (b, L) in enumerate(zip(batch, lengths)):
        motion[i, :L] = b["motion"]
        mask[i, :L] = True
    return {"motion": motion, "mask": mask, "lengths": torch.tensor(lengths, dtype=torch.int64),
            "captions": [b["caption"] for b in batch], "tokens": [b["tokens"] for b in batch],
            "ids": [b["id"] for b in batch]}


def to_mdm_layout(collated: dict) -> dict:
    """MDM's layout: ``motion`` [B, 263, 1, T], ``mask`` bool [B, 1, 1, T]; other keys copied."""
    out = dict(collated)
    out["motion"] = collated["motion"].permute(0, 2, 1).unsqueeze(2).contiguous()
    out["mask"] = collated["mask"][:, None, None, :]
    return out
