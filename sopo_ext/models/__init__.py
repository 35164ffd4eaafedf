"""Models for text-to-motion SoPo: the backbones that are fine-tuned, the reward model that
judges them and the evaluator that measures them.

    mdm.MDM                 MDM-style transformer denoiser over frames, predicts x0
    mld.MLD                 MLD-style motion VAE + latent transformer denoiser, predicts eps
    tmr.TMR                 TMR-style text/motion contrastive encoders: the reward model
    evaluator.MotionTextEvaluator   T2M-style evaluator (conv + GRU), for metrics only
    text                    caption encoders (frozen all-MiniLM-L6-v2 by default), cached

Conventions shared by all of them: motions are normalized features ``[B, T, 263]`` with a bool
padding mask ``[B, T]`` (True = valid frame); captions enter as precomputed sentence embeddings
``text_emb [B, D_text]`` (the evaluator reads word/POS tokens instead, like T2M). Denoisers have
``forward(x_t, t, text_emb, mask=None, uncond=None)``. Every model has a dataclass ``config``
and a ``kind`` string, which is what :mod:`sopo_ext.checkpoint` stores.

Submodules are imported on demand, so ``import sopo_ext.models`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Tuple

__all__ = ["KINDS", "model_classes", "build_model", "family"]

#: kind -> (submodule, config class, model class)
KINDS = {
    "mdm": ("mdm", "MDMConfig", "MDM"),
    "mld": ("mld", "MLDConfig", "MLD"),
    "mld_vae": ("mld", "MotionVAEConfig", "MotionVAE"),
    "mld_denoiser": ("mld", "LatentDenoiserConfig", "LatentDenoiser"),
    "tmr": ("tmr", "TMRConfig", "TMR"),
    "evaluator": ("evaluator", "EvaluatorConfig", "MotionTextEvaluator"),
    # the released architectures (sopo_ext.official), saved by this package once fine-tuned
    "mdm_official": ("sopo_ext.official.mdm", "OfficialMDMConfig", "OfficialMDM"),
    "mld_official": ("sopo_ext.official.mld_backbone", "OfficialMLDConfig", "OfficialMLD"),
}


def model_classes(kind: str) -> Tuple[type, type]:
    """(config class, model class) of a model kind; KeyError naming the known kinds."""
    if kind not in KINDS:
        raise KeyError(f"unknown model kind {kind!r}; known kinds: {sorted(KINDS)}")
    module, cfg, cls = KINDS[kind]
    mod = importlib.import_module(module if "." in module else f"{__name__}.{module}")
    return getattr(mod, cfg), getattr(mod, cls)


def family(model) -> "str | None":
    """The backbone family of a model (or a loaded Checkpoint): "mdm" (denoises frames-major
    motion ``[B, T, F]``) or "mld" (denoises a VAE latent). A released architecture
    (``sopo_ext.official``) has its own ``kind`` and says its family; the built-in ones are their kind."""
    model = getattr(model, "model", model)
    return getattr(model, "family", getattr(model, "kind", None))


def build_model(kind: str, config=None, **overrides):
    """A fresh model of ``kind`` from a config instance (or the defaults plus ``overrides``)."""
    config_cls, model_cls = model_classes(kind)
    if config is None:
        config = config_cls(**overrides)
    elif overrides:
        raise ValueError("pass either a config or keyword overrides, not both")
    return model_cls(config)
