"""python -m sopo_ext.train on a tiny generated dataset with tiny pretrained checkpoints: every
method x backbone trains one step, the step's loss is the reference math, runs resume bit-exactly
(after --stop-after and after a real SIGKILL), torchrun works, and failures are clear."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sopo_ext import checkpoint as C
from sopo_ext import functional as SF
from sopo_ext import profiling, train
from sopo_ext import reference as R
from sopo_ext.data.batches import MotionTextBatches
from sopo_ext.data.humanml3d import HumanML3D
from sopo_ext.methods import METHODS, PreferenceStep, StepConfig, _no_transformer_fastpath
from sopo_ext.models.text import get_text_encoder
from sopo_ext.sampling import diffusion_from_meta

REPO = Path(__file__).resolve().parents[1]
PREFERENCE = [m for m in sorted(METHODS) if m != "sft"]

KIND = {"reward": "tmr", "evaluator": "evaluator", "mdm": "mdm", "mld": "mld"}


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def targv(assets, out, method="sopo", backbone="mdm", *extra, steps=1, evaluate=False):
    a = ["--method", method, "--backbone", backbone, "--data", str(assets["data"]),
         "--base", str(assets[backbone]), "--reward", str(assets["reward"]),
         "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--k", "2",
         "--sampling-steps", "2", "--warmup", "1", "--lr", "1e-3", "--no-progress",
         "--threads", "1", "--no-animation", "--eval-steps", "2"]
    if evaluate:
        a += ["--evaluator", str(assets["evaluator"]), "--eval-samples", "32"]
    else:
        a += ["--evaluator", "none"]
    return a + list(extra)


def rows(out: Path):
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def train_rows(out: Path):
    return [r for r in rows(out) if r.get("loss")]


def weights(path) -> dict:
    return C.load_checkpoint(path).model.state_dict()


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


# ------------------------------------------------------------------------------ 1. every method
@pytest.mark.parametrize("backbone", ["mdm", "mld"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_step_of_each_method_and_backbone(method, backbone, assets, tmp_path):
    out = tmp_path / "run"
    assert train.main(targv(assets, out, method, backbone)) == 0
    c = C.load_checkpoint(out / "model", backbone)
    assert c.kind == backbone and c.meta["steps"] == 1
    assert c.meta["train"]["method"] == method
    r = train_rows(out)
    assert [int(x["step"]) for x in r] == [1]
    loss = float(r[0]["loss"])
    assert math.isfinite(loss) and math.isfinite(float(r[0]["grad_norm"]))
    base, new = weights(assets[backbone]), c.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    if backbone == "mld":  # only the latent denoiser is tuned; the VAE stays as pretrained
        assert changed and all(k.startswith("denoiser.") for k in changed), sorted(changed)
    else:
        assert changed
    if method != "sft":
        # policy == reference at step 0: z = 0 and the loss is softplus(0) = log 2
        assert loss == pytest.approx(math.log(2), abs=2e-6)
        assert 0.0 <= float(r[0]["valuable"]) <= 1.0
        if backbone == "mdm":  # the MDM forward is bit-identical for policy and reference
            assert float(r[0]["accuracy"]) == 0.0
    else:
        assert loss > 0 and "valuable" not in r[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1
    assert summary["train cpu seconds"] >= 0 and summary["train seconds"] >= 0


def test_evaluation_rows_and_phase_times(assets, tmp_path):
    out = tmp_path / "run"
    assert train.main(targv(assets, out, "sopo", "mdm", steps=2, evaluate=True)) == 0
    times = profiling.phase_times()
    for key in ("encode", "sampling", "reward", "selection", "loss", "backward", "optimizer",
                "checkpoint", "evaluation"):
        assert key in times and times[key] >= 0.0, (key, times)
    all_rows = rows(out)
    evals = [r for r in all_rows if r.get("eval FID")]
    assert [int(r["step"]) for r in evals] == [0, 2]
    for r in evals:
        assert 0.0 <= float(r["eval R-precision top1"]) <= 1.0
        assert math.isfinite(float(r["eval FID"]))
        assert 0.0 <= float(r["eval judged details"]) <= 1.0  # the tiny data is built-in
    meta = C.load_checkpoint(out / "model", "mdm").meta
    assert meta["metrics"]["before"]["FID"] == pytest.approx(float(evals[0]["eval FID"]), rel=1e-5)
    assert set(json.loads((out / "summary.json").read_text())["phase seconds"]) >= {"sampling", "loss"}


# ------------------------------------------------------------------------------ 2. the math
def _tiny_step(assets, method, perturb=True, backbone="mdm", **cfg):
    torch.manual_seed(0)
    base = C.load_checkpoint(assets[backbone], backbone)
    reward = C.load_checkpoint(assets["reward"], "tmr").model.eval().requires_grad_(False)
    ds = HumanML3D(assets["data"], "train", seed=0)
    batch = MotionTextBatches(ds, get_text_encoder("hash"), batch_size=4, seed=0).batch(0)
    policy = base.model
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if perturb:  # policy != reference so the loss is not trivially log 2
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
    settings = dict(k=3, sampling_steps=2, tau=0.6, c=2.0, beta=1.5, scale=2.0)
    settings.update(cfg)
    step = PreferenceStep(policy, reference, diffusion_from_meta(base.meta), reward,
                          StepConfig(method=method, **settings))
    return step, batch


def _offline_pairs_by_hand(step, batch, gen_for_index):
    """Best and worst (by reward) of K reference samples per dataset index, at its own length."""
    k, text, mask = step.cfg.k, batch["text_emb"], batch["mask"]
    x_w, x_l = torch.zeros_like(batch["motion"]), torch.zeros_like(batch["motion"])
    for i, idx in enumerate(batch["indices"]):
        n = int(mask[i].sum())
        x, motions, mk = step.sample(step.reference, text[i:i + 1], mask[i:i + 1, :n], k,
                                     gen_for_index(int(idx)))
        with torch.no_grad():
            g_lat = step.reward.encode_motion(motions, mk).view(1, k, -1)
            scores = R.reward_scores(step.reward.encode_text(text[i:i + 1]), g_lat, tau=step.cfg.tau).scores
        x_w[i, :n], x_l[i, :n] = x[int(scores.argmax(1))], x[int(scores.argmin(1))]
    return x_w, x_l


def _online_samples_by_hand(step, text, mask, g):
    """K samples per caption of the policy, one plain sampling loop (B*K = 12 rows is below
    min_bucket_rows, so the step runs one loop too), decoded for MLD; with the step's guidance."""
    cfg, model, k = step.cfg, step.policy, step.cfg.k
    n = text.shape[0] * k
    text_k, mask_k = text.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    model.eval()
    # as the step samples on the CPU: without nn.TransformerEncoder's inference fast path
    with torch.no_grad(), _no_transformer_fastpath():
        if step.kind == "mdm":
            x = step.diffusion.sample(model, (n, mask.shape[1], model.config.nfeats), text_k, mask_k,
                                      steps=cfg.sampling_steps, sampler=cfg.sampler,
                                      guidance_scale=cfg.guidance_scale, generator=g)
            return x.float(), x.float(), mask_k
        x = step.diffusion.sample(model, (n,) + tuple(model.latent_shape), text_k, None,
                                  steps=cfg.sampling_steps, sampler=cfg.sampler,
                                  guidance_scale=cfg.guidance_scale, generator=g).float()
        return x, step.reference.decode(x, mask_k).float(), mask_k


