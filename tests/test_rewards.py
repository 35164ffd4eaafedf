"""Pluggable rewards (sopo_ext.rewards): a score reward drops into the step without touching it,
and the oracle diagnostic scores motions by the built-in data's geometric judge."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sopo_ext import SoPoConfig, SoPoTrainer
from sopo_ext import checkpoint as C
from sopo_ext.config import ConfigError
from sopo_ext.data import judge, skeleton as sk, synthetic
from sopo_ext.evaluation import reward_of_split
from sopo_ext.methods import PreferenceStep, StepConfig
from sopo_ext.rewards import OracleReward, is_score_reward
from sopo_ext.sampling import diffusion_from_meta


def _judged_motions(n=40, seed=5):
    """(normalized features [T, 263], spec, id) of judged motions straight from the generator,
    with the bundled MDM's normalization."""
    c = C.load_checkpoint("mdm", "mdm")
    out = []
    for i, spec in enumerate(synthetic.sample_specs(n, seed=seed)):
        if spec["family"] not in judge.DETAILS:
            continue
        feats = sk.features_from_joints(synthetic.synthesize_joints(spec, seed=i), fix_heading_wrap=True)
        out.append((((feats - c.mean.double()) / c.std.double()).float(), spec, f"m{i}"))
    return out, c.mean, c.std


class FixedScores(nn.Module):
    """A user's score reward: the k-th sample of every caption gets scores[k] (no model at
    all), and any motion embedding (here a fixed projection) for the reweighting."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)
        self.proj = nn.Linear(263, 8)

    def score_motions(self, text_emb, motion, mask, ids, k):
        assert motion.shape[0] == len(ids) * k
        return self.scores.repeat(len(ids))

    def encode_motion(self, motion, mask):
        return self.proj(motion.mean(1))


def test_oracle_scores_real_motions_one_and_mirrored_sides_lower():
    items, mean, std = _judged_motions()
    specs = {sid: spec for _, spec, sid in items}
    oracle = OracleReward(specs, mean, std, embedder=nn.Identity())
    assert is_score_reward(oracle) and not is_score_reward(nn.Linear(2, 2))
    T = max(x.shape[0] for x, _, _ in items)
    motion = torch.zeros(len(items), T, 263)
    mask = torch.zeros(len(items), T, dtype=torch.bool)
    for i, (x, _, _) in enumerate(items):
        motion[i, :x.shape[0]], mask[i, :x.shape[0]] = x, True
    ids = [sid for _, _, sid in items]
    s = oracle.score_motions(None, motion, mask, ids, 1)
    assert torch.equal(s, torch.ones(len(items)))
    # a mirrored motion gets "left" and "right" wrong: its side detail is judged false
    sided = [i for i, (_, spec, _) in enumerate(items) if "side" in judge.expected_details(spec)]
    assert len(sided) >= 5
    mirrored = motion.clone()
    for i in sided:
        L = int(mask[i].sum())
        raw = motion[i, :L].double() * std.double() + mean.double()
        mirrored[i, :L] = ((sk.mirror_features(raw) - mean.double()) / std.double()).float()
    sm = oracle.score_motions(None, mirrored, mask, ids, 1)
    for i in sided:
        n_details = len(judge.expected_details(items[i][1]))
        assert sm[i].item() == pytest.approx(1 - 1 / n_details)
    # unknown ids and captions without a judged detail have no score
    assert torch.isnan(oracle.score_motions(None, motion[:1], mask[:1], ["nope"], 1)).all()
    with pytest.raises(ValueError, match="captions x k"):
        oracle.score_motions(None, motion[:3], mask[:3], ids[:1], 2)


def test_a_score_reward_plugs_into_the_step_unchanged():
    """The step picks the worst and best samples by the plugged reward's own scores."""
    c = C.load_checkpoint("mdm", "mdm")
    diff = diffusion_from_meta(c.meta)
    B, T, k = 3, 16, 4
    g = torch.Generator().manual_seed(0)
    batch = {"text_emb": torch.randn(B, 384, generator=g), "mask": torch.ones(B, T, dtype=torch.bool),
             "motion": torch.randn(B, T, 263, generator=g), "ids": ["a", "b", "c"],
             "lengths": torch.full((B,), T)}
    scores = [0.9, 0.2, 0.7, 0.95]
    for method in ("sopo", "online-dpo"):
        step = PreferenceStep(copy.deepcopy(c.model), copy.deepcopy(c.model), diff, FixedScores(scores),
                              StepConfig(method=method, k=k, sampling_steps=2, tau=0.45))
        loss, stats = step(batch, torch.Generator().manual_seed(1))
        assert torch.isfinite(loss)
        assert stats["worst reward"].item() == pytest.approx(0.2)
        assert stats["reward"].item() == pytest.approx(np.mean(scores))
        assert stats["valuable"].item() == 1.0  # 0.2 < tau for every caption
    with pytest.raises(ValueError, match="'ids'"):
        step({k_: v for k_, v in batch.items() if k_ != "ids"}, torch.Generator().manual_seed(1))
    bad = PreferenceStep(c.model, copy.deepcopy(c.model), diff, FixedScores([0.5, 0.5]),
                         StepConfig(k=k, sampling_steps=2))
    with pytest.raises(ValueError, match=r"expected \[B\*K\]"):
        bad(batch, torch.Generator().manual_seed(1))


