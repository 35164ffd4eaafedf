"""T2M-style text-motion evaluator: embeds captions and motions for R-precision, MM-Dist, FID,
Diversity and MultiModality (sopo_ext.metrics). It is used only for metrics, never as a reward,
and deliberately has a different architecture from the TMR reward model.

How this maps to T2M (Guo et al. 2022, ``EricGuo5513/text-to-motion``, the evaluator of MDM/MLD):

* Motion side: a movement encoder of two 1D convolutions (kernel 4, stride 2, padding 1, each
  followed by dropout and LeakyReLU(0.2)) over ``features[..., :-4]`` (the four foot contacts are
  dropped, like T2M), total temporal stride 4 = T2M's unit length, then a linear layer; a
  bidirectional GRU (learned initial state) over the movement sequence, packed by length; the
  final hidden states of both directions -> Linear, LayerNorm, LeakyReLU, Linear -> 512.
  Lengths (deviation, documented): T2M crops motions to a multiple of 4 frames and uses
  ``length // 4`` movement steps, dropping up to 3 frames. We use ``ceil(length / 4)`` steps, so
  every valid frame is seen (identical to T2M when the length is a multiple of 4); padded frames
  are zeroed first and the first conv's outputs past ``2 * ceil(length / 4)`` are zeroed too, so
  every motion is encoded exactly as if it were alone, cropped to its length and zero-padded to a
  multiple of 4 (T2M's batches instead let the second conv see the first conv's response to
  padding, so T2M embeddings depend slightly on the batch's padded length). The mask must be a
  prefix mask (valid frames first), since the GRU needs lengths.
* Text side: word embeddings + a projection of T2M's one-hot POS vector (15 categories) -> Linear
  -> bidirectional GRU (learned initial state), packed by length -> final hidden states ->
  Linear, LayerNorm, LeakyReLU, Linear -> 512. Deviation: T2M uses frozen 300-d GloVe vectors; we
  have no GloVe, so the word embeddings are learned over a :class:`Vocabulary` built from the
  training captions' tokens and stored in ``EvaluatorConfig.vocab`` (so checkpoints carry it).
  Tokens are HumanML3D's ``word/POS``; like T2M's WordVectorizer, a word from T2M's VIP lists
  (locations, body parts, objects, actions, descriptions) gets the VIP category instead of its tag,
  tags outside T2M's list map to OTHER. Unlike T2M, a word missing from the vocabulary keeps its
  POS category (T2M sets OTHER: it has no vector for the word at all) and gets ``<unk>``.
  Captions are truncated to ``max_text_len`` (20) words and wrapped in ``<sos>`` / ``<eos>``
  (T2M does the same).
* Loss: T2M's contrastive hinge loss on Euclidean distances of the (unnormalized) embeddings,
  ``d(t_i, m_i)^2`` for positives plus ``max(margin - d(t_i, m_j), 0)^2`` for negatives, margin
  10. T2M draws one negative per sample by shifting the batch randomly; we average over all
  in-batch negatives (deterministic, lower variance) and, as TMR's filtering does, skip pairs
  whose captions are identical (same token sequence), because HumanML3D has duplicate captions.
  The embeddings are not normalized (like T2M), and the margin fixes the distance scale, so
  Euclidean R-precision / MM-Dist / FID are meaningful and of T2M's order of magnitude.
  ``loss="infonce"`` gives a symmetric InfoNCE on -distance / temperature instead.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

__all__ = ["EvaluatorConfig", "MotionTextEvaluator", "Vocabulary", "POS_CATEGORIES", "VIP_WORDS",
           "SPECIAL_TOKENS", "build_vocab", "parse_token", "pos_category"]

#: T2M's POS enumeration (order = one-hot index).
POS_CATEGORIES = ("VERB", "NOUN", "DET", "ADP", "NUM", "AUX", "PRON", "ADJ", "ADV",
                  "Loc_VIP", "Body_VIP", "Obj_VIP", "Act_VIP", "Desc_VIP", "OTHER")
_POS_INDEX = {p: i for i, p in enumerate(POS_CATEGORIES)}

#: T2M's "very important" word lists; such a word gets its VIP category as POS.
VIP_WORDS = {
    "Loc_VIP": ("left", "right", "clockwise", "counterclockwise", "anticlockwise", "forward",
                "back", "backward", "up", "down", "straight", "curve"),
    "Body_VIP": ("arm", "chin", "foot", "feet", "face", "hand", "mouth", "leg", "waist", "eye",
                 "knee", "shoulder", "thigh"),
    "Obj_VIP": ("stair", "dumbbell", "chair", "window", "floor", "car", "ball", "handrail",
                "baseball", "basketball"),
    "Act_VIP": ("walk", "run", "swing", "pick", "bring", "kick", "put", "squat", "throw", "hop",
                "dance", "jump", "turn", "stumble", "stop", "sit", "lift", "lower", "raise",
                "wash", "stand", "kneel", "stroll", "rub", "bend", "balance", "flap", "jog",
                "shuffle", "lean", "rotate", "spin", "spread", "climb"),
    "Desc_VIP": ("slowly", "carefully", "fast", "careful", "slow", "quickly", "happy", "angry",
                 "sad", "happily", "angrily", "sadly"),
}
_VIP_OF = {w: cat for cat, words in VIP_WORDS.items() for w in words}

PAD, UNK, SOS, EOS = "<pad>", "<unk>", "<sos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, SOS, EOS)  # ids 0..3; vocabulary words start at id 4


def parse_token(token: str) -> Tuple[str, str]:
    """``"word/POS"`` -> (lowercased word, POS tag); split on the *last* "/" (words may contain
    "/"); a token without "/" gets tag "OTHER"."""
    word, sep, tag = token.rpartition("/")
    if not sep:
        return token.lower(), "OTHER"
    return word.lower(), tag


def pos_category(word: str, tag: str) -> str:
    """T2M's POS category: the VIP category of the word if any, else the tag if it is one of
    T2M's categories, else OTHER."""
    vip = _VIP_OF.get(word)
    if vip is not None:
        return vip
    return tag if tag in _POS_INDEX else "OTHER"


