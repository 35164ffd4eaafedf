"""The standard T2M evaluator (Guo et al. 2022), as MDM's ``eval_humanml.py`` and MLD's ``tm2t.py`` use it.

Architecture and file formats follow GuyTevet/motion-diffusion-model's
``data_loaders/humanml/networks/modules.py`` (``MovementConvEncoder``, ``TextEncoderBiGRUCo``,
``MotionEncoderBiGRUCo``), ``evaluator_wrapper.py`` and ``utils/word_vectorizer.py``, module for
module and key for key, so the released ``finest.tar`` loads with ``strict=True``.

What a user has (MDM's ``prepare/download_t2m_evaluators.sh`` and ``download_glove.sh``, and the
repository's ``dataset/`` folder), and what :func:`load_t2m_evaluator` looks for under ``DIR``:

* ``t2m/text_mot_match/model/finest.tar``: ``{'movement_encoder', 'text_encoder',
  'motion_encoder', 'epoch', ...}`` state dicts (read weights-only);
* ``glove/our_vab_data.npy``, ``our_vab_words.pkl``, ``our_vab_idx.pkl``: 300-d GloVe vectors of
  the vocabulary (the pickles hold a list of words and a dict word -> row; they are read by an
  unpickler that builds nothing else, so they cannot run code);
* ``dataset/t2m_mean.npy``, ``t2m_std.npy`` (or ``t2m/Comp_v6_KLD01/meta/mean.npy``, ``std.npy``):
  the evaluator's own feature normalization.

The conventions kept from the original: captions are ``word/POS`` tokens cut to 20, framed by
``sos/OTHER`` and ``eos/OTHER`` and padded with ``unk/OTHER`` to 22; a word of the VIP lists gets
its VIP category as POS, an unknown word ``unk``'s vector and POS ``OTHER``; motions enter in the
evaluator's normalization (``(x * Std + Mean - t2m_mean) / t2m_std`` from the data's own
normalization), without the 4 foot-contact features, padded frames are zero in that space (as
the ground-truth loader pads them); the GRU runs over ``length // 4`` movement steps. Embeddings
are returned in input order (the original returns them sorted by length, with the texts reordered
the same way: every metric computed per batch is unchanged).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..checkpoint import CheckpointError
from ..safe_load import load_weights

__all__ = ["POS_ENUMERATOR", "VIP_DICT", "WordVectorizer", "OfficialT2MEvaluator", "load_t2m_evaluator",
           "T2M_RELEASE"]

T2M_RELEASE = ("GuyTevet/motion-diffusion-model: bash prepare/download_t2m_evaluators.sh (t2m/) and "
               "bash prepare/download_glove.sh (glove/), run from the repository root whose dataset/ "
               "holds t2m_mean.npy and t2m_std.npy")

POS_ENUMERATOR = {"VERB": 0, "NOUN": 1, "DET": 2, "ADP": 3, "NUM": 4, "AUX": 5, "PRON": 6, "ADJ": 7,
                  "ADV": 8, "Loc_VIP": 9, "Body_VIP": 10, "Obj_VIP": 11, "Act_VIP": 12, "Desc_VIP": 13,
                  "OTHER": 14}
VIP_DICT = {
    "Loc_VIP": ("left", "right", "clockwise", "counterclockwise", "anticlockwise", "forward", "back",
                "backward", "up", "down", "straight", "curve"),
    "Body_VIP": ("arm", "chin", "foot", "feet", "face", "hand", "mouth", "leg", "waist", "eye", "knee",
                 "shoulder", "thigh"),
    "Obj_VIP": ("stair", "dumbbell", "chair", "window", "floor", "car", "ball", "handrail", "baseball",
                "basketball"),
    "Act_VIP": ("walk", "run", "swing", "pick", "bring", "kick", "put", "squat", "throw", "hop", "dance",
                "jump", "turn", "stumble", "dance", "stop", "sit", "lift", "lower", "raise", "wash", "stand",
                "kneel", "stroll", "rub", "bend", "balance", "flap", "jog", "shuffle", "lean", "rotate",
                "spin", "spread", "climb"),
    "Desc_VIP": ("slowly", "carefully", "fast", "careful", "slow", "quickly", "happy", "angry", "sad",
                 "happily", "angrily", "sadly"),
}
MAX_TEXT_LEN = 20
UNIT_LENGTH = 4


class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, strings and numbers; refuses every global (a plain vocabulary pickle
    needs none, numpy integers aside)."""

    _ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a vocabulary file")


