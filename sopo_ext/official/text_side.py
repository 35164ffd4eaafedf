"""The text side of a run, shared by the trainer and ``evaluate``: which text encoders it uses
and what a released backbone needs from them.

* :func:`build_text_encoder`: a text encoder by the name a checkpoint stores, with the options
  the released models' encoders take (``--clip-weights`` / ``--clip-precision`` for CLIP,
  ``--distilbert`` for the released TMR and the DistilBERT MDM).
* :func:`text_encoders`: the backbone's encoder, and the reward's own when the reward names
  another one (a released MDM reads CLIP features, the bundled reward MiniLM ones); batches then
  carry both (``MotionTextBatches(reward_text_encoder=...)``).
* :func:`prepare_backbone_text`: what a released backbone needs besides the cached embeddings:
  the released MLD's null condition (its text encoder's features of ``""``), the DistilBERT MDM's
  DistilBERT.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

__all__ = ["build_text_encoder", "text_encoders", "prepare_backbone_text"]


def build_text_encoder(name: str, *, clip_weights: Optional[str] = None, clip_precision: Optional[str] = None,
                       distilbert: Optional[str] = None):
    """``sopo_ext.models.text.get_text_encoder(name)``, the released models' options applied:
    a local CLIP (``mdm-clip`` / ``mld-clip``), MDM's CLIP precision, a local DistilBERT."""
    from ..models.text import get_text_encoder
    kw = {}
    if name in ("mdm-clip", "mld-clip") and clip_weights:
        name = f"{name}:{clip_weights}"
    if name.startswith(("tmr-official:", "mdm-bert")) and distilbert:
        kw["distilbert"] = distilbert
    if name.startswith("mdm-clip") and clip_precision:
        kw["precision"] = clip_precision
    return get_text_encoder(name, **kw)


def text_encoders(backbone: str, backbone_names: Optional[str], reward_names: Iterable[Optional[str]],
                  **options) -> Tuple[object, Optional[object]]:
    """(the backbone's text encoder, the reward's own or None). ``backbone`` is the encoder to
    build for the backbone; ``backbone_names`` the one its checkpoint names (None: it names none,
    and the reward reads the same embeddings); ``reward_names`` those the reward models name.
    ``options``: :func:`build_text_encoder`'s."""
    enc = build_text_encoder(backbone, **options)
    others = {n for n in reward_names if n is not None}
    if len(others) > 1:
        raise ValueError(f"the reward models (--reward, --also-reward) use different text encoders "
                         f"{sorted(others)}: evaluate them in separate runs")
    if backbone_names is None or not others or backbone_names in others:
        return enc, None
    return enc, build_text_encoder(others.pop(), distilbert=options.get("distilbert"))


def prepare_backbone_text(model, text_encoder, distilbert: Optional[str] = None, device="cpu") -> None:
    """Give a released backbone what its text side needs besides the cached embeddings (see the
    module docstring); other backbones need nothing."""
    if hasattr(model, "set_null_text") and not bool(getattr(model, "null_ready", 1)):
        model.set_null_text(text_encoder.encode([""])[0])
    if getattr(getattr(model, "config", None), "text_encoder_type", None) == "bert":
        from .text import DistilBertFeatures
        model.attach_text_model(DistilBertFeatures(distilbert or "distilbert-base-uncased", device=str(device)))
