"""``SoPoConfig``: every setting of a SoPo fine-tuning run, one field per ``python -m sopo_ext.train``
flag (``--sampling-steps`` is ``sampling_steps``), validated on construction.

    from sopo_ext import SoPoConfig
    config = SoPoConfig(method="sopo", backbone="mld", steps=100, out="runs/mld")
    config = SoPoConfig(preset="official-loss", k=3)      # a preset, one value overridden

Fields whose default is ``None`` take their value from ``preset`` when it sets them, else from
``DEFAULTS``; after construction they hold the resolved value. The CLI's flags and help are made
from these fields (``sopo_ext/train.py``), so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from .methods import METHODS, RENAMED_METHODS, SCALE_REGIMES

__all__ = ["SoPoConfig", "ConfigError", "PRESETS", "RENAMED_PRESETS", "DEFAULTS", "STEP_VERSION"]

#: ``preset``: defaults that fields given explicitly still override.
PRESETS = {
    # the official SoPo release's loss and sampler (reference-facts.md), not its batch size (64),
    # its padding of every motion to 196 frames or its sampling with MDM in train mode (10% text
    # dropout while sampling): hence the name
    "official-loss": dict(k=2, noise="fresh", guidance_scale=1.0, sampler="ddpm", sampling_steps=50),
    # Diffusion-DPO (Wallace et al.) on MoDiPO-style offline pairs: shared noise and t for the
    # four terms, beta_dpo = 5000 folded into scale = 2500 on the backbone's own per-element mean
    # loss (x0 for MDM, eps for MLD; Wallace et al. weight eps, i.e. x0 x SNR(t))
    "diffusion-dpo": dict(method="modipo", scale_regime="diffusion-dpo", beta_dpo=5000.0,
                          noise="shared"),
}
RENAMED_PRESETS = {
    "official": "'official' is now 'official-loss': it sets the release's loss and "
                "sampler, not its batch size (64), padded length (196) or train-mode sampling",
}
#: the values of the ``None``-default fields when no preset sets them.
DEFAULTS = dict(method="sopo", k=4, noise="shared", guidance_scale=1.0, sampler="ddim",
                sampling_steps=8, scale_regime="constant", beta_dpo=5000.0)
#: bumped when the step computes something else for the same settings (2: SFT runs the preference
#: methods' eval-mode forward, x_t is zero at padding, non-finite rewards are left out, z regimes)
STEP_VERSION = 2
#: fields that may differ between a run and its resume (they do not change what it computes).
RESUME_FREE = frozenset({"resume", "out", "device", "threads", "progress", "eval_every", "animation",
                         "stop_after", "ckpt_every", "log_every"})


class ConfigError(ValueError):
    """A setting with a bad value; ``field`` names it (the CLI prints it as its flag)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name} {message}")
        self.field, self.message = field_name, message


def _f(default, help: str, *, choices=None, cli: str = "flag"):
    """A documented field; ``help`` is also the flag's --help text. ``cli``: "flag" (a flag),
    "hidden" (a flag left out of --help and of recorded commands), "none" (not a flag)."""
    meta = {"help": help, "choices": choices, "cli": cli}
    return field(default=default, metadata=meta)


