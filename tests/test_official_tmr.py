"""The released TMR as the reward (sopo_ext.official.tmr), checked against the official class.

Fixtures (tests/fixtures/official/tmr_small*) were made by
``tests/fixtures/official/make_tmr_fixtures.py --repo <Mathux/TMR checkout>``: TMR's
``src/model/actor.py`` ``ACTORStyleEncoder`` at a small size with a seeded random init, saved as
``last_weights/{text,motion}_encoder.pt`` are, and ``mu`` (TEMOS.encode, sample_mean=True) of
token embeddings and of motions; plus the key -> shape tables of the release-size encoders.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sopo_ext.checkpoint import CheckpointError
from sopo_ext.official.tmr import ACTORStyleEncoder, TMRTextEncoder, load_tmr

FIX = Path(__file__).resolve().parent / "fixtures" / "official"
META = json.loads((FIX / "tmr_small.json").read_text())
IO = load_file(str(FIX / "tmr_small_io.safetensors"))


def run_dir(root: Path, mean=None, std=None) -> Path:
    """models/tmr_humanml3d_guoh3dfeats as the release unpacks it, stats in the TMR repository's place."""
    d = root / "models" / "tmr_humanml3d_guoh3dfeats"
    (d / "last_weights").mkdir(parents=True)
    for part in ("text_encoder", "motion_encoder"):
        shutil.copy(FIX / f"tmr_small_{part}.pt", d / "last_weights" / f"{part}.pt")
    s = root / "stats" / "humanml3d" / "guoh3dfeats"
    s.mkdir(parents=True)
    torch.save(torch.zeros(263) if mean is None else mean, s / "mean.pt")
    torch.save(torch.ones(263) if std is None else std, s / "std.pt")
    return d


def tiny_distilbert(root: Path, dim: int) -> Path:
    """A one-layer DistilBERT of width ``dim`` with a small word-piece vocabulary, saved as
    transformers saves one (offline: the test never downloads)."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "person", "walks", "forward", "raises",
             "the", "left", "right", "hand", "slowly", "turns", "around"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    DistilBertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(2)
    DistilBertModel(DistilBertConfig(vocab_size=len(words), dim=dim, n_layers=1, n_heads=2, hidden_dim=32,
                                     max_position_embeddings=64)).save_pretrained(root)
    return root


def test_release_size_keys_and_shapes_are_the_official_ones():
    for part, nfeats in (("text_encoder", 768), ("motion_encoder", 263)):
        ours = {k: list(v.shape) for k, v in ACTORStyleEncoder(nfeats).state_dict().items()}
        assert ours == META["release_size_keys"][part], part


def test_the_release_directory_loads_and_matches_the_official_encoders(tmp_path):
    tmr = load_tmr(run_dir(tmp_path))
    with torch.no_grad():
        mu_t = tmr.encode_text_tokens(IO["tokens"], IO["tokens_mask"])
        mu_m = tmr.encode_motion_tmr(IO["motion"], IO["motion_mask"])
    torch.testing.assert_close(mu_t, IO["mu_text"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu_m, IO["mu_motion"], rtol=1e-5, atol=1e-5)
    s = tmr.score(mu_t, mu_m)
    cos = torch.nn.functional.cosine_similarity(IO["mu_text"], IO["mu_motion"], dim=-1)
    torch.testing.assert_close(s, cos / 2 + 0.5)  # TMR's get_score_matrix on paired rows


def test_motions_are_renormalized_to_tmrs_statistics(tmp_path):
    g = torch.Generator().manual_seed(5)
    t_mean, t_std = torch.randn(263, generator=g), torch.rand(263, generator=g) + 0.5
    d_mean, d_std = torch.randn(263, generator=g), torch.rand(263, generator=g) + 0.5
    tmr = load_tmr(run_dir(tmp_path, t_mean, t_std)).set_data_normalization(d_mean, d_std)
    x_tmr, mask = IO["motion"], IO["motion_mask"]
    x_data = ((x_tmr * (t_std + 1e-12) + t_mean) - d_mean) / d_std
    with torch.no_grad():
        got = tmr.encode_motion(x_data * mask[..., None], mask)
    torch.testing.assert_close(got, IO["mu_motion"], rtol=1e-4, atol=1e-4)


def test_the_text_side_runs_once_per_caption_whatever_the_padding(tmp_path):
    d = run_dir(tmp_path)
    bert = tiny_distilbert(tmp_path / "distilbert", META["text_feats"])
    enc = TMRTextEncoder(d, distilbert=str(bert))
    caps = ["a person walks forward", "a person raises the left hand slowly and turns around", "a person"]
    together = enc.encode(caps)
    alone = torch.cat([enc.encode([c]) for c in caps])
    assert together.shape == (3, 16)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)  # padding never leaks
    tmr = load_tmr(d)
    x, m = enc.token_embeddings(caps)
    with torch.no_grad():
        torch.testing.assert_close(together, tmr.encode_text_tokens(x, m), rtol=1e-6, atol=1e-6)
    assert enc.name.startswith("tmr-official-text-") and enc.name == TMRTextEncoder(d, distilbert=str(bert)).name


def test_missing_files_say_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_pretrain_models"):
        load_tmr(tmp_path / "nothing")
    d = run_dir(tmp_path)
    shutil.rmtree(tmp_path / "stats")
    with pytest.raises(FileNotFoundError, match="mean.pt, std.pt"):
        load_tmr(d)
    (d / "last_weights" / "motion_encoder.pt").unlink()
    (d / "logs" / "checkpoints").mkdir(parents=True)
    (d / "logs" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="extract_ckpt"):
        load_tmr(d)
    torch.save({"projection.weight": torch.zeros(3, 3)}, d / "last_weights" / "motion_encoder.pt")
    with pytest.raises(CheckpointError, match="tokens"):
        load_tmr(d, stats=tmp_path)


def test_train_and_evaluate_with_the_released_tmr_as_the_reward(tiny_assets, tmp_path, capsys):
    from sopo_ext import evaluate, train
    d = run_dir(tmp_path)
    bert = tiny_distilbert(tmp_path / "distilbert", META["text_feats"])
    a = tiny_assets
    out = tmp_path / "run"
    rc = train.main(["--data", str(a["data"]), "--base", str(a["mdm"]), "--reward", f"tmr-official:{d}",
                     "--distilbert", str(bert), "--evaluator", "none", "--out", str(out), "--steps", "2",
                     "--batch-size", "4", "--k", "2", "--sampling-steps", "2", "--warmup", "1",
                     "--no-animation", "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    import csv
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r.get("reward")]
    assert len(rows) == 2 and all(0 <= float(r["reward"]) <= 1 for r in rows)
    j = tmp_path / "e.json"
    rc = evaluate.main(["--ckpt", str(out / "model"), "--data", str(a["data"]), "--evaluator", str(a["evaluator"]),
                        "--reward", f"tmr-official:{d}", "--distilbert", str(bert), "--samples", "32",
                        "--steps", "2", "--mm-captions", "0", "--replications", "1", "--json", str(j)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads(j.read_text())["summary"]
    assert 0 <= s["reward"]["mean"] <= 1 and 0 <= s["reward detail accuracy"]["mean"] <= 1
