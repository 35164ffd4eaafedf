"""The released TMR as SoPo's reward (Mathux/TMR, ``tmr_humanml3d_guoh3dfeats``).

Architecture from ``src/model/actor.py``: two ``ACTORStyleEncoder`` s (a projection, two learned
distribution tokens, sinusoidal positions, a batch-first post-LN transformer encoder; the first
token's output is the Gaussian mean ``mu``), one over motions (263-d features in TMR's own
normalization ``(x - mean) / (std + 1e-12)``), one over DistilBERT's token embeddings (768-d,
``last_hidden_state`` with the tokenizer's padding mask). The reward is TMR's
``get_score_matrix``: ``cos(mu_text, mu_motion) / 2 + 1/2``, with ``sample_mean=True`` as its
``text_motion_sim.py`` scores.

What a user has after TMR's ``bash prepare/download_pretrain_models.sh`` (run directory
``models/tmr_humanml3d_guoh3dfeats``) and what :func:`load_tmr` reads from it:

* ``last_weights/text_encoder.pt`` and ``last_weights/motion_encoder.pt`` (TMR's ``extract_ckpt``
  output: plain state dicts, read weights-only; the decoder is not needed for scoring);
* TMR's feature statistics ``stats/humanml3d/guoh3dfeats/mean.pt`` and ``std.pt`` from the TMR
  repository, found in the run directory, beside it, or given as ``stats=DIR``.

How it plugs in: the text side is frozen, so a caption's whole text path (DistilBERT, then TMR's
text encoder) runs once per caption in the text encoder :class:`TMRTextEncoder` and is cached like
any caption embedding; the reward's ``encode_text`` then passes those 256-d latents through.
``encode_motion`` renormalizes the data's features to TMR's statistics and encodes them.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import List, Optional, Union

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError
from ..models.text import TextEncoder
from ..safe_load import load_weights
from ._tables import sinusoid_table

__all__ = ["ACTORStyleEncoder", "OfficialTMR", "TMRTextEncoder", "load_tmr", "TMR_RELEASE", "TMR_PREFIX",
           "is_official_tmr", "official_reward_checkpoint"]

#: the ``--reward`` value of the released TMR: ``tmr-official:<run directory>``
TMR_PREFIX = "tmr-official:"


def is_official_tmr(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(TMR_PREFIX)

TMR_RELEASE = ("Mathux/TMR: bash prepare/download_pretrain_models.sh gives models/tmr_humanml3d_guoh3dfeats "
               "(its last_weights/*.pt); the feature statistics are the repository's "
               "stats/humanml3d/guoh3dfeats/{mean,std}.pt")
_EPS = 1e-12  # TMR's Normalizer eps


class PositionalEncoding(nn.Module):
    """TMR's sinusoid table (not saved: ``persistent=False``), batch-first, with dropout."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.register_buffer("pe", sinusoid_table(max_len, d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x + self.pe.permute(1, 0, 2)[:, :x.shape[1], :])


class ACTORStyleEncoder(nn.Module):
    """``x [B, L, nfeats]``, ``mask [B, L]`` (True = valid) -> ``[B, 2, latent]`` (mu, logvar)."""

    def __init__(self, nfeats: int, vae: bool = True, latent_dim: int = 256, ff_size: int = 1024,
                 num_layers: int = 6, num_heads: int = 4, dropout: float = 0.1, activation: str = "gelu"):
        super().__init__()
        self.nfeats = nfeats
        self.projection = nn.Linear(nfeats, latent_dim)
        self.nbtokens = 2 if vae else 1
        self.tokens = nn.Parameter(torch.randn(self.nbtokens, latent_dim))
        self.sequence_pos_encoding = PositionalEncoding(latent_dim, dropout=dropout)
        layer = nn.TransformerEncoderLayer(d_model=latent_dim, nhead=num_heads, dim_feedforward=ff_size,
                                           dropout=dropout, activation=activation, batch_first=True)
        self.seqTransEncoder = nn.TransformerEncoder(layer, num_layers=num_layers)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.projection(x)
        bs = x.shape[0]
        xseq = torch.cat((self.tokens.unsqueeze(0).expand(bs, -1, -1), x), 1)
        aug_mask = torch.cat((torch.ones((bs, self.nbtokens), dtype=torch.bool, device=x.device), mask), 1)
        final = self.seqTransEncoder(self.sequence_pos_encoding(xseq), src_key_padding_mask=~aug_mask)
        return final[:, :self.nbtokens]


