"""Tests of the HumanML3D loader (sopo_ext.data.humanml3d) on tiny fake trees in tmp_path."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sopo_ext.data.humanml3d import (HumanML3D, collate_motions, parse_caption_line,
                                     to_mdm_layout)

F = 263
SAMPLE_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "humanml3d-sample"

WHOLE = "a person walks forward#a/DET person/NOUN walk/VERB forward/ADV#0.0#0.0"
WHOLE2 = "someone strolls ahead#someone/PRON stroll/VERB ahead/ADV#0.0#0.0"


def _write_tree(root: Path, clips: dict, texts: dict, splits: dict, mean=None, std=None, seed=0):
    rng = np.random.default_rng(seed)
    (root / "new_joint_vecs").mkdir(parents=True, exist_ok=True)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    arrays = {}
    for cid, T in clips.items():
        a = T if isinstance(T, np.ndarray) else rng.standard_normal((T, F)).astype(np.float32)
        arrays[cid] = a
        np.save(root / "new_joint_vecs" / f"{cid}.npy", a)
    for cid, lines in texts.items():
        (root / "texts" / f"{cid}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, ids in splits.items():
        (root / f"{name}.txt").write_text("\n".join(ids) + "\n")
    if mean is None:
        mean = rng.standard_normal(F).astype(np.float32)
    if std is None:
        std = (0.5 + rng.random(F)).astype(np.float32)
    np.save(root / "Mean.npy", mean)
    np.save(root / "Std.npy", std)
    return arrays, mean, std


@pytest.fixture
def tree(tmp_path):
    clips = {"000001": 100, "M000001": 100, "000002": 30, "000003": 250, "000004": 196,
             "000005": 197, "000006": 60, "000007": 180, "000008": 120}
    texts = {
        "000001": [WHOLE, WHOLE2, "he turns around#he/PRON turn/VERB around/ADV#1.0#4.0"],
        "M000001": [WHOLE],
        "000002": [WHOLE],  # too short -> dropped
        # whole clip too long: the original drops it *with its crops* (clip_length_gate)
        "000003": [WHOLE, "jumps#jump/VERB#2.0#7.5"],
        "000004": [WHOLE],  # exactly max_len -> kept
        "000005": [WHOLE],  # 197: dropped by strict, kept by 'original'
        "000006": [WHOLE, "", WHOLE2],  # blank line ignored
        # crop 2.0-7.5 s (frames 40:150) kept, 0-1 s (20 frames) too short, 3-2 s empty
        "000007": [WHOLE, "jumps#jump/VERB#2.0#7.5", "hops#hop/VERB#0.0#1.0", "odd#x/N#3.0#2.0"],
        "000008": ["sits#sit/VERB#1.0#4.0"],  # only a crop caption: no whole-clip sample
    }
    ids = list(clips)
    arrays, mean, std = _write_tree(tmp_path, clips, texts, {"train": ids, "val": ["000006"],
                                                             "test": ["000002"]})
    return tmp_path, arrays, mean, std


def _load(*a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HumanML3D(*a, **k)


# ----------------------------------------------------------------------------- counts / parsing
def test_sample_counts_and_crops(tree):
    root, arrays, *_ = tree
    with pytest.warns(UserWarning, match="length_filter"):
        ds = HumanML3D(root, "train")
    names = sorted(s.name for s in ds.samples)
    assert names == sorted(["000001", "C3_000001", "M000001", "000004", "000006", "000007",
                            "C2_000007", "C1_000008"])
    assert len(ds) == 8
    assert ds.skipped["clip_length_gate"] == 2  # 000002 (30), 000003 (250, with its crop)
    assert ds.skipped["length_filter"] == 2  # whole 000005 (197), crop 0-1 s of 000007
    assert ds.skipped["empty_crop"] == 1
    by = {s.name: s for s in ds.samples}
    assert (by["C3_000001"].start, by["C3_000001"].stop) == (20, 80)
    assert (by["C2_000007"].start, by["C2_000007"].stop) == (40, 150)
    assert (by["C1_000008"].start, by["C1_000008"].stop) == (20, 80)
    assert len(by["000001"].captions) == 2 and len(by["C3_000001"].captions) == 1
    assert len(by["000006"].captions) == 2
    assert ds.num_captions == 10
    item = ds[[s.name for s in ds.samples].index("C2_000007")]
    assert item["length"] == 110 and item["motion"].shape == (110, F)
    assert item["caption"] == "jumps" and item["tokens"] == ["jump/VERB"]
    assert item["clip_id"] == "000007" and (item["start"], item["end"]) == (2.0, 7.5)


def test_original_length_rule_and_unit_length(tree):
    root, *_ = tree
    ds = _load(root, "train", length_rule="original")
    assert "000005" in {s.name for s in ds.samples} and len(ds) == 9
    i = [s.name for s in ds.samples].index("000005")
    assert ds[i]["motion"].shape == (196, F) and ds[i]["length"] == 196
    ds = _load(root, "train", unit_length=4)
    for k in range(len(ds)):
        it = ds[k]
        assert it["length"] % 4 == 0 and it["motion"].shape[0] == it["length"]


def test_parse_caption_line():
    c = parse_caption_line("a man jumps.#a/DET man/NOUN jump/VERB#1.5#3.0\n", 7)
    assert c.text == "a man jumps." and c.tokens == ("a/DET", "man/NOUN", "jump/VERB")
    assert (c.start, c.end, c.line, c.whole_clip) == (1.5, 3.0, 7, False)
    c = parse_caption_line("x#x/NOUN#nan#nan")  # original maps NaN to 0 -> whole clip
    assert c.whole_clip
    assert parse_caption_line("x##0.0#0.0").tokens == ()
    assert parse_caption_line("x#x/N#2.0#1.0").end == 1.0  # empty crop: dropped by the loader
    for bad in ["only caption", "a#b#c", "a#b/N#x#1.0", "a#b/N#-1#2", "a#b/N#0#inf"]:
        with pytest.raises(ValueError):
            parse_caption_line(bad)


# ----------------------------------------------------------------------------- normalization
def test_normalization_matches_numpy(tree):
    root, arrays, mean, std = tree
    for lazy in (False, True):
        ds = _load(root, "train", lazy=lazy)
        i = [s.name for s in ds.samples].index("C3_000001")
        got = ds[i]["motion"].numpy()
        want = (arrays["000001"][20:80] - mean) / std
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert ds[i]["motion"].dtype == torch.float32
        np.testing.assert_allclose(ds.denormalize(ds[i]["motion"]).numpy(), arrays["000001"][20:80],
                                   rtol=1e-5, atol=1e-5)
    raw = _load(root, "train", normalize=False)
    j = [s.name for s in raw.samples].index("000004")
    np.testing.assert_array_equal(raw[j]["motion"].numpy(), arrays["000004"])
    assert raw.mean_path == root / "Mean.npy" and raw.std_path == root / "Std.npy"
    assert raw.split_path == root / "train.txt"


def test_zero_std_is_not_divided(tmp_path):
    std = np.ones(F, np.float32)
    std[5] = 0.0
    arrays, mean, _ = _write_tree(tmp_path, {"a": 50}, {"a": [WHOLE]}, {"train": ["a"]}, std=std)
    ds = _load(tmp_path)
    x = ds[0]["motion"].numpy()
    assert np.isfinite(x).all()
    np.testing.assert_allclose(x[:, 5], arrays["a"][:, 5] - mean[5], rtol=1e-6)


# ----------------------------------------------------------------------------- determinism
def test_caption_choice_deterministic_by_seed_and_epoch(tree):
    root, *_ = tree
    ds1, ds2 = _load(root, "train", seed=3), _load(root, "train", seed=3)
    i = [s.name for s in ds1.samples].index("000001")

    def caps(ds, epochs):
        out = []
        for e in epochs:
            ds.set_epoch(e)
            out.append(tuple(ds[i]["caption"] for _ in range(3)))  # same within an epoch
        return out

    a, b = caps(ds1, range(20)), caps(ds2, range(20))
    assert a == b
    assert all(len(set(t)) == 1 for t in a)
    assert len({t[0] for t in a}) == 2  # both captions are drawn over the epochs
    ds3 = _load(root, "train", seed=4)
    assert caps(ds3, range(20)) != a


# ----------------------------------------------------------------------------- collate
def test_collate_and_mdm_layout(tree):
    root, *_ = tree
    ds = _load(root, "train")
    batch = [ds[i] for i in range(len(ds))]
    lengths = [b["length"] for b in batch]
    out = collate_motions(batch)
    B, T = len(batch), max(lengths)
    assert out["motion"].shape == (B, T, F) and out["mask"].shape == (B, T)
    assert out["mask"].dtype == torch.bool
    assert out["lengths"].tolist() == lengths
    assert out["mask"].sum(1).tolist() == lengths
    for k, b in enumerate(batch):
        assert torch.equal(out["motion"][k, :lengths[k]], b["motion"])
        assert (out["motion"][k, lengths[k]:] == 0).all()
    assert out["captions"] == [b["caption"] for b in batch]
    fixed = collate_motions(batch, max_len=200)
    assert fixed["motion"].shape == (B, 200, F) and fixed["mask"].shape == (B, 200)
    with pytest.raises(ValueError, match="max_len"):
        collate_motions(batch, max_len=50)
    mdm = to_mdm_layout(out)
    assert mdm["motion"].shape == (B, F, 1, T) and mdm["mask"].shape == (B, 1, 1, T)
    assert torch.equal(mdm["motion"][:, :, 0, :].permute(0, 2, 1), out["motion"])
    assert torch.equal(mdm["mask"][:, 0, 0], out["mask"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_motions)
    assert sum(b["motion"].shape[0] for b in loader) == len(ds)


# ----------------------------------------------------------------------------- malformed input
def test_missing_paths(tmp_path, tree):
    root, *_ = tree
    with pytest.raises(FileNotFoundError, match="nope"):
        HumanML3D(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="foo.txt"):
        HumanML3D(root, "foo")
    (root / "Std.npy").rename(root / "Std.bak")
    with pytest.raises(FileNotFoundError, match="Std.npy"):
        HumanML3D(root)
    (root / "Std.bak").rename(root / "Std.npy")
    (root / "Mean.npy").unlink()
    with pytest.raises(FileNotFoundError, match="Mean.npy"):
        HumanML3D(root)


def test_missing_per_id_file(tmp_path):
    _write_tree(tmp_path, {"a": 50}, {"a": [WHOLE]}, {"train": ["a", "b"]})
    with pytest.raises(FileNotFoundError, match=r"b\.npy"):
        HumanML3D(tmp_path)
    with pytest.warns(UserWarning, match="missing_file"):
        ds = HumanML3D(tmp_path, strict=False)
    assert len(ds) == 1 and ds.skipped["missing_file"] == 1


def test_bad_caption_line_names_file_and_line(tmp_path):
    _write_tree(tmp_path, {"a": 50, "b": 50},
                {"a": [WHOLE], "b": [WHOLE, "broken line without fields", WHOLE2]},
                {"train": ["a", "b"]})
    with pytest.raises(ValueError, match=r"b\.txt:2"):
        HumanML3D(tmp_path)
    with pytest.warns(UserWarning, match="bad_caption_line") as rec:
        ds = HumanML3D(tmp_path, strict=False)
    assert len(rec) == 1 and "b.txt:2" in str(rec[0].message)
    assert len(ds) == 2 and ds.skipped["bad_caption_line"] == 1


def test_bad_times_name_file_and_line(tmp_path):
    _write_tree(tmp_path, {"a": 50}, {"a": [WHOLE, "x#x/N#abc#1.0"]}, {"train": ["a"]})
    with pytest.raises(ValueError, match=r"a\.txt:2.*start"):
        HumanML3D(tmp_path)


def test_ragged_captions_empty_tokens_and_text(tmp_path):
    _write_tree(tmp_path, {"a": 50}, {"a": ["walks##0.0#0.0", "#a/DET#0.0#0.0"]},
                {"train": ["a"]})
    with pytest.warns(UserWarning, match="empty_caption_text"):
        ds = HumanML3D(tmp_path)
    assert len(ds) == 1 and ds[0]["caption"] == "walks" and ds[0]["tokens"] == []
    assert ds.skipped["captions_with_empty_tokens_kept"] == 1


def test_wrong_feature_width(tmp_path):
    _write_tree(tmp_path, {"a": 50, "b": np.zeros((50, 251), np.float32)},
                {"a": [WHOLE], "b": [WHOLE]}, {"train": ["a", "b"]})
    with pytest.raises(ValueError, match=r"b\.npy.*263"):
        HumanML3D(tmp_path)
    with pytest.raises(ValueError, match=r"b\.npy"):
        HumanML3D(tmp_path, lazy=True)


def test_bad_mean_std_shape(tmp_path):
    _write_tree(tmp_path, {"a": 50}, {"a": [WHOLE]}, {"train": ["a"]},
                mean=np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="Mean.npy"):
        HumanML3D(tmp_path)


def test_nonfinite_features_skipped_with_one_warning(tmp_path):
    bad = np.zeros((60, F), np.float32)
    bad[3, 7] = np.nan
    inf = np.zeros((60, F), np.float32)
    inf[0, 0] = np.inf
    _write_tree(tmp_path, {"a": 50, "b": bad, "c": inf},
                {k: [WHOLE, "x#x/N#0.5#2.5"] for k in "abc"}, {"train": ["a", "b", "c"]})
    for lazy in (False, True):
        with pytest.warns(UserWarning, match="nonfinite_features") as rec:
            ds = HumanML3D(tmp_path, lazy=lazy)
        assert len(rec) == 1
        assert ds.skipped["nonfinite_features"] == 2
        assert {s.clip_id for s in ds.samples} == {"a"} and len(ds) == 2


def test_empty_split_after_filtering_explains(tmp_path):
    _write_tree(tmp_path, {"a": 20, "b": 300}, {"a": [WHOLE], "b": [WHOLE]},
                {"train": ["a", "b"], "val": []})
    with pytest.raises(ValueError, match=r"empty after filtering.*min_len=40.*< 200.*max_len=196"):
        _load(tmp_path)
    with pytest.raises(ValueError, match="empty after filtering"):
        _load(tmp_path, "val")


# ----------------------------------------------------------------------------- real clip
@pytest.mark.skipif(not (SAMPLE_DIR / "new_joint_vecs" / "012314.npy").is_file(),
                    reason="shared HumanML3D sample absent")
def test_real_clip(tmp_path):
    x = np.load(SAMPLE_DIR / "new_joint_vecs" / "012314.npy")
    mean = np.load(SAMPLE_DIR / "Mean.npy")
    std = np.load(SAMPLE_DIR / "Std.npy")
    root = tmp_path / "hml"
    _write_tree(root, {"012314": x},
                {"012314": [WHOLE, "turns#turn/VERB#1.0#5.0"]}, {"test": ["012314"]},
                mean=mean, std=std)
    ds = HumanML3D(root, "test")
    assert len(ds) == 2
    by = {s.name: k for k, s in enumerate(ds.samples)}
    whole = ds[by["012314"]]
    assert whole["motion"].shape == (170, F) and whole["length"] == 170
    np.testing.assert_allclose(whole["motion"].numpy(), (x - mean) / std, rtol=1e-6, atol=1e-5)
    crop = ds[by["C2_012314"]]
    np.testing.assert_allclose(crop["motion"].numpy(), (x[20:100] - mean) / std,
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(ds.denormalize(whole["motion"]).numpy(), x, rtol=1e-5, atol=1e-5)