def build_vocab(token_lists: Iterable[Sequence[str]], min_count: int = 1) -> List[str]:
    """Words (lowercased, from ``word/POS`` tokens) seen at least ``min_count`` times, most frequent
    first (ties alphabetical). Special tokens are not included (they are implicit)."""
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
    counts: Counter = Counter()
    for i, toks in enumerate(token_lists):
        if isinstance(toks, str):
            raise ValueError(f"token_lists[{i}] must be a list of 'word/POS' strings, got a str")
        for t in toks:
            w = parse_token(t)[0]
            if w and w not in SPECIAL_TOKENS:
                counts[w] += 1
    return sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))


class Vocabulary:
    """word -> id with ``<pad>``=0, ``<unk>``=1, ``<sos>``=2, ``<eos>``=3, words from 4."""

    def __init__(self, words: Sequence[str]):
        self.words = list(SPECIAL_TOKENS) + list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocab has duplicate words (or contains a special token)")

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, word: str) -> int:
        return self.index.get(word, self.index[UNK])

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 1) -> "Vocabulary":
        return cls(build_vocab(token_lists, min_count))


@dataclass
class EvaluatorConfig:
    nfeats: int = 263
    contact_features: int = 4  # trailing foot-contact channels dropped (T2M)
    vocab: List[str] = field(default_factory=list)  # words only; see build_vocab
    max_text_len: int = 20
    # Sizes are halved from T2M's so the evaluator trains on 2 CPU cores and fits the bundled
    # checkpoint budget; the embedding stays 512-d like T2M's.
    # text side (T2M: GloVe 300, hidden 512)
    word_dim: int = 128
    text_hidden: int = 256
    # motion side (T2M: movement 512/512, GRU hidden 1024)
    movement_hidden: int = 256
    movement_dim: int = 256
    motion_hidden: int = 256
    embed_dim: int = 512
    dropout: float = 0.2  # in the movement convolutions, like T2M
    # loss
    loss: str = "margin"  # "margin" (T2M) or "infonce"
    margin: float = 10.0
    temperature: float = 1.0  # infonce only: logits = -distance / temperature

    unit_length = 4  # temporal stride of the movement encoder (T2M's unit length); not a field

    def __post_init__(self):
        for name in ("nfeats", "max_text_len", "word_dim", "text_hidden", "movement_hidden",
                     "movement_dim", "motion_hidden", "embed_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EvaluatorConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.contact_features, int) or not 0 <= self.contact_features < self.nfeats:
            raise ValueError(f"EvaluatorConfig.contact_features must be an int in [0, nfeats), "
                             f"got {self.contact_features!r}")
        if not isinstance(self.vocab, (list, tuple)) or not all(isinstance(w, str) for w in self.vocab):
            raise ValueError("EvaluatorConfig.vocab must be a list of str (see build_vocab)")
        self.vocab = list(self.vocab)
        bad = [w for w in self.vocab if w in SPECIAL_TOKENS]
        if bad or len(set(self.vocab)) != len(self.vocab):
            raise ValueError(f"EvaluatorConfig.vocab must hold unique words without the special "
                             f"tokens {SPECIAL_TOKENS}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"EvaluatorConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.loss not in ("margin", "infonce"):
            raise ValueError(f"EvaluatorConfig.loss must be 'margin' or 'infonce', got {self.loss!r}")
        if not float(self.margin) > 0:
            raise ValueError(f"EvaluatorConfig.margin must be > 0, got {self.margin!r}")
        if not float(self.temperature) > 0:
            raise ValueError(f"EvaluatorConfig.temperature must be > 0, got {self.temperature!r}")

    @staticmethod
    def build_vocab(token_lists: Iterable[Sequence[str]], min_count: int = 1) -> List[str]:
        """The ``vocab`` field from training captions' token lists (see module :func:`build_vocab`)."""
        return build_vocab(token_lists, min_count)


# ----------------------------------------------------------------------------- losses
def margin_contrastive_loss(text_emb: torch.Tensor, motion_emb: torch.Tensor, margin: float,
                            negative_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T2M's hinge on Euclidean distances over all pairs: mean_i d_ii^2 +
    mean over negatives (i != j, allowed by ``negative_mask``) of max(margin - d_ij, 0)^2."""
    d = torch.cdist(text_emb.float(), motion_emb.float())
    B = d.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=d.device)
    pos = d.diagonal().pow(2).mean()
    neg_ok = ~eye if negative_mask is None else (negative_mask & ~eye)
    if not bool(neg_ok.any()):
        return pos
    neg = F.relu(float(margin) - d[neg_ok]).pow(2).mean()
    return pos + neg


def distance_info_nce(text_emb: torch.Tensor, motion_emb: torch.Tensor, temperature: float,
                      negative_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE with logits -d_ij / temperature; disallowed negatives are masked out."""
    logits = -torch.cdist(text_emb.float(), motion_emb.float()) / float(temperature)
    B = logits.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=logits.device)
    if negative_mask is not None:
        logits = logits.masked_fill(~negative_mask & ~eye, float("-inf"))
    labels = torch.arange(B, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# ----------------------------------------------------------------------------- model
def _bigru_final(gru: nn.GRU, h0: nn.Parameter, x: torch.Tensor, lengths: torch.Tensor):
    """Final hidden states of both directions [B, 2H] of a packed bidirectional GRU."""
    B = x.shape[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    h = h0.to(x.dtype).expand(-1, B, -1).contiguous()
    _, hn = gru(packed, h)  # [2, B, H], already in the original batch order
    return torch.cat([hn[0], hn[1]], dim=-1)


def _output_net(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.LayerNorm(hidden),
                         nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, out))


class MotionTextEvaluator(nn.Module):
    """``encode_text(tokens_batch) -> [B, 512]``, ``encode_motion(motion, mask) -> [B, 512]``;
    compare with Euclidean distances."""

    kind = "evaluator"
    reads_tokens = True  # captions as word/POS tokens (T2M), not sentence embeddings

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        if not isinstance(config, EvaluatorConfig):
            raise ValueError(f"config must be an EvaluatorConfig, got {type(config).__name__}")
        self.config = c = config
        self.vocabulary = Vocabulary(c.vocab)
        # text
        self.word_emb = nn.Embedding(len(self.vocabulary), c.word_dim, padding_idx=0)
        self.pos_emb = nn.Linear(len(POS_CATEGORIES), c.word_dim)
        self.text_input = nn.Linear(c.word_dim, c.text_hidden)
        self.text_gru = nn.GRU(c.text_hidden, c.text_hidden, batch_first=True, bidirectional=True)
        self.text_h0 = nn.Parameter(torch.randn(2, 1, c.text_hidden) * 0.1)
        self.text_out = _output_net(2 * c.text_hidden, c.text_hidden, c.embed_dim)
        # motion
        n_in = c.nfeats - c.contact_features
        self.movement_conv1 = nn.Sequential(
            nn.Conv1d(n_in, c.movement_hidden, 4, 2, 1), nn.Dropout(c.dropout),
            nn.LeakyReLU(0.2, inplace=True))
        self.movement_conv2 = nn.Sequential(
            nn.Conv1d(c.movement_hidden, c.movement_dim, 4, 2, 1), nn.Dropout(c.dropout),
            nn.LeakyReLU(0.2, inplace=True))
        self.movement_out = nn.Linear(c.movement_dim, c.movement_dim)
        self.motion_input = nn.Linear(c.movement_dim, c.motion_hidden)
        self.motion_gru = nn.GRU(c.motion_hidden, c.motion_hidden, batch_first=True,
                                 bidirectional=True)
        self.motion_h0 = nn.Parameter(torch.randn(2, 1, c.motion_hidden) * 0.1)
        self.motion_out = _output_net(2 * c.motion_hidden, c.motion_hidden, c.embed_dim)

    # ------------------------------------------------------------------ text
    def tokenize(self, tokens_batch: Sequence[Sequence[str]], max_words: Optional[int] = None):
        """``word/POS`` token lists -> (word_ids int64 [B, L], pos_onehot float [B, L, 15],
        lengths int64 [B]); each caption is truncated to ``max_words`` (default
        config.max_text_len) words and wrapped in <sos> ... <eos> (both with POS OTHER)."""
        max_words = self.config.max_text_len if max_words is None else max_words
        if not isinstance(max_words, int) or max_words < 1:
            raise ValueError(f"max_words must be a positive int, got {max_words!r}")
        if isinstance(tokens_batch, str) or not isinstance(tokens_batch, (list, tuple)) \
                or len(tokens_batch) == 0:
            raise ValueError("tokens_batch must be a non-empty list of token lists "
                             "(each a list of 'word/POS' strings)")
        other = _POS_INDEX["OTHER"]
        ids, pos = [], []
        for i, toks in enumerate(tokens_batch):
            if isinstance(toks, str) or not isinstance(toks, (list, tuple)):
                raise ValueError(f"tokens_batch[{i}] must be a list of 'word/POS' strings, got "
                                 f"{type(toks).__name__}")
            if len(toks) == 0:
                raise ValueError(f"tokens_batch[{i}] is an empty token list")
            w_ids, p_ids = [self.vocabulary[SOS]], [other]
            for t in toks[:max_words]:
                if not isinstance(t, str):
                    raise ValueError(f"tokens_batch[{i}] holds a non-str token {t!r}")
                word, tag = parse_token(t)
                w_ids.append(self.vocabulary[word])
                p_ids.append(_POS_INDEX[pos_category(word, tag)])
            w_ids.append(self.vocabulary[EOS])
            p_ids.append(other)
            ids.append(w_ids)
            pos.append(p_ids)
        device = self.word_emb.weight.device
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
        L = int(lengths.max())
        word_ids = torch.zeros(len(ids), L, dtype=torch.int64)
        pos_idx = torch.full((len(ids), L), -1, dtype=torch.int64)
        for b, (w, p) in enumerate(zip(ids, pos)):
            word_ids[b, :len(w)] = torch.tensor(w)
            pos_idx[b, :len(p)] = torch.tensor(p)
        pos_onehot = F.one_hot(pos_idx.clamp_min(0), len(POS_CATEGORIES)).float()
        pos_onehot = pos_onehot * (pos_idx >= 0)[..., None]  # padding: all-zero POS
        return word_ids.to(device), pos_onehot.to(device), lengths.to(device)

    def encode_tokens(self, word_ids: torch.Tensor, pos_onehot: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim] from the outputs of :meth:`tokenize`."""
        x = self.word_emb(word_ids) + self.pos_emb(pos_onehot.to(self.pos_emb.weight.dtype))
        x = self.text_input(x)
        return self.text_out(_bigru_final(self.text_gru, self.text_h0, x, lengths))

    def encode_text(self, tokens_batch: Sequence[Sequence[str]]) -> torch.Tensor:
        """[B, embed_dim] caption embeddings from ``word/POS`` token lists."""
        return self.encode_tokens(*self.tokenize(tokens_batch))

    # ------------------------------------------------------------------ motion
    def _check_motion(self, motion: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.config
        if not isinstance(motion, torch.Tensor) or not motion.is_floating_point():
            raise ValueError(f"motion must be a floating-point tensor [B, T, nfeats={c.nfeats}]")
        if motion.dim() != 3 or motion.shape[2] != c.nfeats:
            raise ValueError(f"motion must be [B, T, nfeats={c.nfeats}], got shape "
                             f"{tuple(motion.shape)}")
        B, T = motion.shape[:2]
        if B == 0 or T == 0:
            raise ValueError(f"motion must have B > 0 and T > 0, got shape {tuple(motion.shape)}")
        if mask is None:
            return torch.full((B,), T, dtype=torch.int64, device=motion.device)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor [B, T] = [{B}, {T}]")
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must be [B, T] = [{B}, {T}] to match motion "
                             f"{tuple(motion.shape)}, got shape {tuple(mask.shape)}")
        mask = mask.to(motion.device)
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("mask has a row without valid frames (every motion needs >= 1 frame)")
        prefix = torch.arange(T, device=mask.device)[None] < lengths[:, None]
        if not bool((prefix == mask).all()):
            raise ValueError("mask must be a prefix mask (valid frames first, then padding)")
        return lengths

    def encode_motion(self, motion: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, embed_dim] motion embeddings; padded frames (mask False) never matter."""
        lengths = self._check_motion(motion, mask)
        c = self.config
        B, T, _ = motion.shape
        valid = torch.arange(T, device=motion.device)[None] < lengths[:, None]
        x = motion[..., :c.nfeats - c.contact_features] * valid[..., None].to(motion.dtype)
        u = c.unit_length
        pad = (-T) % u
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        steps = torch.div(lengths + (u - 1), u, rounding_mode="floor")  # ceil(length / 4)
        h = self.movement_conv1(x.transpose(1, 2))  # [B, C, T_pad / 2]
        # Zero the half-rate steps past this motion's own padded length 2 * steps, so the second
        # conv sees the same zeros as with the motion alone (cropped, zero-padded to a multiple of
        # 4): the embedding does not depend on how much padding the batch has.
        keep = torch.arange(h.shape[-1], device=h.device)[None] < (2 * steps)[:, None]
        h = h * keep[:, None, :].to(h.dtype)
        h = self.movement_conv2(h).transpose(1, 2)  # [B, T_pad / 4, movement_dim]
        h = self.motion_input(self.movement_out(h))
        return self.motion_out(_bigru_final(self.motion_gru, self.motion_h0, h, steps))

    # ------------------------------------------------------------------ training
    def forward(self, motion: torch.Tensor, mask: Optional[torch.Tensor],
                tokens_batch: Sequence[Sequence[str]]) -> Dict[str, torch.Tensor]:
        text = self.encode_text(tokens_batch)
        mot = self.encode_motion(motion, mask)
        if text.shape[0] != mot.shape[0]:
            raise ValueError(f"tokens_batch has {text.shape[0]} captions but motion has "
                             f"{mot.shape[0]} samples")
        return {"text_emb": text, "motion_emb": mot}

    def training_loss(self, motion: torch.Tensor, mask: Optional[torch.Tensor],
                      tokens_batch: Sequence[Sequence[str]]) -> Dict[str, torch.Tensor]:
        """dict(loss, mean_pos_dist, mean_neg_dist); see the module doc for the loss."""
        out = self(motion, mask, tokens_batch)
        t, m = out["text_emb"], out["motion_emb"]
        keys = [tuple(x) for x in tokens_batch]
        B = len(keys)
        # identical captions are not negatives of each other
        neg_ok = torch.tensor([[keys[i] != keys[j] for j in range(B)] for i in range(B)],
                              dtype=torch.bool, device=t.device)
        if self.config.loss == "margin":
            loss = margin_contrastive_loss(t, m, self.config.margin, neg_ok)
        else:
            loss = distance_info_nce(t, m, self.config.temperature, neg_ok)
        with torch.no_grad():
            d = torch.cdist(t.float(), m.float())
            eye = torch.eye(B, dtype=torch.bool, device=d.device)
            neg = d[~eye].mean() if B > 1 else d.new_zeros(())
        return {"loss": loss, "mean_pos_dist": d.diagonal().mean(), "mean_neg_dist": neg}
