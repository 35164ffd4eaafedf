"""Loading the released MDM save directories (GuyTevet/motion-diffusion-model).

A release is a directory such as ``save/humanml_trans_enc_512/`` with ``args.json`` (the
training arguments) and one or more ``model<step>.pt`` (``torch.save`` of the state dict without
the CLIP weights; with ``--use_ema``, a dict ``{'model': ..., 'model_avg': ...}``).
:func:`load_mdm_release` takes the directory or one ``.pt`` inside it and returns a
:class:`sopo_ext.checkpoint.Checkpoint` holding an :class:`OfficialMDM` with those weights and,
in its meta, the diffusion the release samples with (cosine, ``diffusion_steps``, x0) and the text
encoder it needs. The ``.pt`` is read with ``torch.load(weights_only=True)``: it cannot run code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Tuple, Union

from ..checkpoint import Checkpoint, CheckpointError
from ..safe_load import load_weights
from .mdm import OfficialMDM, OfficialMDMConfig

__all__ = ["MDM_RELEASES", "find_mdm_release", "mdm_config_from_args", "load_mdm_release",
           "is_mdm_release", "load_official_backbone"]

PathLike = Union[str, Path]

#: where the release publishes its checkpoints (README of GuyTevet/motion-diffusion-model)
MDM_RELEASES = ("https://github.com/GuyTevet/motion-diffusion-model#3-download-the-pretrained-models "
                "(e.g. humanml-encoder-512, or humanml-encoder-512-50steps; unzip into ./save/)")

#: the release parser's defaults for fields older args.json files do not have
_ARGS_DEFAULTS = {"arch": "trans_enc", "text_encoder_type": "clip", "emb_trans_dec": False,
                  "layers": 8, "latent_dim": 512, "cond_mask_prob": 0.1, "mask_frames": False,
                  "pos_embed_max_len": 5000, "diffusion_steps": 1000, "noise_schedule": "cosine",
                  "sigma_small": True, "use_ema": False, "dataset": "humanml", "unconstrained": False,
                  "context_len": 0, "pred_len": 0, "multi_target_cond": False}
_NJOINTS = {"humanml": 263, "kit": 251}


def _step_of(p: Path) -> int:
    m = re.search(r"(\d+)", p.stem)
    return int(m.group(1)) if m else -1


def find_mdm_release(path: PathLike) -> Tuple[Path, Path]:
    """(the ``.pt`` to load, its ``args.json``). A directory gives its latest ``model*.pt``."""
    p = Path(path)
    if p.is_dir():
        pts = sorted(p.glob("model*.pt"), key=_step_of)
        if not pts:
            raise FileNotFoundError(f"no model*.pt in {p}: an MDM release directory holds "
                                    f"model<step>.pt and args.json; download one from {MDM_RELEASES}")
        pt = pts[-1]
    elif p.is_file():
        pt = p
    else:
        raise FileNotFoundError(f"MDM release not found: {p} (a directory with model<step>.pt and "
                                f"args.json, or the .pt itself; download one from {MDM_RELEASES})")
    args = pt.parent / "args.json"
    if not args.is_file():
        raise FileNotFoundError(f"{args} is missing: the release keeps its training arguments "
                                f"next to {pt.name} (they are in the same zip, {MDM_RELEASES})")
    return pt, args


def is_mdm_release(path: PathLike) -> bool:
    """True for a directory with ``args.json`` and a ``model*.pt``, or a ``.pt`` beside an
    ``args.json`` (the release's layout, not this package's checkpoint directories)."""
    p = Path(path)
    if p.is_dir():
        return (p / "args.json").is_file() and any(p.glob("model*.pt"))
    return p.suffix == ".pt" and (p.parent / "args.json").is_file()


def mdm_config_from_args(args: dict, mask_frames: Optional[bool] = None) -> OfficialMDMConfig:
    """The model of an ``args.json`` (the release's ``get_model_args`` for text conditioning)."""
    a = {**_ARGS_DEFAULTS, **args}
    if a["dataset"] not in _NJOINTS:
        raise CheckpointError(f"args.json: dataset {a['dataset']!r} is action-conditioned; only the "
                              f"text-to-motion releases ({sorted(_NJOINTS)}) are supported")
    if a["unconstrained"]:
        raise CheckpointError("args.json: an unconstrained (unconditional) MDM; SoPo needs text conditioning")
    if a["context_len"] or a["pred_len"] or a["multi_target_cond"]:
        raise CheckpointError("args.json: a prefix-completion / target-conditioned model (DiP); "
                              "only the text-to-motion MDM releases are supported")
    return OfficialMDMConfig(
        nfeats=_NJOINTS[a["dataset"]], latent_dim=int(a["latent_dim"]),
        ff_size=int(a.get("ff_size", 1024)), num_layers=int(a["layers"]), num_heads=4,
        dropout=0.1, activation="gelu", arch=a["arch"], emb_trans_dec=bool(a["emb_trans_dec"]),
        text_encoder_type=a["text_encoder_type"], cond_mask_prob=float(a["cond_mask_prob"]),
        mask_frames=bool(a["mask_frames"]) if mask_frames is None else bool(mask_frames),
        pos_embed_max_len=int(a["pos_embed_max_len"]),
        max_frames=min(196, int(a["pos_embed_max_len"]) - 1))  # the table bounds the frames


def _release_diffusion(a: dict) -> dict:
    if a["noise_schedule"] not in ("cosine", "linear"):
        raise CheckpointError(f"args.json: noise_schedule {a['noise_schedule']!r} is not one of the "
                              "release's (cosine, linear)")
    # the release's "linear" is the DDPM one scaled to 1000 steps: 1e-4 * 1000 / T .. 0.02 * 1000 / T
    scale = 1000 / int(a["diffusion_steps"])
    extra = {} if a["noise_schedule"] == "cosine" else {"beta_start": 1e-4 * scale, "beta_end": 0.02 * scale}
    return {"num_steps": int(a["diffusion_steps"]), "schedule": a["noise_schedule"], "prediction": "x0",
            **extra}


def load_mdm_release(path: PathLike, *, mask_frames: Optional[bool] = None, use_avg: Optional[bool] = None,
                     map_location="cpu") -> Checkpoint:
    """The released MDM at ``path`` (a save directory or a ``model*.pt`` with ``args.json`` beside
    it) as a Checkpoint of kind ``mdm_official`` (eval mode).

    ``mask_frames``: mask padded frames in attention (default: what ``args.json`` says; the
    release's main model does not). ``use_avg``: load the EMA weights of a ``--use_ema`` release
    (default: ``args.json``'s ``use_ema``, as the release's ``generate`` does)."""
    pt, args_path = find_mdm_release(path)
    try:
        args = json.loads(args_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{args_path} is not a readable JSON file: {e}") from e
    if not isinstance(args, dict):
        raise CheckpointError(f"{args_path} must hold a JSON object of training arguments")
    a = {**_ARGS_DEFAULTS, **args}
    config = mdm_config_from_args(args, mask_frames)
    diffusion = _release_diffusion(a)
    if config.pos_embed_max_len < diffusion["num_steps"]:
        raise CheckpointError(f"{args_path}: pos_embed_max_len {config.pos_embed_max_len} < "
                              f"diffusion_steps {diffusion['num_steps']} (the timestep indexes the table)")
    raw = load_weights(pt, what="MDM release checkpoint")
    avg = a["use_ema"] if use_avg is None else use_avg
    if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
        if avg and "model_avg" not in raw:
            raise CheckpointError(f"{pt} has no 'model_avg' (EMA) weights; pass use_avg=False")
        raw = raw["model_avg"] if avg else raw["model"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{pt} does not hold a state dict ({type(raw).__name__})")
    # the release's load_model_wo_clip: the fixed positional tables are rebuilt, not loaded, and
    # the CLIP / BERT weights are not part of the release
    state = {k: v for k, v in raw.items() if not k.startswith("clip_model.")
             and k not in ("sequence_pos_encoder.pe", "embed_timestep.sequence_pos_encoder.pe")}
    model = OfficialMDM(config)
    want = {k: v for k, v in model.state_dict().items() if "sequence_pos_encoder.pe" not in k}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [(k, tuple(state[k].shape), tuple(want[k].shape)) for k in sorted(set(want) & set(state))
             if tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{pt} does not fit the MDM its args.json describes ({args_path}): "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    model.load_state_dict(state, strict=False)
    model.to(map_location).eval()
    meta = {"diffusion": diffusion, "text_encoder": f"mdm-{config.text_encoder_type}",
            "release": {"path": str(pt), "args": args, "use_avg": bool(avg)},
            "official": "GuyTevet/motion-diffusion-model"}
    return Checkpoint(model=model, kind=OfficialMDM.kind, config=config, meta=meta, path=pt.parent)



def load_official_backbone(spec: PathLike, *, mask_frames: Optional[bool] = None,
                           map_location="cpu") -> Checkpoint:
    """``--backbone mdm-official --base SPEC``: a released save directory (or its ``.pt``), or a
    fine-tune of one saved by this package (kind ``mdm_official``)."""
    from ..checkpoint import load_checkpoint
    if spec is None:
        raise FileNotFoundError(f"--backbone mdm-official needs --base: a released MDM save directory "
                                f"(args.json and model<step>.pt) or its .pt; download one from {MDM_RELEASES}")
    if is_mdm_release(spec):
        return load_mdm_release(spec, mask_frames=mask_frames, map_location=map_location)
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"--base {p} not found: give a released MDM save directory (args.json "
                                f"and model<step>.pt; {MDM_RELEASES}) or a fine-tune saved by sopo_ext")
    overrides = None if mask_frames is None else {"mask_frames": bool(mask_frames)}
    return load_checkpoint(p, OfficialMDM.kind, map_location=map_location, config_overrides=overrides)
