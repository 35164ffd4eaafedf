"""Model checkpoints: safetensors weights plus a JSON config, written atomically, loaded with
errors that say what is wrong.

A checkpoint is a directory::

    <dir>/model.safetensors   the model's state dict (float32), plus the data normalization the
                              model was trained with under the reserved keys ``_data.mean`` and
                              ``_data.std`` (a model is only meaningful on features normalized
                              the same way)
    <dir>/config.json         {"format": "sopo_ext.checkpoint", "version": 1, "kind": "mdm",
                               "config": {...the model's config dataclass...},
                               "meta": {...how it was made: command, seed, steps, metrics...}}

Why a directory and not one file: the config is human-readable and diffable, and safetensors
cannot hold nested JSON cleanly. Writes go to a temporary sibling directory that is renamed into
place (``os.rename`` of a directory is atomic on POSIX), so a killed run leaves either the old
checkpoint or the new one, never half of each.

Training state for ``--resume`` (optimizer, scheduler, RNG, step) is a separate
``train_state.pt`` inside the same directory (torch.save of nested dicts of tensors and plain
values, which safetensors cannot hold; it is never shipped). It is read with
``torch.load(weights_only=True)`` (``sopo_ext.safe_load``): a resume file cannot run code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .models import model_classes

__all__ = ["FORMAT", "VERSION", "Checkpoint", "save_checkpoint", "load_checkpoint", "load_model",
           "config_to_dict", "config_from_dict", "bundled_checkpoint_dir", "BUNDLED",
           "atomic_write_text", "check_normalization", "CheckpointError", "recover"]

FORMAT = "sopo_ext.checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
_MEAN_KEY, _STD_KEY = "_data.mean", "_data.std"

#: the checkpoints shipped inside the package (``sopo_ext/checkpoints/<name>``), name -> kind.
BUNDLED = {"mdm": "mdm", "mld": "mld", "reward": "tmr", "reward-detail": "tmr", "evaluator": "evaluator"}

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint exists but does not fit: wrong model kind, shapes, config or format."""


# ------------------------------------------------------------------------------------ configs
def config_to_dict(config) -> Dict[str, Any]:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return dataclasses.asdict(config)


def config_from_dict(cls, data: Dict[str, Any], where: str = "config"):
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclass fields.

    Unknown fields are an error (a config from another model or version must not load silently);
    missing fields take the dataclass defaults (configs may gain fields with defaults).
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {unknown} for {cls.__name__} "
                              f"(known: {sorted(names)})")
    kwargs = {}
    for name, value in data.items():
        typ = hints.get(name)
        if dataclasses.is_dataclass(typ) and isinstance(value, dict):
            value = config_from_dict(typ, value, f"{where}.{name}")
        elif isinstance(value, list) and typing.get_origin(typ) is tuple:
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid {cls.__name__}: {e}") from e


# ------------------------------------------------------------------------------------ writing
def atomic_write_text(path: PathLike, text: str) -> None:
    """Write a text file so readers see the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _normalization_tensors(mean, std) -> Dict[str, torch.Tensor]:
    out = {}
    for key, v in ((_MEAN_KEY, mean), (_STD_KEY, std)):
        if v is not None:
            out[key] = torch.as_tensor(v, dtype=torch.float32).detach().cpu().contiguous()
    return out


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes the directory 0700 and safetensors files may be 0600: give the checkpoint
    the permissions of a normally created directory (umask applies), so it can be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def recover(directory: PathLike) -> bool:
    """Undo an interrupted replacement: :func:`save_checkpoint` moves the previous checkpoint to
    ``.<name>.old-<pid>`` and the new one into place with two renames; a kill between them
    leaves no ``<name>``. Put the previous one back (True if something was recovered)."""
    directory = Path(directory)
    if directory.exists() or not directory.parent.is_dir():
        return False
    olds = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)
    for old in reversed(olds):
        if (old / CONFIG).is_file() and (old / WEIGHTS).is_file():
            os.rename(old, directory)
            return True
    return False


def save_checkpoint(directory: PathLike, model: nn.Module, *, meta: Optional[dict] = None,
                    mean=None, std=None, train_state: Optional[dict] = None) -> Path:
    """Write ``model`` (which must have ``kind`` and a dataclass ``config``) to ``directory``.

    Replaces an existing checkpoint there atomically. ``train_state`` (optional) is saved next to
    the weights for resuming.
    """
    from safetensors.torch import save_file

    kind = getattr(model, "kind", None)
    if not isinstance(kind, str):
        raise TypeError(f"{type(model).__name__} has no string attribute 'kind'")
    model_classes(kind)  # an unregistered kind could never be loaded again
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.data_ptr() in seen:  # a buffer registered under two names (the
            v = v.clone()                       # released MDM's pe): safetensors wants one each
        seen.add(v.data_ptr())
        state[k] = v
    reserved = [k for k in state if k.startswith("_data.")]
    if reserved:
        raise ValueError(f"state dict keys {reserved} clash with the reserved '_data.' prefix")
    state.update(_normalization_tensors(mean, std))
    doc = {"format": FORMAT, "version": VERSION, "kind": kind,
           "config": config_to_dict(model.config), "meta": meta or {}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "kind": kind})
        (tmp / CONFIG).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        _default_permissions(tmp)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.rename(directory, old)
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ------------------------------------------------------------------------------------ loading
@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and everything stored with it."""
    model: nn.Module
    kind: str
    config: Any
    meta: dict
    path: Path
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def train_state(self, map_location="cpu") -> Optional[dict]:
        p = self.path / TRAIN_STATE
        if not p.is_file():
            return None
        # resume files hold tensors, numbers and containers only (optim.rng_state stores numpy's
        # state as plain values); older ones hold numpy's state tuple: its arrays are allowed
        from .safe_load import NUMPY_ARRAYS, load_weights
        return load_weights(p, map_location, allow=NUMPY_ARRAYS, what="resume state")