def test_reward_of_split_leaves_out_unscored_captions():
    items, mean, std = _judged_motions(12)
    specs = {sid: spec for _, spec, sid in items}
    oracle = OracleReward(specs, mean, std, embedder=nn.Identity())
    T = max(x.shape[0] for x, _, _ in items)
    b = {"motion": torch.zeros(len(items) + 1, T, 263), "mask": torch.zeros(len(items) + 1, T, dtype=torch.bool),
         "ids": [sid for _, _, sid in items] + ["unjudged"], "text_emb": torch.zeros(len(items) + 1, 384)}
    for i, (x, _, _) in enumerate(items):
        b["motion"][i, :x.shape[0]], b["mask"][i, :x.shape[0]] = x, True
    b["mask"][-1, :4] = True
    r = reward_of_split(oracle, [b])
    assert r.shape == (len(items) + 1,) and np.isnan(r[-1]) and (r[:-1] == 1).all()


def test_oracle_training_runs_on_builtin_data_only(tiny_assets, tmp_path, capsys):
    kw = dict(method="sopo", backbone="mdm", data=str(tiny_assets["data"]), base=str(tiny_assets["mdm"]),
              evaluator=str(tiny_assets["evaluator"]), out=str(tmp_path / "oracle"), steps=2,
              batch_size=4, k=2, sampling_steps=2, warmup=1, lr=1e-3, progress=False, threads=1,
              animation=False, eval_steps=2, eval_samples=32,
              reward="oracle:" + str(tiny_assets["reward"]))  # the tiny data's own embeddings
    summary = SoPoTrainer(SoPoConfig(**kw)).train()
    assert "DIAGNOSTIC" in capsys.readouterr().out
    assert 0.0 <= summary["after"]["reward"] <= 1.0
    from sopo_ext.data.humanml3d import HumanML3D
    given = HumanML3D(tiny_assets["data"], "train")
    with pytest.raises(ConfigError, match="oracle"):
        SoPoTrainer(SoPoConfig(**dict(kw, out=str(tmp_path / "x"))), train_dataset=given,
                    test_dataset=HumanML3D(tiny_assets["data"], "test")).train()


# ---- the detail-aware reward's objective ---------------------------------------------------
def _tiny_tmr(weight=1.0):
    from sopo_ext.models.tmr import TMR, TMRConfig
    torch.manual_seed(0)
    return TMR(TMRConfig(text_dim=8, latent_dim=8, d_model=16, num_layers=1, num_heads=2,
                         ff_size=32, text_hidden=16, near_miss_weight=weight)).eval()


