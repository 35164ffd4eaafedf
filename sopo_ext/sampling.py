"""Generate motions from a text-to-motion backbone (MDM-style or MLD-style) in one batched loop.

``generate(model, diffusion, text_emb, mask, ...)`` returns normalized features ``[N, T, 263]``
(zero at padded frames) for either backbone: an MDM denoises the frames directly; an MLD
denoises its latent and decodes it to the requested lengths. The trainer asks for B*K samples by
repeating captions and masks K times (``repeat_interleave``), so all online samples of a SoPo
step share one sampling loop.
"""
from __future__ import annotations

from typing import Optional

import torch

from .diffusion import DiffusionConfig, GaussianDiffusion
from .models import family

__all__ = ["generate", "diffusion_from_meta"]


def diffusion_from_meta(meta: dict, default: Optional[DiffusionConfig] = None) -> GaussianDiffusion:
    """The diffusion a backbone checkpoint was trained with (stored in its ``meta["diffusion"]``)."""
    cfg = meta.get("diffusion") if isinstance(meta, dict) else None
    if cfg is None:
        if default is None:
            raise ValueError("the checkpoint's meta has no 'diffusion' entry; pass the diffusion "
                             "settings it was trained with")
        return GaussianDiffusion(default)
    from .checkpoint import config_from_dict
    return GaussianDiffusion(config_from_dict(DiffusionConfig, cfg, "meta.diffusion"))


@torch.no_grad()
def generate(model, diffusion: GaussianDiffusion, text_emb: torch.Tensor, mask: torch.Tensor, *,
             steps: Optional[int] = 50, sampler: str = "ddim", eta: float = 0.0,
             guidance_scale: float = 1.0, generator: Optional[torch.Generator] = None,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample one motion per row of ``text_emb`` with the frame mask ``mask [N, T]``.

    ``noise`` (optional) is the initial x_T: ``[N, T, F]`` for an MDM, the latent shape for an
    MLD. The model is used as it is (call ``.eval()`` first for sampling without dropout).
    """
    if mask.dim() != 2 or mask.shape[0] != text_emb.shape[0]:
        raise ValueError(f"mask must be [N, T] with N = text_emb rows ({text_emb.shape[0]}), "
                         f"got {tuple(mask.shape)}")
    kw = dict(steps=steps, sampler=sampler, eta=eta, guidance_scale=guidance_scale,
              generator=generator)
    kind = family(model)
    if kind == "mdm":
        shape = noise if noise is not None else (mask.shape[0], mask.shape[1], model.config.nfeats)
        return diffusion.sample(model, shape, text_emb, mask, **kw)  # zero at padded frames
    if kind == "mld":
        shape = noise if noise is not None else (mask.shape[0],) + tuple(model.latent_shape)
        z = diffusion.sample(model, shape, text_emb, None, **kw)
        return model.decode(z, mask)
    raise ValueError(f"generate() needs an 'mdm' or 'mld' backbone, got kind={kind!r}")
