"""sopo_ext.evaluation on constructed models whose right answers are known."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sopo_ext import evaluation as E


class SideEvaluator(nn.Module):
    """Embeds captions by the side they name (left -> +1, right -> -1) and motions by the sign of
    their first feature, so a motion 'is' a left or a right motion."""
    kind = "evaluator"

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens_batch):
        out = []
        for toks in tokens_batch:
            words = [t.rsplit("/", 1)[0] for t in toks]
            out.append([1.0 if "left" in words else -1.0 if "right" in words else 0.0, 0.0])
        return torch.tensor(out)

    def encode_motion(self, motion, mask):
        return torch.stack([motion[:, 0, 0].sign(), torch.zeros(len(motion))], dim=1)


def batch(sides, flip=False):
    toks = [f"a/DET person/NOUN waves/VERB the/DET {s}/ADJ hand/NOUN".split() for s in sides]
    x = torch.zeros(len(sides), 5, 263)
    for i, s in enumerate(sides):
        x[i, :, 0] = (1.0 if s == "left" else -1.0) * (-1 if flip else 1)
    return {"tokens": toks, "motion": x, "mask": torch.ones(len(sides), 5, dtype=torch.bool)}


def test_counterfactuals_swap_one_detail_at_a_time():
    toks = "the/DET person/NOUN jumps/VERB forward/ADV twice/NUM".split()
    cfs = E.counterfactual_tokens(toks)
    assert cfs == ["the/DET person/NOUN jumps/VERB backward/ADV twice/NUM".split(),
                   "the/DET person/NOUN jumps/VERB forward/ADV once/NUM".split()]
    assert E.counterfactual_tokens("a/DET person/NOUN sits/VERB down/ADP".split()) == []
    assert E.counterfactual_tokens(["Left"]) == [["right"]]


def test_detail_accuracy_is_one_for_right_and_zero_for_mirrored_motions():
    ev = SideEvaluator()
    b = batch(["left", "right", "left"])
    assert E.detail_accuracy(ev, [b]) == {"detail accuracy": 1.0, "detail pairs": 3.0}
    mirrored = [batch(["left", "right", "left"], flip=True)["motion"]]
    assert E.detail_accuracy(ev, [b], mirrored)["detail accuracy"] == 0.0
    half = [torch.cat([b["motion"][:2], mirrored[0][2:]])]
    assert E.detail_accuracy(ev, [b], half)["detail accuracy"] == pytest.approx(2 / 3)


class SideText:
    """A sentence encoder for the side a caption names: [1, 0] left, [-1, 0] right."""

    def encode(self, captions):
        return torch.tensor([[1.0 if "left" in c else -1.0 if "right" in c else 0.0, 0.0]
                             for c in captions])


class SideReward(nn.Module):
    """A reward model on top of it: text latent = the sentence embedding (plus a constant
    component, so the cosine is defined), motion latent = the side of the first feature."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_text(self, text_emb):
        return text_emb + torch.tensor([0.0, 1.0])

    def encode_motion(self, motion, mask):
        return torch.stack([motion[:, 0, 0].sign(), torch.ones(len(motion))], dim=1)

    @staticmethod
    def score(t, m):
        return torch.nn.functional.cosine_similarity(t, m, dim=-1) / 2 + 0.5


def test_counterfactual_captions_swap_words_in_the_text():
    assert E.counterfactual_captions("A man jumps forward twice.") == \
        ["A man jumps backward twice.", "A man jumps forward once."]
    assert E.counterfactual_captions("someone waves the Left hand") == ["someone waves the right hand"]
    assert E.counterfactual_captions("a person sits down") == []
    assert E.counterfactual_captions("leftover bright") == []  # whole words only


def test_reward_detail_accuracy_and_margin():
    b = batch(["left", "right", "left"])
    b["captions"] = [f"a person waves the {s} hand" for s in ["left", "right", "left"]]
    b["text_emb"] = SideText().encode(b["captions"])
    got = E.reward_detail_accuracy(SideReward(), [b], SideText())
    # right side: cos((1,1),(1,1)) = 1 -> score 1; wrong side: cos((-1,1),(1,1)) = 0 -> 0.5
    assert got == {"reward detail accuracy": 1.0, "reward detail margin": pytest.approx(0.5)}
    mirrored = [batch(["left", "right", "left"], flip=True)["motion"]]
    flipped = E.reward_detail_accuracy(SideReward(), [b], SideText(), mirrored)
    assert flipped == {"reward detail accuracy": 0.0, "reward detail margin": pytest.approx(-0.5)}
    b["captions"] = ["a person sits down"] * 3
    assert math.isnan(E.reward_detail_accuracy(SideReward(), [b], SideText())["reward detail accuracy"])


def test_detail_accuracy_without_detail_words_is_nan():
    b = {"tokens": [["a/DET", "person/NOUN", "sits/VERB"]], "motion": torch.zeros(1, 3, 263),
         "mask": torch.ones(1, 3, dtype=torch.bool)}
    assert math.isnan(E.detail_accuracy(SideEvaluator(), [b])["detail accuracy"])


def test_retrieval_metrics_on_a_perfectly_separable_set():
    torch.manual_seed(0)
    t = torch.randn(64, 16) * 10
    r = E.retrieval_metrics(t, t + 0.01 * torch.randn(64, 16), "euclidean")
    assert r["R@1"] == 1.0 and r["R@3"] == 1.0
    assert r["R-precision top1"] == 1.0 and r["MM-Dist"] < 0.1
    small = E.retrieval_metrics(t[:8], t[:8], "cosine")
    assert "R-precision top1" not in small and small["R@1"] == 1.0
