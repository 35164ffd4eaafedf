"""``SoPoTrainer``: the fine-tuning run of ``python -m sopo_ext.train``, as a Python object.

    from sopo_ext import SoPoConfig, SoPoTrainer
    summary = SoPoTrainer(SoPoConfig(steps=50, out="runs/demo")).train()
    print(summary["after"]["R-precision top1"])

``train()`` is a sequence of methods a subclass may override, each one concept (the same split as
TRL's trainers): ``load_data`` (datasets and normalization), ``load_models`` (base, reference copy,
reward, evaluator, text encoder, diffusion), ``make_batches``, ``make_optimizer``, ``resume``,
``make_step`` (the preference step), ``open_logs``, then per step ``training_step`` (one batch's
loss and statistics) and ``optimizer_step``, and around them ``log_steps``, ``evaluate``,
``save_checkpoint`` and ``finish`` (final evaluation, model, GIFs, summary). Models, data and the
reward may be given as objects instead of names.

Output in ``config.out``: ``metrics.csv`` (one row per step, evaluation rows added), TensorBoard
events in ``tb/``, ``last/`` (checkpoint + training state for ``resume``), ``model/`` (the
fine-tuned checkpoint, safetensors + config), ``summary.json`` and ``compare_*.gif``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from ._cli import resolve_device
from .config import STEP_VERSION, ConfigError, SoPoConfig
from .data import judge
from .data.batches import MotionTextBatches
from .data.builtin import resolve_data_root
from .data.humanml3d import HumanML3D
from .methods import PreferenceStep, StepConfig
from .models import family
from .official.text_side import prepare_backbone_text, text_encoders
from .optim import make_adamw, rng_state, set_rng_state, warmup_cosine
from .profiling import phase, phase_times, reset_phase_times
from .rewards import OracleReward, is_oracle, oracle_embeddings
from .runs import CsvLog, resume_state
from .sampling import diffusion_from_meta

__all__ = ["SoPoTrainer", "Dist", "evaluate", "summary_table", "SUMMARY_KEYS"]

HOST_KEYS = ("indices", "lengths")  # batch entries the step reads on the host
ModelSpec = Union[str, os.PathLike, ckpt_io.Checkpoint, None]


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device_arg, int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean_rows(self, rows: torch.Tensor) -> List[List[float]]:
        """Means over ranks of a [steps, values] tensor, read back to the host in one go (one
        all_reduce and one sync for a whole logging interval). A non-finite value on any rank
        makes the mean non-finite, so every rank sees a diverged step at the same row."""
        v = rows.detach().float().to(self.device)
        if self.world > 1:
            dist.all_reduce(v)
            v /= self.world
        return v.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


# ------------------------------------------------------------------------------------ eval
def evaluate(policy, diffusion, batches, evaluator, reward, config, device, judged=None) -> Dict[str, float]:
    """The evaluator's metrics of one generated motion per test caption; ``judged`` =
    (specs, mean, std) adds the geometric detail checks (built-in data only)."""
    from .evaluation import generate_split, generation_metrics, judged_accuracy
    moved = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    gen = generate_split(policy, diffusion, moved, steps=config.eval_steps,
                         guidance_scale=config.eval_guidance, seed=config.seed + 1)
    out = generation_metrics(gen, batches, evaluator, reward, tau=config.tau, seed=config.seed)
    if judged is not None:
        out.update(judged_accuracy(gen, batches, *judged))
    return out


SUMMARY_KEYS = ["R-precision top1", "R-precision top2", "R-precision top3", "MM-Dist", "FID",
                "Diversity", "detail accuracy", "judged details", "reward", "frac reward >= {tau}"]


def summary_table(before: Dict[str, float], after: Dict[str, float], tau: float) -> str:
    lines = [f"{'metric':24s} {'base':>9s} {'fine-tuned':>11s} {'change':>9s}"]
    for key in SUMMARY_KEYS:
        key = key.format(tau=tau)
        if key in before and key in after:
            a, b = before[key], after[key]
            lines.append(f"{key:24s} {a:9.4f} {b:11.4f} {b - a:+9.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ trainer
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's own check: AVX512-BF16 or
    AMX). Without it bf16 autocast emulates the products: 1.3 against 98 GFLOP/s for fp32 on
    an AVX2 machine of this project (docs/performance.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: assume it can
        return True


class SoPoTrainer:
    """Runs SoPo (or another preference method of ``sopo_ext.methods``) as ``config`` says.

    Args:
        config: the run's settings (default ``SoPoConfig()``: SoPo on the bundled MDM-style model
            and the built-in data, like ``python -m sopo_ext.train`` with no flags).
        base, reward, evaluator: a loaded ``sopo_ext.checkpoint.Checkpoint`` or a checkpoint name
            / path; they replace ``config.base`` / ``config.reward`` / ``config.evaluator``
            (``evaluator="none"`` skips evaluation).
        train_dataset, test_dataset: ``sopo_ext.data.HumanML3D`` splits (or objects with the same
            interface) instead of the ones ``config.data`` names.
        text_encoder: a frozen text encoder (``sopo_ext.models.text``) instead of the one the
            checkpoints name.
        command: what the run records as the command that made it (default ``config.command()``).
    """

    def __init__(self, config: Optional[SoPoConfig] = None, *, base: ModelSpec = None,
                 reward: ModelSpec = None, evaluator: ModelSpec = None, train_dataset=None,
                 test_dataset=None, text_encoder=None, command: Optional[str] = None):
        self.config = config if config is not None else SoPoConfig()
        if not isinstance(self.config, SoPoConfig):
            raise TypeError(f"config must be a SoPoConfig, got {type(self.config).__name__}")
        self._given = dict(base=base, reward=reward, evaluator=evaluator, train=train_dataset,
                           test=test_dataset, text_encoder=text_encoder)
        self.command = command or self.config.command()
        self.out = Path(self.config.out)
        self.step = 0
        self.history: Dict[str, object] = {}
        self.summary: Dict[str, object] = {}

    # ---- the run --------------------------------------------------------------------------------
    def train(self) -> Dict[str, object]:
        """Fine-tunes, evaluates and saves; returns the summary (also in ``out/summary.json``):
        ``before`` / ``after`` (evaluation metrics), ``steps``, times. A run stopped by
        ``stop_after`` returns ``{}``."""
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = Dist(cfg.device)
        try:
            self.setup()
            stopped = self.train_loop()
            return {} if stopped else self.finish()
        finally:
            self.dist.close()

    def setup(self) -> None:
        """Everything before the first step, in order."""
        D = self.dist
        self.device = D.device
        # The global RNG drives dropout and MDM's text dropout in training mode (sft): seed it so a
        # run is a function of seed (and a resume, which restores it, equals an uninterrupted run).
        torch.manual_seed(seed_for(self.config.seed, D.rank))
        if D.main:
            self.out.mkdir(parents=True, exist_ok=True)
        D.barrier()
        self.load_data()
        self.load_models()
        self.make_batches()
        self.make_optimizer()
        self.resume()
        self.stepper = self.make_step()
        self.open_logs()

    # ---- data and models ------------------------------------------------------------------------
    def load_data(self) -> None:
        """``self.train_set`` / ``self.test_set``, the normalization (``self.mean``, ``self.std``) and
        ``self.judged`` (the built-in data's detail specs, else None)."""
        cfg = self.config
        root = resolve_data_root(cfg.data) if (self._given["train"] is None or self._given["test"] is None) else None
        self.train_set = self._given["train"] or HumanML3D(root, "train", seed=cfg.seed, max_len=cfg.max_len)
        self.test_set = self._given["test"] or HumanML3D(root, "test", seed=cfg.seed, max_len=cfg.max_len)
        self.mean, self.std = self.train_set.mean, self.train_set.std_safe
        self.data_root = root
        # the built-in dataset knows what every motion does: evaluation also judges the details
        self.judged = None
        if root is not None and (root / "specs.json").is_file():
            self.judged = (judge.load_specs(root), self.test_set.mean, self.test_set.std_safe)

    def _checkpoint(self, given: ModelSpec, spec: Optional[str], bundled: str, kind: str) -> ckpt_io.Checkpoint:
        c = given if isinstance(given, ckpt_io.Checkpoint) else ckpt_io.load_checkpoint(given or spec or bundled, kind)
        if c.kind != kind:
            raise ckpt_io.CheckpointError(f"the {bundled} checkpoint {c.path} holds a {c.kind!r} model, not {kind!r}")
        what = f"the dataset at {self.data_root}" if self.data_root else "the given dataset"
        ckpt_io.check_normalization(c, self.mean, self.std, what=what)
        return c

    def load_models(self) -> None:
        """``self.base`` (checkpoint), ``self.policy`` (trained), ``self.reference`` (frozen copy),
        ``self.reward``, ``self.evaluator`` (None: no evaluation), ``self.text_encoder``,
        ``self.diffusion``."""
        cfg, device = self.config, self.device
        if cfg.backbone in ("mdm-official", "mld-official"):  # a release, or a fine-tune of one
            given, kind = self._given["base"], cfg.backbone.replace("-", "_")
            if isinstance(given, ckpt_io.Checkpoint):
                self.base = given
            elif cfg.backbone == "mdm-official":
                from .official.release import load_official_backbone
                self.base = load_official_backbone(given or cfg.base, mask_frames=cfg.mask_frames)
            else:
                from .official.mld_backbone import load_official_mld
                if not (given or cfg.base):
                    raise ConfigError("base", "--backbone mld-official needs --base: the released MLD's .ckpt "
                                      "(1222_mld_humanml3d_FID041.ckpt) or a fine-tune of it")
                self.base = load_official_mld(given or cfg.base)
            if self.base.kind != kind:
                raise ckpt_io.CheckpointError(f"--backbone {cfg.backbone}: {self.base.path} holds a "
                                              f"{self.base.kind!r} model")
            ckpt_io.check_normalization(self.base, self.mean, self.std, what=f"the dataset at {self.data_root}")
        else:
            self.base = self._checkpoint(self._given["base"], cfg.base, cfg.backbone, cfg.backbone)
        # "oracle" or "oracle:<reward checkpoint>": the judge scores, that reward embeds
        oracle = self._given["reward"] is None and is_oracle(cfg.reward)
        if oracle and self.judged is None:
            raise ConfigError("reward", "'oracle' is the built-in dataset's geometric judge (a "
                              "diagnostic upper bound); it needs the ground truth of the built-in "
                              "data (specs.json), which --data has not got")
        reward_spec = oracle_embeddings(cfg.reward) if oracle else cfg.reward
        from .official.tmr import is_official_tmr, official_reward_checkpoint
        if self._given["reward"] is None and is_official_tmr(reward_spec):  # the released TMR
            reward_c = official_reward_checkpoint(reward_spec, self.mean, self.std)
        else:
            reward_c = self._checkpoint(self._given["reward"], reward_spec, "reward", "tmr")
        skip = (self._given["evaluator"] or cfg.evaluator) == "none"
        evaluator_c = None if skip else self._checkpoint(self._given["evaluator"], cfg.evaluator,
                                                        "evaluator", "evaluator")
        self.reward_text_encoder = None  # None: the reward reads the backbone's caption embeddings
        if self._given["text_encoder"] is not None:
            self.text_encoder = self._given["text_encoder"]
        else:
            base_name, reward_name = self.base.meta.get("text_encoder"), reward_c.meta.get("text_encoder")
            self.text_encoder, self.reward_text_encoder = text_encoders(
                base_name or reward_name or cfg.text_encoder, base_name, [reward_name],
                clip_weights=cfg.clip_weights, clip_precision=cfg.clip_precision, distilbert=cfg.distilbert)
        prepare_backbone_text(self.base.model, self.text_encoder, cfg.distilbert, device)
        self.diffusion = diffusion_from_meta(self.base.meta)
        self.policy = self.base.model.to(device)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if family(self.base) == "mld":  # SoPo tunes the latent denoiser; the VAE stays as pretrained
            if hasattr(self.policy, "freeze_encoder"):  # the released MLD: its encoder, as the paper
                self.policy.freeze_encoder()
            else:
                self.policy.vae.requires_grad_(False)
        self.reward = reward_c.model.to(device).eval().requires_grad_(False)
        if oracle:  # embeddings (reweighting, evaluation) from the bundled reward, scores from the judge
            self.reward = OracleReward(self.judged[0], self.mean, self.std, self.reward).to(device)
            if self.dist.main:
                print("[train] reward: oracle = the built-in data's geometric judge, a DIAGNOSTIC upper "
                      "bound (what SoPo could fix with a perfect reward), not a reward model")
        self.evaluator = evaluator_c.model.to(device).eval() if evaluator_c else None

    def make_batches(self) -> None:
        """``self.batches`` (training, text embeddings cached) and ``self.test_batches``."""
        cfg = self.config
        if cfg.batch_size % self.dist.world:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of "
                             f"processes {self.dist.world}")
        self.batches = MotionTextBatches(self.train_set, self.text_encoder, batch_size=cfg.batch_size,
                                         seed=cfg.seed, reward_text_encoder=self.reward_text_encoder)
        self.test_batches = MotionTextBatches(self.test_set, self.text_encoder, batch_size=32,
                                              seed=cfg.seed, drop_last=False,
                                              reward_text_encoder=self.reward_text_encoder).eval_batches(32)
        if cfg.eval_samples:
            self.test_batches = self.test_batches[:max(1, math.ceil(cfg.eval_samples / 32))]

    def make_optimizer(self) -> None:
        """``self.params``, ``self.optimizer`` (AdamW) and ``self.scheduler`` (warmup-cosine)."""
        cfg = self.config
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, cfg.steps, min(cfg.warmup, cfg.steps))

    def resume(self) -> None:
        """With ``config.resume``, the state of ``out/last`` (step, weights, optimizer, RNG, log);
        refuses another step version or other settings."""
        # time spent before a resume (up to its checkpoint), so the summary's times cover the whole run
        self.clock: Dict[str, object] = {"train seconds": 0.0, "train cpu seconds": 0.0, "phase seconds": {}}
        self.resumed_at: List[int] = []
        self.resumed = False
        self.last = self.out / "last"
        if not self.config.resume:
            return
        c, state = resume_state(self.last, self.config.fingerprint(), self.base.kind,
                                step_version=STEP_VERSION)
        if state is None:
            return
        self.policy.load_state_dict(c.model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.history = int(state["step"]), dict(state.get("history", {}))
        self.clock = dict(state.get("clock", self.clock))
        self.resumed_at = list(state.get("resumed at", [])) + [self.step]
        self.resumed = True
        if self.dist.main:
            print(f"[train] resumed from {self.last} at step {self.step}")

    def make_step(self) -> PreferenceStep:
        """The preference step (``sopo_ext.methods.PreferenceStep``) on the (DDP-wrapped) policy."""
        cfg, D = self.config, self.dist
        policy = self.policy
        if D.world > 1:
            policy = torch.nn.parallel.DistributedDataParallel(
                self.policy, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        step_cfg = StepConfig(method=cfg.method, k=cfg.k, tau=cfg.tau, c=cfg.c, beta=cfg.beta,
                              scale=cfg.scale, scale_regime=cfg.scale_regime, beta_dpo=cfg.beta_dpo,
                              sampling_steps=cfg.sampling_steps, sampler=cfg.sampler,
                              guidance_scale=cfg.guidance_scale, noise=cfg.noise,
                              cond_drop=cfg.cond_drop, bf16=cfg.bf16)
        if cfg.bf16 and self.device.type == "cpu" and not cpu_has_native_bf16() and D.main:
            print("[train] warning: --bf16 on a CPU without native bf16 matrix products (no "
                  "AVX512-BF16 / AMX): they are emulated and run tens of times slower than fp32 "
                  "here (docs/performance.md); drop --bf16 on this machine", file=sys.stderr)
        return PreferenceStep(policy, self.reference, self.diffusion, self.reward, step_cfg)

    def open_logs(self) -> None:
        """``self.log`` (metrics.csv) and ``self.tb`` (TensorBoard) on the main process."""
        self.log = self.tb = None
        self.pending: List[tuple] = []  # (step, lr, {name: scalar tensor}) not yet read back
        if not self.dist.main:
            return
        self.log = CsvLog(self.out / "metrics.csv", resume_step=self.step if self.resumed else -1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=self.step if self.resumed else None)
        except ImportError:
            print("[train] tensorboard is not installed: no TensorBoard events "
                  "(pip install tensorboard)", file=sys.stderr)

    # ---- one step ---------------------------------------------------------------------------------
    def training_step(self, step: int):
        """(loss, stats) of the batch of ``step``: the preference step's loss (a scalar tensor
        with a graph) and its statistics (scalar tensors, read back at the next log point)."""
        cfg, D, device = self.config, self.dist, self.device
        idx = self.batches.indices(step)
        b = self.batches.collate(idx[D.rank::D.world], self.batches.epoch_of(step))
        # dataset indices and lengths stay on the host: reading them never waits for the device
        b = {k: (v.to(device) if torch.is_tensor(v) and k not in HOST_KEYS else v) for k, v in b.items()}
        g = torch.Generator(device=device).manual_seed(seed_for(cfg.seed, step, D.rank))

        def gen_for_index(i: int) -> torch.Generator:
            return torch.Generator(device=device).manual_seed(seed_for(cfg.seed, 10 ** 9 + i))

        self.policy.train()
        return self.stepper(b, g, gen_for_index)

    def optimizer_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward, gradient clipping, AdamW and the schedule; returns the gradient norm."""
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with phase("optimizer"):
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
        return gnorm

    # ---- logging ------------------------------------------------------------------------------------
    def log_steps(self) -> None:
        """Logs the steps since the last call: one all-reduce and one host read for all of them.
        Stops the run at the first step whose loss is not finite (on any rank)."""
        if not self.pending:
            return
        keys = sorted(self.pending[0][2])
        rows = torch.stack([torch.stack([st[k].detach().float().reshape(()) for k in keys])
                            for _, _, st in self.pending])
        values = self.dist.mean_rows(rows)
        items = list(self.pending)
        self.pending.clear()
        for (at, lr, _), vals in zip(items, values):
            row = dict(zip(keys, vals))
            if not math.isfinite(row["loss"]):
                if self.log is not None:
                    self.log.flush()
                good = self.last if (self.last / ckpt_io.CONFIG).is_file() else "none (nothing saved yet)"
                raise FloatingPointError(f"non-finite loss ({row['loss']}, mean over ranks) at step "
                                         f"{at - 1}; the last good checkpoint is {good}")
            if self.dist.main:
                self.log.add({"step": at, "lr": lr, **row})
                if self.tb is not None:
                    for k, v in row.items():
                        self.tb.add_scalar(f"train/{k}", v, at)
                    self.tb.add_scalar("train/lr", lr, at)
        if self.dist.main:
            row = dict(zip(keys, values[-1]))
            self.bar.set_postfix({"loss": f"{row['loss']:.4f}",
                                  **({"reward": f"{row['reward']:.3f}"} if "reward" in row else {}),
                                  **({"valuable": f"{row['valuable']:.2f}"} if "valuable" in row else {})},
                                 refresh=False)

    def log_eval(self, tag: str, metrics: Dict[str, float], at: int) -> None:
        if self.log is not None:
            self.log.add({"step": at, **{f"{tag} {k}": v for k, v in metrics.items()}})
            self.log.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{tag}/{k}", v, at)

    def evaluate(self, tag: str, at: int) -> Optional[Dict[str, float]]:
        """The evaluator's metrics of the policy (main process; None without an evaluator)."""
        res = None
        if self.dist.main and self.evaluator is not None:
            with phase("evaluation"):
                res = evaluate(self.policy, self.diffusion, self.test_batches, self.evaluator,
                               self.reward, self.config, self.device, self.judged)
            self.log_eval(tag, res, at)
            print(f"[train] {tag} @ step {at}: " + ", ".join(
                f"{k}={res[k]:.4f}" for k in ("R-precision top1", "MM-Dist", "FID", "detail accuracy",
                                              "judged details", "reward")
                if k in res), flush=True)
        self.dist.barrier()
        return res

    # ---- checkpoints ----------------------------------------------------------------------------------
    def meta(self) -> dict:
        """What the checkpoints record about the run."""
        m = dict(self.base.meta)
        m.pop("metrics", None)
        m.update({"made_by": self.command, "base": str(self.base.path), "steps": self.step,
                  "seed": self.config.seed, "train": self.config.fingerprint()})
        return m

    def save_checkpoint(self) -> None:
        """The resumable checkpoint ``out/last`` (model, optimizer, scheduler, RNG, history)."""
        if self.dist.main:
            with phase("checkpoint"):
                # the log first: a kill after the checkpoint must not lose the rows it covers
                # (a resume drops rows past the checkpoint's step)
                self.log.flush()
                ts = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                      "args": self.config.fingerprint(), "history": self.history,
                      "clock": self.run_clock(), "resumed at": self.resumed_at}
                ckpt_io.save_checkpoint(self.last, self.policy, meta=self.meta(), mean=self.mean,
                                        std=self.std, train_state=ts)
        self.dist.barrier()

    def run_clock(self) -> Dict[str, object]:
        """Training wall time, CPU time (of this process, all its threads: unlike wall time it does
        not grow while the process waits for a shared core or is paused, so runs on a busy machine
        stay comparable) and per-phase times, including the time before any resume."""
        phases = dict(self.clock["phase seconds"])
        for k, v in phase_times().items():
            phases[k] = phases.get(k, 0.0) + v
        return {"train seconds": self.clock["train seconds"] + time.perf_counter() - self._t0,
                "train cpu seconds": self.clock["train cpu seconds"] + time.process_time() - self._cpu0,
                "phase seconds": phases}

    # ---- the loop -------------------------------------------------------------------------------------
    def train_loop(self) -> bool:
        """Evaluates the base (step 0), then steps until ``config.steps``; True when it stopped
        early (``stop_after``)."""
        cfg, D = self.config, self.dist
        self.before = self.history.get("before")
        if self.step == 0 and cfg.eval_before:
            self.before = self.evaluate("eval", 0)
            self.history["before"] = self.before
        from tqdm.auto import tqdm
        self.bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method} ({cfg.backbone})",
                        disable=not (cfg.progress and D.main), dynamic_ncols=True, file=sys.stdout)
        reset_phase_times()
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        stop_at = self.step + cfg.stop_after if cfg.stop_after else None
        while self.step < cfg.steps:
            loss, stats = self.training_step(self.step)
            gnorm = self.optimizer_step(loss)
            self.step += 1
            # the step's numbers stay on the device until the next log point: no host sync per step
            self.pending.append((self.step, self.scheduler.get_last_lr()[0],
                                 {"loss": loss.detach(), "grad_norm": gnorm, **stats}))
            self.bar.update(1)
            stopping = stop_at is not None and self.step >= stop_at
            evaluating = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self.step < cfg.steps
            saving = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stopping
            if self.step % cfg.log_every == 0 or evaluating or saving:
                self.log_steps()  # raises on a non-finite loss, before anything is saved
            if evaluating:
                self.evaluate("eval", self.step)
            if saving:
                self.save_checkpoint()
            if stopping and self.step < cfg.steps:
                self.bar.close()
                if D.main:
                    print(f"[train] stopped after step {self.step} (--stop-after); continue with --resume")
                return True
        self.bar.close()
        return False

    def finish(self) -> Dict[str, object]:
        """The end: evaluation, the fine-tuned checkpoint ``out/model``, GIFs, ``summary.json``."""
        cfg = self.config
        final_clock = self.run_clock()
        times = final_clock["phase seconds"]
        after = self.evaluate("eval", self.step) if cfg.eval_after else None
        if not self.dist.main:
            return {}
        meta = self.meta()
        meta["metrics"] = {"before": self.before, "after": after}
        ckpt_io.save_checkpoint(self.out / "model", self.policy, meta=meta, mean=self.mean, std=self.std)
        gifs = self.save_animations() if cfg.animation and self.evaluator is not None else []
        summary = {"before": self.before, "after": after, "steps": self.step,
                   "train seconds": round(final_clock["train seconds"], 1),
                   "train cpu seconds": round(final_clock["train cpu seconds"], 1),
                   "phase seconds": {k: round(v, 2) for k, v in sorted(times.items())},
                   # the times above add the runs before each resume up to their checkpoints
                   **({"resumed at steps": self.resumed_at} if self.resumed_at else {}),
                   "animations": gifs, "command": self.command}
        ckpt_io.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
        self.log.flush()
        if self.tb is not None:
            self.tb.close()
        print(f"\n[train] {cfg.method} on {cfg.backbone}: {self.step} steps in "
              f"{final_clock['train seconds']:.0f} s ("
              f"{', '.join(f'{k} {v:.0f} s' for k, v in sorted(times.items(), key=lambda kv: -kv[1]))})")
        if self.before and after:
            print(summary_table(self.before, after, cfg.tau))
        print(f"[train] fine-tuned checkpoint: {self.out / 'model'}" +
              (f"; animations: {', '.join(gifs)}" if gifs else ""))
        self.summary = summary
        return summary

    def save_animations(self, n: int = 3) -> List[str]:
        """Side-by-side GIFs (base vs fine-tuned, same initial noise) for a few test captions with
        a detail word (direction, limb, count), where alignment has something to fix."""
        try:
            from . import viz
        except ImportError as e:  # pragma: no cover
            print(f"[train] no animations ({e}); pip install 'sopo_ext[viz]'", file=sys.stderr)
            return []
        from .evaluation import counterfactual_tokens
        from .sampling import generate
        cfg = self.config
        picked = []
        for b in self.test_batches:
            for i, tok in enumerate(b["tokens"]):
                if counterfactual_tokens(tok) and len(picked) < n:
                    picked.append((b, i))
        paths = []
        dev = next(self.policy.parameters()).device
        for j, (b, i) in enumerate(picked):
            L = int(b["lengths"][i])
            te, m = b["text_emb"][i:i + 1].to(dev), b["mask"][i:i + 1, :L].to(dev)
            motions = []
            for model in (self.reference, self.policy):
                g = torch.Generator(device=dev).manual_seed(cfg.seed + 7 + j)
                motions.append(generate(model, self.diffusion, te, m, steps=cfg.eval_steps,
                                        guidance_scale=cfg.eval_guidance, generator=g)[0].cpu().numpy())
            p = self.out / f"compare_{j}.gif"
            viz.save_comparison(motions, ["base", f"{cfg.method}"], str(p), caption=b["captions"][i],
                                mean=self.mean, std=self.std, stride=2, fps=10)
            paths.append(str(p))
        return paths