def _worst_rewards_by_hand(step, batch):
    text, mask = batch["text_emb"], batch["mask"]
    _, motions, mask_k = _online_samples_by_hand(step, text, mask, torch.Generator().manual_seed(123))
    with torch.no_grad():
        g_lat = step.reward.encode_motion(motions, mask_k).view(text.shape[0], step.cfg.k, -1)
        return R.reward_scores(step.reward.encode_text(text), g_lat).worst_score


HAND_CASES = [  # (method, backbone, StepConfig overrides)
    ("sopo", "mdm", {}), ("usopo", "mdm", {}), ("dsopo", "mdm", {}), ("sopo-no-vu", "mdm", {}),
    ("online-dpo", "mdm", {}), ("modipo", "mdm", {}),
    ("sopo", "mdm", {"noise": "fresh"}),  # four noise draws, one per term (the official code)
    ("sopo", "mdm", {"cond_drop": 0.5}),  # the same captions dropped for policy and reference
    ("sopo", "mdm", {"guidance_scale": 2.5}),  # CFG in the online samples
    ("sopo", "mdm", {"scale_regime": "diffusion-dpo", "scale": 1.0}),
    ("sopo", "mdm", {"scale_regime": "paper", "scale": 1.0}),  # T * SNR(t) on the x0 loss
    ("sopo", "mld", {}), ("online-dpo", "mld", {}),  # the latent path: VAE encode, eps targets
    ("sopo", "mld", {"scale_regime": "paper", "scale": 1.0}),  # T on the eps loss
]


