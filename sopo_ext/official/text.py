"""The released MDM's text encoder: CLIP ViT-B/32's text tower, as ``MDM.clip_encode_text`` uses it.

The release calls OpenAI's ``clip`` package: ``clip.tokenize(captions, context_length=22,
truncate=True)`` (HumanML3D captions are cut to 20 tokens plus start and end), zero-pads the
tokens to CLIP's 77 positions, and takes ``encode_text(tokens).float()``: the 512-d projection of
the final layer norm at the end token. This module does the same with ``open_clip_torch``:

* **why open_clip**: its tokenizer ships CLIP's BPE vocabulary inside the wheel, so tokenizing
  needs no download (the tests run offline); it builds the text tower alone (63 M parameters,
  without the 88 M of the image tower); and it loads OpenAI's weights from a safetensors file
  (``timm/vit_base_patch32_clip_224.openai`` on the Hugging Face hub), which cannot run code.
  OpenAI's package needs its JIT archive from an Azure URL, and ``transformers``' CLIP tokenizer
  downloads its vocabulary; both tokenize the same BPE with the same cleaning, as open_clip does.
* **precision**: the release converts CLIP's matrices to fp16 (``clip.model.convert_weights``)
  and runs it on the GPU; ``precision="fp16"`` does the same (open_clip's
  ``convert_weights_to_lp``: linear and attention weights in fp16, layer norms in fp32). The
  default ``"fp32"`` suits a CPU; its features differ from the release's by the fp16 rounding
  (about 1e-3 relative), not by anything else.

Weights: ``weights=None`` downloads ``open_clip_model.safetensors`` from the hub on first use
(set ``HF_HUB_OFFLINE=1`` and place the file in the hub cache to work offline), or pass the path
of a local copy (safetensors, or a ``torch.save`` state dict, read weights-only). Either way the
features are computed once per caption and cached (``sopo_ext.models.text.CachedTextEncoder``).
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import List, Optional

import torch

from ..models.text import TextEncoder

__all__ = ["MDMClipEncoder", "CLIP_HUB_REPO", "CLIP_HUB_FILE", "mdm_text_encoder", "MLDClipEncoder",
           "mld_text_encoder", "MLD_CLIP_REPO"]

CLIP_HUB_REPO = "timm/vit_base_patch32_clip_224.openai"
CLIP_HUB_FILE = "open_clip_model.safetensors"
_INSTALL = "pip install open_clip_torch (or pip install 'sopo_ext[official]')"


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(f"the released MDM's text encoder (CLIP ViT-B/32) needs open_clip: {_INSTALL} ({e})") from e
    return open_clip


def _file_tag(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:12]


class MDMClipEncoder(TextEncoder):
    """Captions -> the release's CLIP features ``[N, 512]`` (see the module docstring).

    The tower's shape is read off the weights (ViT-B/32's: width 512, 12 layers, 8 heads);
    ``text_cfg`` (``open_clip.model.CLIPTextCfg`` fields) overrides it."""

    dim = 512

    def __init__(self, weights: Optional[str] = None, precision: str = "fp32", context_length: int = 22,
                 device: str = "cpu", batch_size: int = 256, text_cfg: Optional[dict] = None):
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        if not 2 < context_length < 77:
            raise ValueError(f"context_length must be in (2, 77): the release uses 22, got {context_length}")
        _open_clip()  # fail at construction, with the pip command, when the library is missing
        self.weights = Path(weights) if weights is not None else None
        if self.weights is not None and not self.weights.is_file():
            raise FileNotFoundError(f"CLIP ViT-B/32 weights not found: {self.weights} (the release's text "
                                    f"encoder; get {CLIP_HUB_FILE} from https://huggingface.co/{CLIP_HUB_REPO})")
        self.precision, self.context_length, self.device = precision, context_length, device
        self.batch_size, self.text_cfg = batch_size, text_cfg
        source = "openai" if self.weights is None else f"file-{_file_tag(self.weights)}"
        shape = "" if text_cfg is None else "-custom" + hashlib.sha256(repr(sorted(text_cfg.items())).encode()).hexdigest()[:8]
        self.name = f"mdm-clip-vit-b32{shape}-{source}-ctx{context_length}-{precision}"
        self._model = None
        self._lock = threading.Lock()

    # ---- tokens -------------------------------------------------------------------------------
    def tokenize(self, captions: List[str]) -> torch.Tensor:
        """``clip.tokenize(captions, context_length, truncate=True)`` zero-padded to 77 ``[N, 77]``."""
        tok = _open_clip().get_tokenizer("ViT-B-32")
        t = tok(captions, context_length=self.context_length)
        return torch.cat([t, t.new_zeros(t.shape[0], 77 - self.context_length)], dim=1)

    # ---- model --------------------------------------------------------------------------------
    def _state_dict(self) -> dict:
        if self.weights is None:
            try:
                from huggingface_hub import hf_hub_download
                path = Path(hf_hub_download(CLIP_HUB_REPO, CLIP_HUB_FILE))
            except Exception as e:  # offline, no cache, hub error: say what and where
                raise FileNotFoundError(
                    f"could not get CLIP ViT-B/32's weights ({CLIP_HUB_FILE} of "
                    f"https://huggingface.co/{CLIP_HUB_REPO}): {type(e).__name__}: {e}. Download it "
                    f"and pass its path as the text encoder's weights "
                    f"('mdm-clip:/path/{CLIP_HUB_FILE}')") from None
        else:
            path = self.weights
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            from ..safe_load import load_weights
            state = load_weights(path, what="CLIP weights")
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        return {k: v for k, v in state.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}

    def build(self, state: Optional[dict] = None):
        """The text tower with random weights: ViT-B/32's shape, the shape of the weights in
        ``state`` (CLIP's heads are 64 wide), or ``text_cfg``."""
        _open_clip()
        from open_clip.model import CLIPTextCfg, _build_text_tower
        cfg = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
        if state is not None and "token_embedding.weight" in state:
            vocab, width = state["token_embedding.weight"].shape
            layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
            cfg.update(vocab_size=int(vocab), width=int(width), heads=max(1, int(width) // 64), layers=layers,
                       context_length=int(state["positional_embedding"].shape[0]))
        cfg.update(self.text_cfg or {})
        if cfg["context_length"] != 77:
            raise ValueError(f"CLIP's context is 77 tokens; these weights have {cfg['context_length']}")
        return _build_text_tower(512, CLIPTextCfg(**cfg), quick_gelu=True)

    def load(self):
        with self._lock:
            if self._model is None:
                state = self._state_dict()
                model = self.build(state)
                missing, unexpected = model.load_state_dict(state, strict=False)
                missing = [k for k in missing if k != "attn_mask"]
                if missing or unexpected:
                    raise ValueError(f"CLIP weights do not fit ViT-B/32's text tower: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}")
                if self.precision == "fp16":
                    _open_clip().model.convert_weights_to_lp(model, torch.float16)
                self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.load()(tokens.to(self.device)).float()

    def _encode(self, captions: List[str]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(captions), self.batch_size):
                out.append(self.encode_tokens(self.tokenize(captions[i:i + self.batch_size])).cpu())
        return torch.cat(out)


def mdm_text_encoder(spec: str, **kw) -> MDMClipEncoder:
    """``"mdm-clip"`` (weights from the hub) or ``"mdm-clip:/path/to/weights"``."""
    head, _, path = spec.partition(":")
    if head != "mdm-clip":
        raise ValueError(f"not an MDM text encoder spec: {spec!r} (use 'mdm-clip' or 'mdm-clip:/path')")
    return MDMClipEncoder(weights=path or None, **kw)


# --------------------------------------------------------------------------------------------
# The released MLD's text encoder: CLIP ViT-L/14 through transformers, as MldTextEncoder
# --------------------------------------------------------------------------------------------

MLD_CLIP_REPO = "openai/clip-vit-large-patch14"


class MLDClipEncoder(TextEncoder):
    """Captions -> the released MLD's text features ``[N, 768]``: ``MldTextEncoder`` with
    ``last_hidden_state: false``, i.e. ``CLIPModel.get_text_features`` of the tokens padded to
    77 with truncation, no attention mask (CLIP's causal mask and its pooling at the first end
    token make the padding irrelevant). ``transformers`` is what the release uses, so its
    numerics are the release's. Weights: ``openai/clip-vit-large-patch14`` from the Hugging Face
    hub on first use, or a local copy of that directory (the release's ``deps/clip-vit-large-patch14``)."""

    def __init__(self, weights: Optional[str] = None, device: str = "cpu", batch_size: int = 128):
        self.source = weights or MLD_CLIP_REPO
        if weights is not None and not Path(weights).is_dir():
            raise FileNotFoundError(f"CLIP ViT-L/14 not found: {weights} (the released MLD's text encoder: a "
                                    f"directory with the files of https://huggingface.co/{MLD_CLIP_REPO}, "
                                    f"the release's deps/clip-vit-large-patch14)")
        tag = "hub" if weights is None else f"dir-{hashlib.sha256(str(Path(weights).resolve()).encode()).hexdigest()[:10]}"
        self.name = f"mld-clip-vit-l14-{tag}"
        self.device, self.batch_size = device, batch_size
        self._model = None
        self._lock = threading.Lock()
        self.dim = 768

    def load(self):
        with self._lock:
            if self._model is None:
                try:
                    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
                    tok = CLIPTokenizer.from_pretrained(self.source)
                    model = CLIPTextModelWithProjection.from_pretrained(self.source)
                except OSError as e:
                    raise FileNotFoundError(
                        f"could not load CLIP ViT-L/14 ({self.source}), the released MLD's text encoder: {e}. "
                        f"Download https://huggingface.co/{MLD_CLIP_REPO} and pass its directory") from None
                self._model = (tok, model.eval().requires_grad_(False).to(self.device))
                self.dim = int(model.config.projection_dim)
        return self._model

    def _encode(self, captions: List[str]) -> torch.Tensor:
        tok, model = self.load()
        out = []
        with torch.no_grad():
            for i in range(0, len(captions), self.batch_size):
                # the release pads to tokenizer.model_max_length (CLIP's: 77, its position table)
                length = min(tok.model_max_length, model.config.max_position_embeddings)
                ids = tok(captions[i:i + self.batch_size], padding="max_length", truncation=True,
                          max_length=length, return_tensors="pt").input_ids
                out.append(model(input_ids=ids.to(self.device)).text_embeds.float().cpu())
        return torch.cat(out)


def mld_text_encoder(spec: str, **kw) -> MLDClipEncoder:
    """``"mld-clip"`` (weights from the hub) or ``"mld-clip:/path/to/clip-vit-large-patch14"``."""
    head, _, path = spec.partition(":")
    if head != "mld-clip":
        raise ValueError(f"not an MLD text encoder spec: {spec!r} (use 'mld-clip' or 'mld-clip:/dir')")
    return MLDClipEncoder(weights=path or None, **kw)


# --------------------------------------------------------------------------------------------
# The released DistilBERT MDM (humanml_trans_dec_512_bert): token ids cached, features in the model
# --------------------------------------------------------------------------------------------

def load_distilbert(source: str, who: str, part: str = "model"):
    """DistilBERT's tokenizer (``part="tokenizer"``) or frozen model, eval mode, through
    ``transformers`` (as the released TMR and MDM load it); FileNotFoundError saying ``who``
    needs it and where it is published when ``source`` is neither on the hub nor a local copy."""
    try:
        from transformers import AutoModel, AutoTokenizer
        if part == "tokenizer":
            return AutoTokenizer.from_pretrained(source)
        return AutoModel.from_pretrained(source).eval().requires_grad_(False)
    except OSError as e:
        raise FileNotFoundError(f"{who} needs DistilBERT ({source!r}: https://huggingface.co/distilbert/"
                                f"distilbert-base-uncased, or a local copy, --distilbert DIR): {e}") from None


BERT_MAX_TOKENS = 128  # HumanML3D captions are far shorter; a longer caption is an error, not a cut
_TEXT_MODELS: dict = {}  # shared by a policy and its frozen copy: DistilBERT is never duplicated


class MDMBertTokens(TextEncoder):
    """Captions -> DistilBERT token ids and attention mask, packed as floats ``[N, 2 * 128]``.

    The DistilBERT MDM reads per-token features (``[L, B, 768]`` and a padding mask), which a
    per-caption cache of features would hold at 128 x 768 floats a caption; so the cache holds
    the tokens, and the model runs the frozen DistilBERT on them (:class:`DistilBertFeatures`,
    memoised: a sampling loop encodes a batch's captions once). The release tokenizes with
    ``padding=True`` and no truncation; per-caption features do not depend on the padding, so
    padding every caption to 128 gives the release's features."""

    def __init__(self, distilbert: str = "distilbert-base-uncased"):
        self.source = distilbert
        tag = Path(distilbert).name if Path(distilbert).is_dir() else distilbert.replace("/", "_")
        self.name = f"mdm-bert-tokens{BERT_MAX_TOKENS}-{tag}"
        self.dim = 2 * BERT_MAX_TOKENS
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            self._tok = load_distilbert(self.source, "the DistilBERT MDM", "tokenizer")
        return self._tok

    def _encode(self, captions: List[str]) -> torch.Tensor:
        enc = self._tokenizer()(captions, padding="max_length", max_length=BERT_MAX_TOKENS, truncation=False,
                                return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] > BERT_MAX_TOKENS:
            n = int(mask.sum(1).argmax())
            raise ValueError(f"caption {captions[n]!r} has {int(mask[n].sum())} DistilBERT tokens, more than "
                             f"{BERT_MAX_TOKENS}")
        return torch.cat([ids.float(), mask.float()], dim=1)


class DistilBertFeatures:
    """The frozen DistilBERT of the DistilBERT MDM: ``(ids [B, L], valid [B, L]) -> [B, L, 768]``
    (``last_hidden_state``, as the release's ``BERT`` wrapper), the last few results memoised."""

    def __init__(self, distilbert: str = "distilbert-base-uncased", device: str = "cpu", memo: int = 8):
        self.model = load_distilbert(distilbert, "the DistilBERT MDM").to(device)
        self.memo, self._cache = memo, {}

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        key = (ids.detach().cpu().numpy().tobytes(), tuple(ids.shape), str(ids.device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        dev = next(self.model.parameters()).device
        out = self.model(input_ids=ids.to(dev), attention_mask=valid.to(dev).long()).last_hidden_state
        out = out.to(ids.device)
        if len(self._cache) >= self.memo:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = out
        return out


def register_text_model(key: str, model) -> str:
    """Keep a frozen text model where every copy of a backbone finds it (see ``_TEXT_MODELS``)."""
    _TEXT_MODELS[key] = model
    return key


def text_model(key: str):
    if key not in _TEXT_MODELS:
        raise ValueError("the DistilBERT MDM has no DistilBERT attached: call attach_text_model first "
                         "(the trainer and evaluate do, from --distilbert)")
    return _TEXT_MODELS[key]