def test_near_miss_loss_is_log2_when_the_negative_ties_and_falls_as_the_margin_grows():
    m = _tiny_tmr()
    motion, mask = torch.randn(3, 12, 263), torch.ones(3, 12, dtype=torch.bool)
    text = torch.randn(3, 8)
    tmu, mmu = m.encode_text(text), m.encode_motion(motion, mask)
    owner = torch.tensor([0, 2])
    tie = m.near_miss_loss(tmu, mmu, text_emb=text[owner], text_owner=owner,
                           mirror_motion=motion[owner], mirror_mask=mask[owner], mirror_owner=owner)
    assert tie.item() == pytest.approx(np.log(2.0), abs=1e-6)  # negatives identical to positives
    assert m.near_miss_loss(tmu, mmu).item() == 0.0  # no negatives, no term
    # minimizing it ranks the true caption above its near miss: the margin grows
    near = text[owner] + 0.3 * torch.randn(2, 8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def margin_and_loss():
        tmu, mmu = m.encode_text(text), m.encode_motion(motion, mask)
        pos = torch.cosine_similarity(tmu[owner], mmu[owner], dim=-1)
        neg = torch.cosine_similarity(m.encode_text(near), mmu[owner], dim=-1)
        return (pos - neg).mean().item(), m.near_miss_loss(tmu, mmu, text_emb=near, text_owner=owner)
    m0, l0 = margin_and_loss()
    for _ in range(30):
        opt.zero_grad()
        margin_and_loss()[1].backward()
        opt.step()
    m1, l1 = margin_and_loss()
    assert m1 > m0 + 0.1 and l1.item() < l0.item()
    m.train()
    out = m.training_loss(motion, mask, text, near_miss={"text_emb": near, "text_owner": owner})
    assert "near_miss" in out and out["near_miss"].item() > 0
    assert "near_miss" not in _tiny_tmr(0.0).train().training_loss(
        motion, mask, text, near_miss={"text_emb": near, "text_owner": owner})


def test_pretrain_reward_with_near_misses(tiny_assets, tmp_path):
    from sopo_ext import pretrain
    from tiny_configs import TINY
    out = tmp_path / "detail"
    assert pretrain.main(["reward", "--data", str(tiny_assets["data"]), "--out", str(out), "--steps", "2",
                          "--batch-size", "8", "--text-encoder", "hash", "--no-progress", "--threads", "1",
                          "--warmup", "1", "--set", *TINY["reward"], "near_miss_weight=1.0"]) == 0
    log = (out / "log.csv").read_text().splitlines()
    assert "near_miss" in log[0]
    c = C.load_checkpoint(out / "model", "tmr")
    assert c.model.config.near_miss_weight == 1.0 and "near_miss_weight=1.0" in c.meta["made_by"]


def test_near_misses_of_a_batch_swap_one_word_and_mirror_sided_motions(tiny_assets):
    from types import SimpleNamespace
    from sopo_ext.pretrain import Data, RewardTask
    args = SimpleNamespace(data=str(tiny_assets["data"]), max_len=196, seed=0, text_encoder="hash",
                           batch_size=8)
    data = Data(args, need_text=True)
    task = RewardTask(args, data)
    b = data.train_batches.batch(0)
    b["captions"][0] = "a person waves the left hand twice"
    nm = task.near_misses(b)
    own0 = (nm["text_owner"] == 0).nonzero().flatten().tolist()
    swapped = data.text_encoder.encode(["a person waves the right hand twice",
                                        "a person waves the left hand once"])
    assert torch.allclose(nm["text_emb"][own0], swapped)
    assert 0 in nm["mirror_owner"].tolist()
    j = nm["mirror_owner"].tolist().index(0)
    L = int(b["mask"][0].sum())
    mean, std = torch.as_tensor(data.mean).double(), torch.as_tensor(data.std).double()
    want = (sk.mirror_features(b["motion"][0, :L].double() * std + mean) - mean) / std
    torch.testing.assert_close(nm["mirror_motion"][j, :L], want.float())
    assert (nm["mirror_motion"][j, L:] == 0).all()