@pytest.mark.parametrize("method, backbone, overrides", HAND_CASES,
                         ids=[f"{m}-{b}-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "default")
                              for m, b, o in HAND_CASES])
def test_step_loss_equals_the_reference_recomputed_by_hand(method, backbone, overrides, assets, monkeypatch):
    """The pairs, threshold, reweighting, noising, text drop, scale and loss of each method and
    branch, redone by hand from the same random draws and compared with the reference loss."""
    step, batch = _tiny_step(assets, method, backbone=backbone, **overrides)
    cfg, spec = step.cfg, METHODS[method]
    if spec.threshold:  # a tau between the captions' worst rewards: valuable has both values
        worst = _worst_rewards_by_hand(step, batch).sort().values
        cfg.tau = float((worst[1] + worst[2]) / 2)
    captured = {}
    real = SF.sopo_loss_and_stats

    def spy(*args, **kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        return real(*args, **kwargs)

    def gen_for_index(i):
        return torch.Generator().manual_seed(1000 + i)

    monkeypatch.setattr(SF, "sopo_loss_and_stats", spy)
    loss, stats = step(batch, torch.Generator().manual_seed(123), gen_for_index)
    assert loss.requires_grad and loss.dim() == 0

    # the same draws by hand, in the order the step makes them
    text, mask, B = batch["text_emb"], batch["mask"], batch["text_emb"].shape[0]
    g = torch.Generator().manual_seed(123)
    beta_w = torch.full((B,), cfg.beta)
    valuable = torch.ones(B, dtype=torch.bool)
    mdm = backbone == "mdm"
    with torch.no_grad():
        x_data = batch["motion"] if mdm else step.reference.encode(batch["motion"], mask).float()
    if spec.pairs == "offline":  # MoDiPO-style: both motions are samples of the frozen reference
        x_w, x_l = _offline_pairs_by_hand(step, batch, gen_for_index)
    else:
        x_gen, motions, mask_k = _online_samples_by_hand(step, text, mask, g)
        with torch.no_grad():
            t_lat = step.reward.encode_text(text)
            g_lat = step.reward.encode_motion(motions, mask_k).view(B, cfg.k, -1)
            w_lat = step.reward.encode_motion(batch["motion"], mask)
        r = R.reward_scores(t_lat, g_lat, tau=cfg.tau)
        x_gen = x_gen.view(B, cfg.k, *x_gen.shape[1:])
        x_l = x_gen[torch.arange(B), r.scores.argmin(1)]
        # online DPO: the best of the policy's own K samples is the preferred motion
        x_w = x_gen[torch.arange(B), r.scores.argmax(1)] if spec.pairs == "online" else x_data
        if spec.threshold:
            valuable = r.valuable
            assert valuable.any() and not valuable.all(), r.worst_score  # both branches taken
        S = R.min_cosine_similarity(w_lat, g_lat)
        if spec.reweight:
            beta_w = cfg.beta * (cfg.c - S)
    t = torch.randint(0, step.diffusion.num_steps, (B,), generator=g)
    noises = [torch.randn(x_w.shape, generator=g) for _ in range(4 if cfg.noise == "fresh" else 1)]
    n_pw, n_rw, n_pl, n_rl = noises if cfg.noise == "fresh" else noises * 4
    drop = (torch.rand(B, generator=g) < cfg.cond_drop) if cfg.cond_drop > 0 else torch.zeros(B, dtype=torch.bool)
    if cfg.cond_drop > 0:  # both dropped and kept captions in this batch
        assert drop.any() and not drop.all(), drop
    uncond = torch.cat([drop, drop])
    pad = (lambda x: x * mask[..., None]) if mdm else (lambda x: x)  # noqa: E731
    q = step.diffusion.q_sample
    x_pol = torch.cat([pad(q(x_w, t, n_pw)), pad(q(x_l, t, n_pl))])
    x_ref = torch.cat([pad(q(x_w, t, n_rw)), pad(q(x_l, t, n_rl))])
    tt, text2 = torch.cat([t, t]), torch.cat([text, text])
    mask2 = torch.cat([mask, mask]) if mdm else None
    step.policy.eval()
    with torch.no_grad():
        out = step.policy(x_pol, tt, text2, mask2, uncond)
        ref = step.reference(x_ref, tt, text2, mask2, uncond)
    targets = (x_w, x_l) if step.prediction == "x0" else (n_pw, n_pl)
    if cfg.scale_regime == "constant":
        scale = torch.full((B,), cfg.scale)
    elif cfg.scale_regime == "diffusion-dpo":
        scale = torch.full((B,), cfg.beta_dpo / 2)
    else:  # paper: T omega_t, omega_t = 1 on the eps loss -> T * SNR(t) on an x0 loss
        T = step.diffusion.num_steps
        scale = T * step.diffusion.snr(t).float() if step.prediction == "x0" else torch.full((B,), float(T))
    m = mask[..., None].expand_as(x_w) if mdm else None
    d64 = lambda x: x.double()  # noqa: E731
    expected = R.sopo_loss(d64(out[:B]), d64(ref[:B]), d64(targets[0]), d64(out[B:]), d64(ref[B:]),
                           d64(targets[1]), beta_w=d64(beta_w), valuable=valuable, beta=cfg.beta,
                           scale=d64(scale), mask_w=m, mask_l=m)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - math.log(2)) > 1e-4  # a non-trivial value was compared

    # what the trainer handed to the loss: the worst sample, the threshold and the reweighting
    args, kw = captured["args"], captured["kwargs"]
    if step.prediction == "x0":
        assert torch.equal(args[2], x_w) and torch.equal(args[5], x_l)
    else:
        assert torch.equal(args[2], n_pw) and torch.equal(args[5], n_pl)
    assert torch.equal(kw["valuable"].cpu(), valuable)
    torch.testing.assert_close(torch.as_tensor(kw["beta_w"]).float().expand(B), beta_w.float(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(kw["scale"]).float().expand(B), scale.float(), rtol=1e-6, atol=0)
    assert kw["beta"] == cfg.beta
    # the loss of the captured tensors == the reference on the same tensors
    cap = [a.detach().double() for a in args]
    again = R.sopo_loss(*cap, beta_w=torch.as_tensor(kw["beta_w"]).double(), valuable=kw["valuable"],
                        beta=kw["beta"], scale=torch.as_tensor(kw["scale"]).double(),
                        mask_w=kw["mask_w"], mask_l=kw["mask_l"])
    torch.testing.assert_close(loss.detach().double(), again, rtol=1e-5, atol=1e-6)
    if spec.pairs != "offline":
        torch.testing.assert_close(stats["worst reward"], r.worst_score.mean(), rtol=1e-5, atol=1e-6)
        assert float(stats["nan rewards"]) == 0.0
    torch.testing.assert_close(stats["valuable"], valuable.float().mean())
    if spec.reweight:
        torch.testing.assert_close(stats["S"], S.mean(), rtol=1e-5, atol=1e-6)
    z = SF.sopo_loss_and_stats(*args, **kw)[1].z  # the regime statistics of the step's own z
    assert float(stats["accuracy"]) == float((z > 0).float().mean())
    assert float(stats["z mean"]) == pytest.approx(float(z.mean()), rel=1e-5, abs=1e-9)
    for name, qq in (("|z| p10", 0.1), ("|z| p50", 0.5), ("|z| p90", 0.9)):
        assert float(stats[name]) == pytest.approx(float(torch.quantile(z.abs(), qq)), rel=1e-5, abs=1e-9)
    assert float(stats["sigmoid(-z)"]) == pytest.approx(float(torch.sigmoid(-z).mean()), rel=1e-5)

    # the gradient flows into the policy only
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in step.policy.parameters())
    assert all(p.grad is None for p in step.reference.parameters())