def _resolve(path: PathLike) -> Path:
    p = Path(path)
    recover(p)
    if p.is_file() and p.name in (WEIGHTS, CONFIG):
        p = p.parent
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p} (expected a directory with "
                                f"{WEIGHTS} and {CONFIG})")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is a file; expected a directory with "
                              f"{WEIGHTS} and {CONFIG}")
    for name in (CONFIG, WEIGHTS):
        if not (p / name).is_file():
            raise FileNotFoundError(f"checkpoint {p} is incomplete: {name} is missing")
    return p


def read_config(path: PathLike) -> dict:
    """The parsed ``config.json`` of a checkpoint directory (format-checked)."""
    p = _resolve(path)
    try:
        doc = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p / CONFIG} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{p / CONFIG} is not a sopo_ext checkpoint config "
                              f"(format={doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{p / CONFIG}: checkpoint format version {doc.get('version')!r}, "
                              f"this sopo_ext reads version {VERSION}")
    for key in ("kind", "config"):
        if key not in doc:
            raise CheckpointError(f"{p / CONFIG} has no '{key}' entry")
    return doc


def _shape_report(model: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[str]:
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [(k, tuple(state[k].shape), tuple(want[k].shape)) for k in sorted(set(want) & set(state))
             if tuple(state[k].shape) != tuple(want[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        parts.append(f"{len(wrong)} with wrong shape (e.g. " +
                     ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in wrong[:3]) + ")")
    return "; ".join(parts)


def load_checkpoint(path: PathLike, kind: Optional[str] = None, *, map_location="cpu",
                    config_overrides: Optional[dict] = None) -> Checkpoint:
    """Load a checkpoint directory (or a bundled name: ``"mdm"``, ``"mld"``, ``"reward"``,
    ``"reward-detail"``, ``"evaluator"``). ``kind`` checks the model type. The model is returned in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if isinstance(path, str) and path in BUNDLED and not Path(path).exists():
        path = bundled_checkpoint_dir(path)
    p = _resolve(path)
    doc = read_config(p)
    if kind is not None and doc["kind"] != kind:
        raise CheckpointError(f"checkpoint {p} holds a {doc['kind']!r} model, expected {kind!r}")
    try:
        config_cls, model_cls = model_classes(doc["kind"])
    except KeyError as e:
        raise CheckpointError(f"checkpoint {p}: {e.args[0]}") from None
    cfg_dict = dict(doc["config"])
    if config_overrides:
        cfg_dict.update(config_overrides)
    config = config_from_dict(config_cls, cfg_dict, f"{p / CONFIG}: config")
    try:
        state = load_file(str(p / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p / WEIGHTS} is not a readable safetensors file: {e}") from e
    mean, std = state.pop(_MEAN_KEY, None), state.pop(_STD_KEY, None)
    model = model_cls(config)
    report = _shape_report(model, state)
    if report is not None:
        raise CheckpointError(f"checkpoint {p} does not fit a {doc['kind']!r} model built from its "
                              f"config: {report}")
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    return Checkpoint(model=model, kind=doc["kind"], config=config, meta=doc.get("meta", {}),
                      path=p, mean=mean, std=std)


def load_model(path: PathLike, kind: Optional[str] = None, *, map_location="cpu") -> nn.Module:
    """Just the model of :func:`load_checkpoint` (eval mode)."""
    return load_checkpoint(path, kind, map_location=map_location).model


def bundled_checkpoint_dir(name: str) -> Path:
    """Directory of a checkpoint shipped with the package (``mdm``, ``mld``, ``reward``,
    ``evaluator``)."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled checkpoint {name!r}; choices: {sorted(BUNDLED)}")
    p = Path(__file__).resolve().parent / "checkpoints" / name
    if not (p / CONFIG).is_file():
        raise FileNotFoundError(
            f"bundled checkpoint {name!r} is missing at {p}; make it with "
            f"`python -m sopo_ext.pretrain {'reward' if name == 'reward' else name} --out {p}` "
            f"(see sopo_ext/checkpoints/README.md)")
    return p


def check_normalization(ckpt: Checkpoint, mean, std, *, what: str = "data", atol: float = 1e-4) -> None:
    """Raise if ``ckpt`` was trained on features normalized with another Mean/Std than ``what``'s
    (a model on differently normalized data produces garbage without any error otherwise)."""
    if ckpt.mean is None or ckpt.std is None:
        return
    m = torch.as_tensor(mean, dtype=torch.float32).cpu()
    s = torch.as_tensor(std, dtype=torch.float32).cpu()
    if m.shape != ckpt.mean.shape or s.shape != ckpt.std.shape:
        raise CheckpointError(f"checkpoint {ckpt.path} was trained on {ckpt.mean.numel()}-d "
                              f"features, {what} has {m.numel()}-d Mean/Std")
    dm = (m - ckpt.mean).abs().max().item()
    ds = (s - ckpt.std).abs().max().item()
    if dm > atol or ds > atol:
        raise CheckpointError(
            f"checkpoint {ckpt.path} ({ckpt.kind}) was trained with another feature normalization "
            f"than {what} (max |dMean| = {dm:.3g}, max |dStd| = {ds:.3g}); use a checkpoint "
            f"trained on this dataset or pretrain one with `python -m sopo_ext.pretrain`")