def _encoder_from_state(state: dict, what: str) -> ACTORStyleEncoder:
    """An encoder shaped like the weights (the release: latent 256, 6 layers, ff 1024, 4 heads)."""
    try:
        latent, nfeats = state["projection.weight"].shape
        nb = state["tokens"].shape[0]
        layers = len({k.split(".")[2] for k in state if k.startswith("seqTransEncoder.layers.")})
        ff = state["seqTransEncoder.layers.0.linear1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{what}: {e} is missing: not a TMR ACTORStyleEncoder state dict") from None
    heads = 4  # TMR's configs fix 4 heads; the weights do not record it
    enc = ACTORStyleEncoder(int(nfeats), vae=nb == 2, latent_dim=int(latent), ff_size=int(ff),
                            num_layers=layers, num_heads=heads)
    try:
        enc.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what} does not fit TMR's encoder: {e}") from None
    return enc


class OfficialTMR(nn.Module):
    """The released TMR as an embedding reward (see ``sopo_ext.rewards``)."""

    kind = "tmr_official"

    def __init__(self, motion_encoder: ACTORStyleEncoder, text_encoder: ACTORStyleEncoder,
                 tmr_mean: Tensor, tmr_std: Tensor):
        super().__init__()
        self.motion_encoder, self.text_encoder = motion_encoder, text_encoder
        self.register_buffer("tmr_mean", torch.as_tensor(tmr_mean, dtype=torch.float32).reshape(-1), persistent=False)
        self.register_buffer("tmr_std", torch.as_tensor(tmr_std, dtype=torch.float32).reshape(-1), persistent=False)
        self.data_mean: Optional[Tensor] = None
        self.data_std: Optional[Tensor] = None
        self.meta: dict = {}

    def set_data_normalization(self, mean, std) -> "OfficialTMR":
        """The normalization of the motions it will score (the dataset's Mean/Std)."""
        self.data_mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.data_std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        return self

    def encode_text(self, text_emb: Tensor) -> Tensor:
        """The cached caption latents of :class:`TMRTextEncoder` pass through."""
        return text_emb

    def encode_text_tokens(self, token_emb: Tensor, mask: Tensor) -> Tensor:
        """``mu`` of DistilBERT token embeddings ``[B, L, 768]`` with their mask."""
        return self.text_encoder(token_emb, mask)[:, 0]

    def encode_motion_tmr(self, x: Tensor, mask: Tensor) -> Tensor:
        """``mu`` of motions already in TMR's normalization (TMR's own input)."""
        return self.motion_encoder(x, mask)[:, 0]

    def encode_motion(self, motion: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if self.data_mean is None:
            raise ValueError("call set_data_normalization(mean, std) first: TMR reads motions in its own "
                             "normalization, renormalized from the data's")
        B, T, _ = motion.shape
        mask = torch.ones(B, T, dtype=torch.bool, device=motion.device) if mask is None else mask.bool()
        dev = motion.device
        raw = motion.float() * self.data_std.to(dev) + self.data_mean.to(dev)
        x = (raw - self.tmr_mean.to(dev)) / (self.tmr_std.to(dev) + _EPS)
        return self.encode_motion_tmr(x * mask[..., None].to(x.dtype), mask)

    @staticmethod
    def score(text_latent: Tensor, motion_latent: Tensor) -> Tensor:
        """TMR's ``get_score_matrix`` on paired rows: cos / 2 + 1/2."""
        cos = torch.nn.functional.cosine_similarity(text_latent.float(), motion_latent.float(), dim=-1, eps=1e-8)
        return cos * 0.5 + 0.5


class TMRTextEncoder(TextEncoder):
    """Captions -> TMR text latents ``[N, 256]``: DistilBERT token embeddings (``transformers``,
    ``distilbert-base-uncased`` or a local copy) through the released TMR text encoder."""

    def __init__(self, run_dir: Union[str, Path], distilbert: str = "distilbert-base-uncased",
                 device: str = "cpu", batch_size: int = 64):
        self.run_dir = Path(run_dir)
        state = _load_part(self.run_dir, "text_encoder")
        self.encoder = _encoder_from_state(state, str(self.run_dir / "last_weights" / "text_encoder.pt")).eval()
        self.dim = int(self.encoder.projection.weight.shape[0])
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].float().numpy().tobytes()[:4096])
        self.distilbert, self.device, self.batch_size = distilbert, device, batch_size
        self.name = f"tmr-official-text-{h.hexdigest()[:12]}-{Path(distilbert).name}"
        self._bert = None
        self._lock = threading.Lock()

    def _load_bert(self):
        with self._lock:
            if self._bert is None:
                from .text import load_distilbert
                self._bert = (load_distilbert(self.distilbert, "TMR's text encoder", "tokenizer"),
                              load_distilbert(self.distilbert, "TMR's text encoder").to(self.device))
        return self._bert

    def token_embeddings(self, captions: List[str]):
        tok, model = self._load_bert()
        enc = tok(captions, return_tensors="pt", padding=True)
        out = model(**{k: v.to(self.device) for k, v in enc.items()}).last_hidden_state
        return out, enc["attention_mask"].to(dtype=torch.bool, device=self.device)

    def _encode(self, captions: List[str]) -> torch.Tensor:
        self.encoder.to(self.device)
        out = []
        with torch.no_grad():
            for i in range(0, len(captions), self.batch_size):
                x, mask = self.token_embeddings(captions[i:i + self.batch_size])
                out.append(self.encoder(x, mask)[:, 0].float().cpu())
        return torch.cat(out)