def test_unperturbed_policy_gives_exactly_log2(assets):
    step, batch = _tiny_step(assets, "sopo", perturb=False)
    loss, stats = step(batch, torch.Generator().manual_seed(5))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert float(stats["accuracy"]) == 0.0  # z == 0 exactly: the reference matches the policy


# ------------------------------------------------------------------------------ 3. resume
@pytest.mark.parametrize("method, backbone", [("sopo", "mdm"), ("modipo", "mdm"),
                                              ("sft", "mdm"), ("usopo", "mld")])
def test_stop_after_and_resume_equal_an_uninterrupted_run(method, backbone, assets, tmp_path, capsys):
    """The offline pairs of modipo are regenerated identically after the restart."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(targv(assets, full, method, backbone, steps=4)) == 0
    assert train.main(targv(assets, part, method, backbone, "--stop-after", "2", steps=4)) == 0
    assert not (part / "model").exists()
    assert C.load_checkpoint(part / "last", backbone).meta["steps"] == 2
    state_file = part / "last" / C.TRAIN_STATE
    state = torch.load(state_file, weights_only=True)
    assert state["clock"]["train cpu seconds"] > 0 and state["clock"]["phase seconds"]["loss"] > 0
    # pretend the first part took 1000 s (500 s of loss), so the sum is unmistakable
    state["clock"].update({"train seconds": 1000.0, "train cpu seconds": 1000.0})
    state["clock"]["phase seconds"]["loss"] = 500.0
    torch.save(state, state_file)
    assert train.main(targv(assets, part, method, backbone, "--resume", steps=4)) == 0
    assert "resumed from" in capsys.readouterr().out
    # the summary's times cover the whole run, not just the part after the resume
    summary = json.loads((part / "summary.json").read_text())
    assert summary["resumed at steps"] == [2] and "resumed at steps" not in json.loads(
        (full / "summary.json").read_text())
    assert 1000 <= summary["train seconds"] < 1100 and 1000 <= summary["train cpu seconds"] < 1100
    assert 500 <= summary["phase seconds"]["loss"] < 600
    assert_same_weights(weights(full / "model"), weights(part / "model"))
    drop = lambda rs: [{k: v for k, v in r.items() if k != "lr"} for r in rs]  # noqa: E731
    assert drop(train_rows(full)) == drop(train_rows(part))
    assert [int(r["step"]) for r in train_rows(part)] == [1, 2, 3, 4]


def test_a_run_is_a_function_of_its_seed(assets, tmp_path):
    """The run seeds the global RNG (which a backbone's own code may draw from), whatever state
    the process had."""
    a, b = tmp_path / "a", tmp_path / "b"
    torch.manual_seed(1)
    assert train.main(targv(assets, a, "sft", "mdm", steps=2)) == 0
    torch.manual_seed(2)
    torch.rand(10)
    assert train.main(targv(assets, b, "sft", "mdm", steps=2)) == 0
    assert_same_weights(weights(a / "model"), weights(b / "model"))
    assert train_rows(a) == train_rows(b)


def test_resume_after_sigkill_equals_an_uninterrupted_run(assets, tmp_path, capsys):
    steps = 8
    extra = ["--sampling-steps", "12", "--ckpt-every", "2"]
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-m", "sopo_ext.train",
                             *targv(assets, part, "sopo", "mdm", *extra, steps=steps)],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cfg = part / "last" / "config.json"
    killed_at = None
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                at = json.loads(cfg.read_text())["meta"]["steps"] if cfg.is_file() else 0
            except (json.JSONDecodeError, KeyError, OSError):
                at = 0
            if at >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = at
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        log = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert killed_at is not None, f"the run ended or stalled before a checkpoint:\n{log}"
    assert proc.returncode == -signal.SIGKILL
    assert not (part / "model").exists(), "the run finished before the kill"
    assert 2 <= C.load_checkpoint(part / "last", "mdm").meta["steps"] < steps
    assert train.main(targv(assets, part, "sopo", "mdm", *extra, "--resume", steps=steps)) == 0
    assert "resumed from" in capsys.readouterr().out
    full = tmp_path / "full"
    assert train.main(targv(assets, full, "sopo", "mdm", *extra, steps=steps)) == 0
    assert_same_weights(weights(full / "model"), weights(part / "model"))
    assert [int(r["step"]) for r in train_rows(part)] == list(range(1, steps + 1))


def test_resume_with_other_settings_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(targv(assets, out, "sopo", "mdm", "--stop-after", "1", steps=3)) == 0
    assert train.main(targv(assets, out, "sopo", "mdm", "--resume", "--tau", "0.3", steps=3)) == 2
    err = capsys.readouterr().err
    assert "--resume with different settings" in err and "--tau was 0.45, now 0.3" in err
    assert train.main(targv(assets, out, "usopo", "mdm", "--resume", steps=3)) == 2
    assert "--method was 'sopo', now 'usopo'" in capsys.readouterr().err
    # flags that do not change the run may differ
    assert train.main(targv(assets, out, "sopo", "mdm", "--resume", "--ckpt-every", "7", steps=3)) == 0


def test_resume_without_a_checkpoint_starts_fresh(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(targv(assets, out, "sopo", "mdm", "--resume")) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert C.load_checkpoint(out / "model", "mdm").meta["steps"] == 1


# ------------------------------------------------------------------------------ 5. torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(assets, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "sopo_ext.train",
           *targv(assets, out, "sopo", "mdm", steps=2, evaluate=True)]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    c = C.load_checkpoint(out / "model", "mdm")
    assert c.meta["steps"] == 2
    base, new = weights(assets["mdm"]), c.model.state_dict()
    assert any(not torch.equal(base[k], new[k]) for k in base)
    # rank 0 alone writes: one row per step and one evaluation row before and after
    assert [int(r["step"]) for r in train_rows(out)] == [1, 2]
    assert [int(r["step"]) for r in rows(out) if r.get("eval FID")] == [0, 2]
    assert sorted(os.listdir(out)) == sorted(x for x in ["last", "metrics.csv", "model", "summary.json", "tb"]
                                             if (out / x).exists())
    assert p.stdout.count("fine-tuned checkpoint") == 1


# ------------------------------------------------------------------------------ 6. the CLI
def test_default_command_and_official_preset():
    a = train.parse_args([])
    assert (a.method, a.backbone, a.k, a.tau, a.c, a.beta, a.data) == ("sopo", "mdm", 4, 0.45, 2.0, 1.0, "builtin")
    assert (a.noise, a.guidance_scale, a.sampler, a.sampling_steps) == ("shared", 1.0, "ddim", 8)
    assert (a.steps, a.batch_size, a.lr) == (200, 16, 1e-4)
    assert a.out == "runs/train-sopo-mdm" and a.eval_before and a.eval_after and not a.resume
    o = train.parse_args(["--preset", "official-loss"])
    assert (o.k, o.noise, o.guidance_scale, o.sampler, o.sampling_steps) == (2, "fresh", 1.0, "ddpm", 50)
    x = train.parse_args(["--preset", "official-loss", "--k", "3", "--sampler", "ddim", "--noise", "shared"])
    assert (x.k, x.sampler, x.noise, x.sampling_steps) == (3, "ddim", "shared", 50)
    assert train.parse_args(["--method", "usopo", "--backbone", "mld"]).out == "runs/train-usopo-mld"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--k", "0"], "--k must be >= 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--eval-samples", "8"], "--eval-samples must be >= 32"),
])
def test_bad_flag_values(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.parse_args(argv)


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--method", "ppo"])
    assert e.value.code == 2 and "invalid choice: 'ppo'" in capsys.readouterr().err


def test_official_preset_runs(assets, tmp_path):
    out = tmp_path / "run"
    assert train.main(targv(assets, out, "sopo", "mdm", "--preset", "official-loss", "--sampling-steps", "2",
                            "--k", "2")) == 0
    meta = C.load_checkpoint(out / "model", "mdm").meta
    assert meta["train"]["noise"] == "fresh" and meta["train"]["sampler"] == "ddpm"
    # fresh noise: policy and reference terms see different draws, so z != 0 even at step 0
    loss = float(train_rows(out)[0]["loss"])
    assert math.isfinite(loss) and loss != pytest.approx(math.log(2), abs=1e-6)


# ------------------------------------------------------------------------------ 7. failures
def test_missing_data_directory(assets, tmp_path, capsys):
    a = targv(assets, tmp_path / "run")
    a[a.index("--data") + 1] = str(tmp_path / "nowhere")
    assert train.main(a) == 2
    assert "nowhere" in capsys.readouterr().err


def test_base_checkpoint_of_the_wrong_kind(assets, tmp_path, capsys):
    a = targv(assets, tmp_path / "run")
    a[a.index("--base") + 1] = str(assets["reward"])
    assert train.main(a) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "tmr" in err and "mdm" in err
    # an mld checkpoint with --backbone mdm
    a[a.index("--base") + 1] = str(assets["mld"])
    assert train.main(a) == 2
    assert "mld" in capsys.readouterr().err


def test_reward_checkpoint_of_the_wrong_kind(assets, tmp_path, capsys):
    a = targv(assets, tmp_path / "run")
    a[a.index("--reward") + 1] = str(assets["evaluator"])
    assert train.main(a) == 2
    assert "tmr" in capsys.readouterr().err


def nan_loss_at_step(monkeypatch, step: int) -> None:
    """Make the training step that starts at ``step`` (0-based) return a NaN loss."""
    real = PreferenceStep.__call__
    calls = []

    def patched(self, batch, generator, generator_for_index=None):
        loss, stats = real(self, batch, generator, generator_for_index)
        calls.append(1)
        if len(calls) == step + 1:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(PreferenceStep, "__call__", patched)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch, capsys):
    nan_loss_at_step(monkeypatch, 2)
    out = tmp_path / "run"
    assert train.main(targv(assets, out, "sopo", "mdm", "--ckpt-every", "1", steps=5)) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 2" in err and str(out / "last") in err
    assert not (out / "model").exists()
    last = C.load_checkpoint(out / "last", "mdm")
    assert last.meta["steps"] == 2 and last.train_state()["step"] == 2
    assert [int(r["step"]) for r in train_rows(out)] == [1, 2]


# ------------------------------------------------------------------------------ bf16, eval-every
@pytest.mark.parametrize("backbone", ["mdm", "mld"])
def test_bf16_autocast_step_is_close_to_fp32(assets, tmp_path, backbone):
    a, b = tmp_path / "fp32", tmp_path / "bf16"
    assert train.main(targv(assets, a, "dsopo", backbone, steps=2)) == 0
    assert train.main(targv(assets, b, "dsopo", backbone, "--bf16", steps=2)) == 0
    la = [float(r["loss"]) for r in train_rows(a)]
    lb = [float(r["loss"]) for r in train_rows(b)]
    assert all(math.isfinite(x) for x in lb)
    assert la[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert lb[0] == pytest.approx(math.log(2), abs=1e-2)
    wa, wb = weights(a / "model"), weights(b / "model")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # bf16 really ran


def test_eval_every_adds_evaluation_rows(assets, tmp_path):
    out = tmp_path / "run"
    assert train.main(targv(assets, out, "sopo", "mdm", "--eval-every", "2", steps=4, evaluate=True)) == 0
    assert [int(r["step"]) for r in rows(out) if r.get("eval FID")] == [0, 2, 4]


def test_deferred_logging_logs_every_step_identically(assets, tmp_path):
    """--log-every N reads the statistics back once per N steps, but every step's row is the
    same as with a read-back per step (and the weights are untouched by it)."""
    outs = {}
    for n in (1, 3):
        outs[n] = tmp_path / f"log{n}"
        assert train.main(targv(assets, outs[n], "sopo", "mdm", "--log-every", str(n),
                                "--ckpt-every", "100", steps=5)) == 0
    a, b = train_rows(outs[1]), train_rows(outs[3])
    assert [int(r["step"]) for r in b] == [1, 2, 3, 4, 5]
    assert a == b
    assert_same_weights(weights(outs[1] / "model"), weights(outs[3] / "model"))


def test_non_finite_loss_between_log_points_names_its_step(assets, tmp_path, monkeypatch, capsys):
    nan_loss_at_step(monkeypatch, 1)
    out = tmp_path / "run"
    a = targv(assets, out, "sopo", "mdm", "--log-every", "4", "--ckpt-every", "4", steps=8)
    assert train.main(a) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 1" in err and "none (nothing saved yet)" in err
    assert not (out / "last" / C.CONFIG).exists()  # the diverged weights were never saved
    assert [int(r["step"]) for r in train_rows(out)] == [1]
