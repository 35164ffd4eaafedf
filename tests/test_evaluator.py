"""T2M-style evaluator: vocabulary/POS, tokenize, shapes, masks, losses, toy training."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from sopo_ext.models.evaluator import (POS_CATEGORIES, EvaluatorConfig, MotionTextEvaluator,
                                       Vocabulary, build_vocab, distance_info_nce,
                                       margin_contrastive_loss, parse_token, pos_category)

NF = 263
CAPTIONS = [
    "a/DET person/NOUN walks/VERB forward/ADV",
    "someone/PRON jumps/VERB twice/NUM",
    "the/DET man/NOUN waves/VERB his/PRON left/ADJ hand/NOUN",
    "a/DET figure/NOUN sits/VERB down/ADV slowly/ADV",
    "person/NOUN kicks/VERB with/ADP the/DET right/ADJ leg/NOUN",
    "a/DET woman/NOUN turns/VERB around/ADV",
    "squats/VERB three/NUM times/NOUN",
    "runs/VERB in/ADP a/DET circle/NOUN and/CCONJ stops/VERB",
]
TOKENS = [c.split() for c in CAPTIONS]


@pytest.fixture
def one_thread():
    # tiny ops: 2 threads on a shared 2-core machine mostly spin-wait
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> MotionTextEvaluator:
    cfg = dict(vocab=build_vocab(TOKENS), word_dim=16, text_hidden=16, movement_hidden=16,
               movement_dim=16, motion_hidden=16, embed_dim=24)
    cfg.update(kw)
    torch.manual_seed(0)
    return MotionTextEvaluator(EvaluatorConfig(**cfg))


def motions(B=3, T=11, lengths=(11, 6, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    motion = torch.randn(B, T, NF, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return motion * mask[..., None], mask


# ----------------------------------------------------------------------------- vocabulary
def test_parse_and_pos_mapping():
    assert parse_token("Walks/VERB") == ("walks", "VERB")
    assert parse_token("a/b/NOUN") == ("a/b", "NOUN")  # split on the last "/"
    assert parse_token("nopos") == ("nopos", "OTHER")
    assert pos_category("walks", "VERB") == "VERB"
    assert pos_category("left", "ADJ") == "Loc_VIP"
    assert pos_category("hand", "NOUN") == "Body_VIP"
    assert pos_category("chair", "NOUN") == "Obj_VIP"
    assert pos_category("walk", "VERB") == "Act_VIP"
    assert pos_category("slowly", "ADV") == "Desc_VIP"
    assert pos_category("and", "CCONJ") == "OTHER"
    assert pos_category("x", "PROPN") == "OTHER"
    assert len(POS_CATEGORIES) == 15 and POS_CATEGORIES[-1] == "OTHER"


def test_build_vocab_min_count_order_and_json():
    v = build_vocab([["a/DET", "b/NOUN", "A/DET"], ["b/NOUN", "c/VERB", "a/DET"]], min_count=2)
    assert v == ["a", "b"]  # a: 3, b: 2, c: 1 dropped
    assert EvaluatorConfig.build_vocab(TOKENS) == build_vocab(TOKENS)
    cfg = EvaluatorConfig(vocab=v)
    assert EvaluatorConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg
    voc = Vocabulary(v)
    assert voc["<pad>"] == 0 and voc["<unk>"] == 1 and voc["a"] == 4 and voc["zzz"] == 1
    with pytest.raises(ValueError, match="vocab"):
        EvaluatorConfig(vocab=["a", "a"])
    with pytest.raises(ValueError, match="vocab"):
        EvaluatorConfig(vocab=["<unk>"])
    with pytest.raises(ValueError, match="min_count"):
        build_vocab(TOKENS, min_count=0)


def test_tokenize_unknown_lengths_truncation():
    m = tiny(vocab=["walks", "person"])
    ids, pos, lengths = m.tokenize([["person/NOUN", "walks/VERB", "zigzag/NOUN"], ["walks/VERB"]])
    assert ids.shape == (2, 5) and pos.shape == (2, 5, 15)
    assert lengths.tolist() == [5, 3]  # + <sos>, <eos>
    voc = m.vocabulary
    assert ids[0].tolist() == [voc["<sos>"], voc["person"], voc["walks"], voc["<unk>"], voc["<eos>"]]
    assert ids[1].tolist() == [voc["<sos>"], voc["walks"], voc["<eos>"], 0, 0]
    names = [POS_CATEGORIES[i] for i in pos[0].argmax(-1).tolist()]
    assert names == ["OTHER", "NOUN", "VERB", "NOUN", "OTHER"]  # unknown word keeps its POS
    assert pos[1, 3:].abs().sum() == 0 and torch.all(pos[0].sum(-1) == 1)
    ids, pos, lengths = m.tokenize([["walks/VERB"] * 30])
    assert lengths.tolist() == [22] and ids.shape == (1, 22)  # 20 words + sos/eos (T2M)
    ids, pos, lengths = m.tokenize([["walks/VERB"] * 30], max_words=5)
    assert lengths.tolist() == [7]


# ----------------------------------------------------------------------------- encoders
def test_shapes_and_padding_invariance():
    m = tiny().eval()
    motion, mask = motions()
    z = m.encode_motion(motion, mask)
    assert z.shape == (3, 24) and torch.isfinite(z).all()
    noisy = motion + 50.0 * torch.randn_like(motion) * (~mask)[..., None]
    torch.testing.assert_close(m.encode_motion(noisy, mask), z, rtol=1e-5, atol=1e-5)
    longer = torch.cat([motion, torch.randn(3, 7, NF)], 1)
    lmask = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], 1)
    torch.testing.assert_close(m.encode_motion(longer, lmask), z, rtol=1e-5, atol=1e-5)
    for b, L in enumerate((11, 6, 3)):  # alone, unpadded, odd lengths
        torch.testing.assert_close(m.encode_motion(motion[b:b + 1, :L]), z[b:b + 1],
                                   rtol=1e-5, atol=1e-5)
    # the foot contacts (last 4 features) are ignored, like T2M
    contacts = motion.clone()
    contacts[..., -4:] += 3.0
    torch.testing.assert_close(m.encode_motion(contacts, mask), z)
    t = m.encode_text(TOKENS[:3])
    assert t.shape == (3, 24)
    # text: batching / padding does not change a caption's embedding
    torch.testing.assert_close(m.encode_text(TOKENS[1:2]), t[1:2], rtol=1e-5, atol=1e-5)


def test_margin_loss_matches_naive():
    g = torch.Generator().manual_seed(2)
    t, mo = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[0, 2] = allowed[2, 0] = False
    pos, neg = [], []
    for i in range(4):
        for j in range(4):
            d = float((t[i] - mo[j]).norm())
            if i == j:
                pos.append(d ** 2)
            elif allowed[i, j]:
                neg.append(max(2.0 - d, 0.0) ** 2)
    want = sum(pos) / len(pos) + sum(neg) / len(neg)
    got = margin_contrastive_loss(t, mo, 2.0, allowed)
    assert abs(float(got) - want) < 1e-5
    logits = -torch.cdist(t, mo) / 0.5
    lt = logits.masked_fill(~allowed, float("-inf"))
    ref = 0.5 * (F.cross_entropy(lt, torch.arange(4)) + F.cross_entropy(lt.T, torch.arange(4)))
    torch.testing.assert_close(distance_info_nce(t, mo, 0.5, allowed), ref)


def test_training_loss_gradients_reach_all_parameters():
    m = tiny().train()
    motion, mask = motions()
    out = m.training_loss(motion, mask, TOKENS[:3])
    assert set(out) == {"loss", "mean_pos_dist", "mean_neg_dist"}
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_duplicate_captions_are_not_negatives():
    m = tiny(loss="infonce").eval()
    motion, mask = motions()
    toks = [TOKENS[0], TOKENS[1], TOKENS[0]]
    with torch.no_grad():
        out = m.training_loss(motion, mask, toks)
        t, mo = m.encode_text(toks), m.encode_motion(motion, mask)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[0, 2] = allowed[2, 0] = False
    torch.testing.assert_close(out["loss"], distance_info_nce(t, mo, 1.0, allowed))


def test_bad_inputs_raise_value_error():
    m = tiny().eval()
    motion, mask = motions()
    with pytest.raises(ValueError, match="motion"):
        m.encode_motion(torch.randn(3, 11, 259), mask)
    with pytest.raises(ValueError, match="mask"):
        m.encode_motion(motion, mask[:2])
    with pytest.raises(ValueError, match="prefix"):
        m.encode_motion(motion, mask.flip(1))
    with pytest.raises(ValueError, match="valid"):
        m.encode_motion(motion, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"tokens_batch\[1\]"):
        m.encode_text([TOKENS[0], []])
    with pytest.raises(ValueError, match="tokens_batch"):
        m.encode_text([])
    with pytest.raises(ValueError, match=r"tokens_batch\[0\]"):
        m.encode_text(["a/DET person/NOUN"])
    with pytest.raises(ValueError, match="tokens_batch"):
        m(motion, mask, TOKENS[:2])
    with pytest.raises(ValueError, match="loss"):
        EvaluatorConfig(loss="hinge")


def test_toy_retrieval_reaches_one(one_thread):
    m = tiny(dropout=0.0)
    B, T = 8, 16
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([16, 12, 9, 16, 5, 14, 10, 16])
    mask = torch.arange(T)[None] < lengths[:, None]
    motion = torch.randn(B, T, NF, generator=g) * mask[..., None]
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(150):
        opt.zero_grad()
        m.training_loss(motion, mask, TOKENS)["loss"].backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        d = torch.cdist(m.encode_text(TOKENS), m.encode_motion(motion, mask))
    assert torch.equal(d.argmin(1), torch.arange(B))
    assert torch.equal(d.argmin(0), torch.arange(B))


def test_checkpoint_round_trip_carries_vocab(tmp_path):
    from sopo_ext.checkpoint import load_checkpoint, save_checkpoint
    m = tiny().eval()
    save_checkpoint(tmp_path / "ev", m)
    r = load_checkpoint(tmp_path / "ev", "evaluator").model
    assert r.config.vocab == m.config.vocab
    motion, mask = motions()
    with torch.no_grad():
        torch.testing.assert_close(r.encode_text(TOKENS[:3]), m.encode_text(TOKENS[:3]))
        torch.testing.assert_close(r.encode_motion(motion, mask), m.encode_motion(motion, mask))