def _load_part(run_dir: Path, part: str) -> dict:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"TMR run directory not found: {run_dir} ({TMR_RELEASE})")
    p = run_dir / "last_weights" / f"{part}.pt"
    if not p.is_file():
        hint = (" (it has logs/checkpoints/last.ckpt: split it with TMR's own src/load.py extract_ckpt, "
                "which writes last_weights/)") if (run_dir / "logs" / "checkpoints" / "last.ckpt").is_file() else ""
        raise FileNotFoundError(f"{p} is missing{hint}; {TMR_RELEASE}")
    state = load_weights(p, what=f"TMR {part} weights")
    if not isinstance(state, dict):
        raise CheckpointError(f"{p} does not hold a state dict")
    return state


def _find_stats(run_dir: Path, stats: Optional[Union[str, Path]]) -> Path:
    cands = [Path(stats)] if stats is not None else [
        run_dir / "stats" / "humanml3d" / "guoh3dfeats", run_dir.parent.parent / "stats" / "humanml3d" / "guoh3dfeats",
        run_dir.parent / "stats" / "humanml3d" / "guoh3dfeats", run_dir]
    for c in cands:
        if (c / "mean.pt").is_file() and (c / "std.pt").is_file():
            return c
    raise FileNotFoundError(f"TMR's feature statistics (mean.pt, std.pt) not found in "
                            f"{', '.join(map(str, cands))}; {TMR_RELEASE}")


def load_tmr(run_dir: Union[str, Path], stats: Optional[Union[str, Path]] = None) -> OfficialTMR:
    """The released TMR of ``run_dir`` (eval mode), reading TMR's normalization from ``stats``."""
    run_dir = Path(run_dir)
    text = _encoder_from_state(_load_part(run_dir, "text_encoder"), f"{run_dir}/last_weights/text_encoder.pt")
    motion = _encoder_from_state(_load_part(run_dir, "motion_encoder"), f"{run_dir}/last_weights/motion_encoder.pt")
    sd = _find_stats(run_dir, stats)
    mean = load_weights(sd / "mean.pt", what="TMR feature mean")
    std = load_weights(sd / "std.pt", what="TMR feature std")
    model = OfficialTMR(motion, text, torch.as_tensor(mean), torch.as_tensor(std)).eval()
    if model.tmr_mean.numel() != motion.nfeats:
        raise CheckpointError(f"TMR statistics in {sd} have {model.tmr_mean.numel()} features, its motion "
                              f"encoder reads {motion.nfeats}")
    model.meta = {"text_encoder": f"tmr-official:{run_dir}", "official": "Mathux/TMR", "stats": str(sd)}
    return model


def official_reward_checkpoint(spec: str, mean, std):
    """``--reward tmr-official:DIR`` as a loaded Checkpoint (kind ``tmr_official``) that scores
    motions normalized with ``mean`` / ``std`` (the dataset's)."""
    from ..checkpoint import Checkpoint
    run_dir = spec[len(TMR_PREFIX):]
    model = load_tmr(run_dir).set_data_normalization(mean, std)
    return Checkpoint(model=model, kind=model.kind, config=None, meta=dict(model.meta), path=Path(run_dir))