def load_plain_pickle(path: Path, what: str):
    """A pickle of plain data (the GloVe vocabulary files), refusing anything that runs code."""
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {what} {path}: {e}; it cannot be a plain vocabulary "
                              f"file, and loading it could run code") from None


class WordVectorizer:
    """``word/POS`` -> (300-d GloVe vector, 15-d POS one-hot), as the original's."""

    def __init__(self, vectors: np.ndarray, words: Sequence[str], word2idx: Dict[str, int]):
        self.word2vec = {w: np.asarray(vectors[int(word2idx[w])], dtype=np.float32) for w in words}
        if "unk" not in self.word2vec:
            raise CheckpointError("the GloVe vocabulary has no 'unk' entry (every released one has)")
        self.dim = int(np.asarray(vectors).shape[1])

    @classmethod
    def from_dir(cls, glove: Path, prefix: str = "our_vab") -> "WordVectorizer":
        files = [glove / f"{prefix}_data.npy", glove / f"{prefix}_words.pkl", glove / f"{prefix}_idx.pkl"]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"T2M evaluator: {f} is missing (GloVe vocabulary; {T2M_RELEASE})")
        vectors = np.load(files[0], allow_pickle=False)
        return cls(vectors, load_plain_pickle(files[1], "GloVe words"), load_plain_pickle(files[2], "GloVe index"))

    @staticmethod
    def pos_onehot(pos: str) -> np.ndarray:
        v = np.zeros(len(POS_ENUMERATOR), dtype=np.float32)
        v[POS_ENUMERATOR.get(pos, POS_ENUMERATOR["OTHER"])] = 1
        return v

    def __getitem__(self, item: str) -> Tuple[np.ndarray, np.ndarray]:
        word, pos = item.split("/")[:2] if "/" in item else (item, "OTHER")
        if word in self.word2vec:
            vip = next((k for k, v in VIP_DICT.items() if word in v), None)
            return self.word2vec[word], self.pos_onehot(vip if vip is not None else pos)
        return self.word2vec["unk"], self.pos_onehot("OTHER")

    def caption(self, tokens: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, int]:
        """(word vectors [22, 300], POS one-hots [22, 15], length) of one caption's tokens."""
        tokens = list(tokens)
        if len(tokens) < MAX_TEXT_LEN:
            tokens = ["sos/OTHER"] + tokens + ["eos/OTHER"]
            n = len(tokens)
            tokens = tokens + ["unk/OTHER"] * (MAX_TEXT_LEN + 2 - n)
        else:
            tokens = ["sos/OTHER"] + tokens[:MAX_TEXT_LEN] + ["eos/OTHER"]
            n = len(tokens)
        pairs = [self[t] for t in tokens]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), n