@dataclass
class SoPoConfig:
    """Everything ``SoPoTrainer`` and ``python -m sopo_ext.train`` need to know about a run."""

    # ---- what is trained, on what ----------------------------------------------------------
    method: Optional[str] = _f(None, "default sopo; modipo = offline pairs of the frozen reference "
                               "(MoDiPO), formerly called diffusion-dpo", choices=sorted(METHODS))
    backbone: str = _f("mdm", "the model kind: mdm (motion space) or mld (latent), or "
                       "mdm-official: the released MDM (GuyTevet/motion-diffusion-model; --base is its "
                       "save directory or model*.pt, or a fine-tune of it), mld-official: the released "
                       "MLD (ChenFengYe/motion-latent-diffusion; --base is its .ckpt)",
                       choices=("mdm", "mld", "mdm-official", "mld-official"))
    preset: Optional[str] = _f(
        None, "official-loss: the official release's K=2, fresh noise per loss term, no CFG, "
        "50-step ancestral sampling (not its batch 64 / 196-frame padding / train-mode sampling); "
        "diffusion-dpo: Wallace et al.'s settings on offline pairs (method modipo, scale regime "
        "diffusion-dpo, beta_dpo 5000, shared noise and t; the loss stays the backbone's own: x0 "
        "for MDM, eps for MLD)", choices=sorted(PRESETS))
    data: str = _f("builtin", "'builtin' (default) or a HumanML3D directory")
    base: Optional[str] = _f(None, "backbone checkpoint (default: the bundled one)")
    reward: Optional[str] = _f(None, "reward checkpoint (default: the bundled one); 'oracle' (or "
                               "'oracle:<reward checkpoint>' for its embeddings): the built-in data's "
                               "geometric judge as the reward, a diagnostic upper bound")
    evaluator: Optional[str] = _f(None, "evaluator checkpoint (default: bundled; 'none' skips evaluation)")
    text_encoder: str = _f("minilm", "only used when the checkpoints do not name one")
    clip_weights: Optional[str] = _f(None, "a local copy of the released model's CLIP (default: downloaded "
                                     "from the Hugging Face hub on first use): mdm-official, ViT-B/32's "
                                     "open_clip_model.safetensors (timm/vit_base_patch32_clip_224.openai); "
                                     "mld-official, the directory of openai/clip-vit-large-patch14")
    clip_precision: str = _f("fp32", "mdm-official: CLIP's matrices in fp16 (the release's numerics on "
                             "its GPU) or fp32", choices=("fp32", "fp16"))
    distilbert: str = _f("distilbert-base-uncased", "--reward tmr-official:DIR: the DistilBERT its "
                         "text side reads (a Hugging Face name, downloaded on first use, or a local copy)")
    mask_frames: Optional[bool] = _f(None, "mdm-official: mask padded frames in attention (default: "
                                     "what the release's args.json says; the paper's humanml_trans_enc_512 "
                                     "does not mask, its 50-step models do)")
    out: Optional[str] = _f(None, "output directory (default runs/train-<method>-<backbone>)")

    # ---- the preference step ---------------------------------------------------------------
    k: Optional[int] = _f(None, "online samples per caption (default 4)")
    tau: float = _f(0.45, "reward threshold of a valuable unpreferred sample")
    c: float = _f(2.0, "beta_w = beta (C - S)")
    beta: float = _f(1.0, "the beta of beta_w = beta (C - S)")
    scale: float = _f(1.0, "the constant of scale_regime constant (default 1: the official "
                      "release, the linear regime of the sigmoid)")
    scale_regime: Optional[str] = _f(
        None, "how z is scaled (default constant): constant = scale; diffusion-dpo = beta_dpo / 2 "
        "(saturating); paper = T * omega_t per timestep (Eq. 16: T * SNR(t) on MDM's x0 loss, T on "
        "MLD's eps loss). metrics.csv logs z's mean and |z| quantiles, sigmoid(-z) and the implicit "
        "accuracy, so a run shows its regime", choices=SCALE_REGIMES)
    beta_dpo: Optional[float] = _f(None, "Diffusion-DPO's beta (default 5000)")
    sampling_steps: Optional[int] = _f(None, "sampling steps of the online samples (default 8)")
    sampler: Optional[str] = _f(None, "default ddim", choices=("ddim", "ddpm"))
    guidance_scale: Optional[float] = _f(None, "CFG of the online samples (default 1: none)")
    noise: Optional[str] = _f(None, "default shared", choices=("shared", "fresh"))
    cond_drop: float = _f(0.0, "CFG text dropout while fine-tuning, the same rule for every method "
                          "(SFT included): each caption dropped with this probability, for the "
                          "policy and the reference alike (default 0; the policy runs without "
                          "dropout in every method)")

    # ---- optimisation ------------------------------------------------------------------------
    lr: float = _f(1e-4, "AdamW learning rate (peak of the warmup-cosine schedule)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup: int = _f(20, "linear warmup steps")
    grad_clip: float = _f(1.0, "gradient norm clip")
    batch_size: int = _f(16, "captions per step (over all processes)")
    steps: int = _f(200, "optimizer steps")
    max_len: int = _f(196, "longest motion, in frames (longer ones are cropped)")
    seed: int = _f(0, "every random draw of the run derives from it")
    device: str = _f("auto", "auto (this process's GPU, else the CPU), cpu, cuda, cuda:1, ...")
    threads: Optional[int] = _f(None, "torch CPU threads (default: torch's)")
    bf16: bool = _f(False, "bf16 autocast for the model forwards")

    # ---- evaluation, logging, checkpoints ----------------------------------------------------
    eval_steps: int = _f(20, "DDIM steps of the evaluation samples")
    eval_guidance: float = _f(2.5, "CFG scale of the evaluation samples")
    eval_samples: Optional[int] = _f(None, "evaluate on the first N test samples (>= 32)")
    eval_every: int = _f(0, "also evaluate every N steps")
    eval_before: bool = _f(True, "evaluate the base model before training")
    eval_after: bool = _f(True, "evaluate the fine-tuned model after training")
    animation: bool = _f(True, "write base-vs-fine-tuned GIFs at the end")
    ckpt_every: int = _f(50, "save the resumable checkpoint every N steps")
    log_every: int = _f(10, "read the step statistics back (one host sync) every N steps; every "
                        "step is logged")
    resume: bool = _f(False, "continue the run in out/ from its last checkpoint")
    stop_after: Optional[int] = _f(None, "stop after N more steps (tests of --resume)", cli="hidden")
    progress: bool = _f(True, "show a progress bar")
    step_version: int = _f(STEP_VERSION, "recorded with the run: a resume refuses another version",
                           cli="none")

    def __post_init__(self):
        if self.method in RENAMED_METHODS:
            raise ConfigError("method", RENAMED_METHODS[self.method])
        if self.preset in RENAMED_PRESETS:
            raise ConfigError("preset", RENAMED_PRESETS[self.preset])
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f.name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        resolved = dict(DEFAULTS, **(PRESETS[self.preset] if self.preset else {}))
        for name, value in resolved.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.out is None:
            self.out = f"runs/train-{self.method}-{self.backbone}"
        self._validate()

    def _validate(self) -> None:
        for name in ("steps", "batch_size", "k", "sampling_steps", "ckpt_every", "log_every",
                     "eval_steps", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("scale", "beta_dpo", "beta", "lr", "grad_clip"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(name, f"must be positive, got {v}")
        for name in ("tau", "c", "guidance_scale", "eval_guidance", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(name, f"must be finite, got {getattr(self, name)}")
        if self.scale_regime != "constant" and self.scale != 1.0:
            raise ConfigError("scale", f"{self.scale} is the constant of scale regime constant; "
                              f"scale regime {self.scale_regime} sets the scale itself")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ConfigError("cond_drop", f"must be in [0, 1), got {self.cond_drop}")
        if self.eval_samples is not None and self.eval_samples < 32:
            raise ConfigError("eval_samples", "must be >= 32 (R-precision uses batches of 32)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", f"must be >= 1, got {self.threads}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError("stop_after", f"must be >= 1, got {self.stop_after}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "SoPoConfig":
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> dict:
        """The settings that determine the run's result (compared by a resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE}

    def command(self) -> str:
        """``python -m sopo_ext.train`` with the flags that reproduce this config."""
        import shlex
        from ._cli import config_flags
        # method, backbone and preset first: the defaults of the others follow from them
        first = ("method", "backbone", "preset")
        head = SoPoConfig(**{k: getattr(self, k) for k in first})
        flags = config_flags(head, SoPoConfig(), only=first) + config_flags(self, head)
        return " ".join(["python -m sopo_ext.train", *(shlex.quote(a) for a in flags)])
