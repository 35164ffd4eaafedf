"""The standard T2M evaluator (sopo_ext.official.t2m), checked against the official code.

Fixtures (tests/fixtures/official/t2m_small*) were made by
``tests/fixtures/official/make_t2m_fixtures.py --repo <GuyTevet/motion-diffusion-model checkout>``:
the official MovementConvEncoder / TextEncoderBiGRUCo / MotionEncoderBiGRUCo with a seeded random
init of a small size saved as the release's finest.tar, a 14-word GloVe vocabulary read by the
official WordVectorizer, captions framed as the official eval dataset frames them, and the
embeddings of get_co_embeddings (sorted by length, put back in input order); plus the key ->
shape table of the release-size evaluator.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from official_helpers import t2m_release_layout as release_layout
from sopo_ext.checkpoint import CheckpointError
from sopo_ext.official.t2m import (MovementConvEncoder, MotionEncoderBiGRUCo, OfficialT2MEvaluator,
                                   TextEncoderBiGRUCo, POS_ENUMERATOR, WordVectorizer, load_t2m_evaluator)

FIX = Path(__file__).resolve().parent / "fixtures" / "official"
META = json.loads((FIX / "t2m_small.json").read_text())
IO = load_file(str(FIX / "t2m_small_io.safetensors"))


def test_release_size_keys_and_shapes_are_the_official_ones():
    s = META["release_size_keys"]
    parts = {"movement_encoder": MovementConvEncoder(259, 512, 512),
             "text_encoder": TextEncoderBiGRUCo(300, len(POS_ENUMERATOR), 512, 512),
             "motion_encoder": MotionEncoderBiGRUCo(512, 1024, 512)}
    for name, m in parts.items():
        assert {k: list(v.shape) for k, v in m.state_dict().items()} == s[name], name


def test_small_evaluator_in_the_release_layout_matches_the_official_embeddings(tmp_path):
    # the fixture was made at the small size: build the loader's model at that size
    ev = _small_evaluator(tmp_path)
    with torch.no_grad():
        text = ev.encode_text(META["captions"])
        motion = ev.encode_eval_normalized(IO["motions"], IO["m_lens"])
    torch.testing.assert_close(text, IO["text_emb"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(motion, IO["motion_emb"], rtol=1e-5, atol=1e-5)
    # the word vectors / POS one-hots / lengths the official WordVectorizer and framing made
    w, p, n = ev.tokenize(META["captions"])
    torch.testing.assert_close(w, IO["word_embs"])
    torch.testing.assert_close(p, IO["pos_ohots"])
    assert n.tolist() == IO["cap_lens"].tolist() == [6, 10, 22]


def _small_evaluator(root: Path, layout="mdm", mean=None, std=None) -> OfficialT2MEvaluator:
    """The loader reads the evaluator's sizes off the weights: the small fixture loads as it is."""
    return load_t2m_evaluator(release_layout(root, mean, std, layout))


def test_motions_are_renormalized_from_the_datas_normalization(tmp_path):
    rng = np.random.default_rng(3)
    ev_mean, ev_std = rng.standard_normal(263).astype(np.float32), (0.5 + rng.random(263)).astype(np.float32)
    ev = _small_evaluator(tmp_path, "meta", ev_mean, ev_std)
    assert ev.epoch == 7
    d_mean, d_std = rng.standard_normal(263).astype(np.float32), (0.5 + rng.random(263)).astype(np.float32)
    ev.set_data_normalization(d_mean, d_std)
    x_eval, lens = IO["motions"], IO["m_lens"]
    mask = torch.arange(x_eval.shape[1])[None] < lens[:, None]
    raw = x_eval * torch.from_numpy(ev_std) + torch.from_numpy(ev_mean)
    x_data = (raw - torch.from_numpy(d_mean)) / torch.from_numpy(d_std)
    with torch.no_grad():
        got = ev.encode_motion(x_data * mask[..., None], mask)
    torch.testing.assert_close(got, IO["motion_emb"], rtol=1e-4, atol=1e-4)


def test_vocabulary_rules():
    vec = WordVectorizer(np.eye(4, dtype=np.float32), ["unk", "left", "walk", "a"],
                         {"unk": 0, "left": 1, "walk": 2, "a": 3})
    w, p = vec["left/ADJ"]
    assert w.tolist() == [0, 1, 0, 0] and p.argmax() == POS_ENUMERATOR["Loc_VIP"]  # VIP category wins
    w, p = vec["zebra/NOUN"]
    assert w.tolist() == [1, 0, 0, 0] and p.argmax() == POS_ENUMERATOR["OTHER"]  # unknown -> unk / OTHER
    assert vec["a/DET"][1].argmax() == POS_ENUMERATOR["DET"]
    assert vec["a/XYZ"][1].argmax() == POS_ENUMERATOR["OTHER"]


def test_missing_files_and_unsafe_vocabulary_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_t2m_evaluators"):
        load_t2m_evaluator(tmp_path / "nothing")
    root = release_layout(tmp_path / "r")
    (root / "glove" / "our_vab_idx.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="our_vab_idx.pkl is missing"):
        load_t2m_evaluator(root)

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    pickle.dump({"unk": Evil()}, open(root / "glove" / "our_vab_idx.pkl", "wb"))
    with pytest.raises(CheckpointError, match="refused to load GloVe index.*system"):
        load_t2m_evaluator(root)
    assert not (tmp_path / "pwned").exists()


def test_evaluate_uses_the_original_protocol_sizes_with_the_t2m_evaluator():
    from sopo_ext import evaluate
    ours = evaluate.parse_args([])
    assert (ours.replications, ours.samples, ours.mm_captions, ours.mm_repeats, ours.random_subset) == (3, None, 30, 10, False)
    t2m = evaluate.parse_args(["--evaluator", "t2m-official:/x"])
    assert (t2m.replications, t2m.samples, t2m.mm_captions, t2m.mm_repeats, t2m.random_subset) == (20, 1000, 100, 30, True)
    mine = evaluate.parse_args(["--evaluator", "t2m-official:/x", "--replications", "5", "--no-random-subset"])
    assert mine.replications == 5 and mine.random_subset is False and mine.samples == 1000