class MovementConvEncoder(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.main = nn.Sequential(nn.Conv1d(input_size, hidden_size, 4, 2, 1), nn.Dropout(0.2),
                                  nn.LeakyReLU(0.2), nn.Conv1d(hidden_size, output_size, 4, 2, 1),
                                  nn.Dropout(0.2), nn.LeakyReLU(0.2))
        self.out_net = nn.Linear(output_size, output_size)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.out_net(self.main(inputs.permute(0, 2, 1)).permute(0, 2, 1))


class _BiGRUCo(nn.Module):
    """The shared shape of TextEncoderBiGRUCo / MotionEncoderBiGRUCo after their input layers."""

    def _init(self, hidden_size: int, output_size: int):
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True, bidirectional=True)
        self.output_net = nn.Sequential(nn.Linear(hidden_size * 2, hidden_size), nn.LayerNorm(hidden_size),
                                        nn.LeakyReLU(0.2), nn.Linear(hidden_size, output_size))
        self.hidden_size = hidden_size
        self.hidden = nn.Parameter(torch.randn((2, 1, hidden_size)))

    def _run(self, input_embs: Tensor, lengths: Tensor) -> Tensor:
        hidden = self.hidden.repeat(1, input_embs.shape[0], 1)
        emb = pack_padded_sequence(input_embs, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, last = self.gru(emb, hidden)
        return self.output_net(torch.cat([last[0], last[1]], dim=-1))


class TextEncoderBiGRUCo(_BiGRUCo):
    def __init__(self, word_size: int, pos_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.pos_emb = nn.Linear(pos_size, word_size)
        self.input_emb = nn.Linear(word_size, hidden_size)
        self._init(hidden_size, output_size)

    def forward(self, word_embs: Tensor, pos_onehot: Tensor, cap_lens: Tensor) -> Tensor:
        return self._run(self.input_emb(word_embs + self.pos_emb(pos_onehot)), cap_lens)


class MotionEncoderBiGRUCo(_BiGRUCo):
    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.input_emb = nn.Linear(input_size, hidden_size)
        self._init(hidden_size, output_size)

    def forward(self, inputs: Tensor, m_lens: Tensor) -> Tensor:
        return self._run(self.input_emb(inputs), m_lens)


class OfficialT2MEvaluator(nn.Module):
    """The released evaluator: ``encode_text(tokens)`` and ``encode_motion(motion, mask)`` give
    the 512-d co-embeddings the standard metrics (R-precision, MM-Dist, FID, Diversity,
    MultiModality) are computed on, with Euclidean distances."""

    kind = "t2m_official"
    reads_tokens = True  # captions as word/POS tokens, like the built-in evaluator
    metric = "euclidean"

    def __init__(self, vectorizer: WordVectorizer, eval_mean: Tensor, eval_std: Tensor, *, dim_pose: int = 263,
                 dim_movement_enc_hidden: int = 512, dim_movement_latent: int = 512, dim_text_hidden: int = 512,
                 dim_motion_hidden: int = 1024, dim_coemb_hidden: int = 512):
        super().__init__()
        self.vectorizer = vectorizer
        self.movement_encoder = MovementConvEncoder(dim_pose - 4, dim_movement_enc_hidden, dim_movement_latent)
        self.text_encoder = TextEncoderBiGRUCo(vectorizer.dim, len(POS_ENUMERATOR), dim_text_hidden, dim_coemb_hidden)
        self.motion_encoder = MotionEncoderBiGRUCo(dim_movement_latent, dim_motion_hidden, dim_coemb_hidden)
        self.register_buffer("eval_mean", torch.as_tensor(eval_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("eval_std", torch.as_tensor(eval_std, dtype=torch.float32), persistent=False)
        self.data_mean: Optional[Tensor] = None
        self.data_std: Optional[Tensor] = None
        self.dim_pose = dim_pose

    def set_data_normalization(self, mean, std) -> "OfficialT2MEvaluator":
        """The normalization of the motions it will be given (the dataset's Mean/Std): they are
        renormalized to the evaluator's own before encoding, as MDM's eval loader does."""
        self.data_mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.data_std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        return self

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, tokens_batch: Sequence[Sequence[str]]) -> Tuple[Tensor, Tensor, Tensor]:
        rows = [self.vectorizer.caption(t) for t in tokens_batch]
        dev = self.eval_mean.device
        return (torch.from_numpy(np.stack([r[0] for r in rows])).to(dev),
                torch.from_numpy(np.stack([r[1] for r in rows])).to(dev),
                torch.tensor([r[2] for r in rows], dtype=torch.long))

    def encode_text(self, tokens_batch: Sequence[Sequence[str]]) -> Tensor:
        return self.text_encoder(*self.tokenize(tokens_batch))

    # ---- motion ---------------------------------------------------------------------------------
    def encode_eval_normalized(self, motions: Tensor, m_lens: Tensor) -> Tensor:
        """``motions [B, T, 263]`` already in the evaluator's normalization (the original's input)."""
        movements = self.movement_encoder(motions[..., :-4])
        return self.motion_encoder(movements, torch.div(m_lens, UNIT_LENGTH, rounding_mode="floor"))

    def encode_motion(self, motion: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``motion [B, T, 263]`` in the data's normalization (``set_data_normalization``) with a
        bool prefix ``mask [B, T]``."""
        if self.data_mean is None:
            raise ValueError("call set_data_normalization(mean, std) first: the T2M evaluator reads "
                             "motions in its own normalization, renormalized from the data's")
        B, T, F = motion.shape
        if F != self.dim_pose:
            raise ValueError(f"motion must be [B, T, {self.dim_pose}], got {tuple(motion.shape)}")
        lengths = mask.sum(1) if mask is not None else torch.full((B,), T, device=motion.device)
        if bool((lengths < UNIT_LENGTH).any()):
            raise ValueError(f"every motion needs >= {UNIT_LENGTH} frames for the T2M evaluator")
        dev = motion.device
        raw = motion.float() * self.data_std.to(dev) + self.data_mean.to(dev)
        x = (raw - self.eval_mean) / self.eval_std
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)  # zero padding in the evaluator's space, as for real motions
        return self.encode_eval_normalized(x, lengths.cpu())


def _find(d: Path, candidates: List[str], what: str) -> Path:
    for c in candidates:
        if (d / c).is_file():
            return d / c
    raise FileNotFoundError(f"T2M evaluator: {what} not found under {d} (looked for {', '.join(candidates)}; "
                            f"{T2M_RELEASE})")


def load_t2m_evaluator(root: Union[str, Path], dataset: str = "t2m", map_location="cpu") -> OfficialT2MEvaluator:
    """The released T2M evaluator under ``root`` (see the module docstring for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"T2M evaluator directory not found: {root} ({T2M_RELEASE})")
    tar = _find(root, [f"{dataset}/text_mot_match/model/finest.tar", "text_mot_match/model/finest.tar"],
                "finest.tar")
    glove = tar.parents[3] / "glove" if (tar.parents[3] / "glove").is_dir() else root / "glove"
    mean = _find(root, [f"dataset/{dataset}_mean.npy", f"{dataset}_mean.npy",
                        f"{dataset}/Comp_v6_KLD01/meta/mean.npy"], "the evaluator's mean")
    std = mean.with_name(mean.name.replace("mean", "std"))
    if not std.is_file():
        raise FileNotFoundError(f"T2M evaluator: {std} is missing beside {mean} ({T2M_RELEASE})")
    vec = WordVectorizer.from_dir(glove)
    ev_mean, ev_std = np.load(mean, allow_pickle=False), np.load(std, allow_pickle=False)
    ck = load_weights(tar, what="T2M evaluator checkpoint")
    for part in ("movement_encoder", "text_encoder", "motion_encoder"):
        if not isinstance(ck, dict) or part not in ck:
            raise CheckpointError(f"{tar} has no '{part}' state dict: not the text_mot_match finest.tar")
    try:  # the sizes are the weights' (the release's: 512 / 512 / 512 / 1024 / 512)
        sizes = dict(dim_movement_enc_hidden=ck["movement_encoder"]["main.0.weight"].shape[0],
                     dim_movement_latent=ck["movement_encoder"]["main.3.weight"].shape[0],
                     dim_text_hidden=ck["text_encoder"]["input_emb.weight"].shape[0],
                     dim_motion_hidden=ck["motion_encoder"]["input_emb.weight"].shape[0],
                     dim_coemb_hidden=ck["text_encoder"]["output_net.3.weight"].shape[0])
        word = ck["text_encoder"]["pos_emb.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{tar}: {e} is missing: not the text_mot_match finest.tar") from None
    if word != vec.dim:
        raise CheckpointError(f"{tar} reads {word}-d word vectors, {glove} holds {vec.dim}-d ones")
    model = OfficialT2MEvaluator(vec, torch.from_numpy(ev_mean), torch.from_numpy(ev_std),
                                 dim_pose=int(ev_mean.shape[0]), **{k: int(v) for k, v in sizes.items()})
    for part in ("movement_encoder", "text_encoder", "motion_encoder"):
        try:
            getattr(model, part).load_state_dict(ck[part], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{tar}: '{part}' does not fit the T2M evaluator: {e}") from None
    model.epoch = int(ck.get("epoch", -1))
    model.source = str(tar)
    return model.to(map_location).eval()
