"""SoPo fine-tuning: ``python -m sopo_ext.train``.

With no arguments it fine-tunes the bundled MDM-style model on the built-in dataset with SoPo,
judged by the bundled TMR-style reward model, on the CPU, evaluates before and after with the
bundled evaluator, and prints what changed. Everything else is a flag (``--help``):

    python -m sopo_ext.train                                   # SoPo, MDM, built-in data
    python -m sopo_ext.train --backbone mld --method usopo     # another backbone / method
    python -m sopo_ext.train --preset official-loss            # the official release's loss and sampler
    python -m sopo_ext.train --preset diffusion-dpo            # Wallace et al. on offline pairs
    python -m sopo_ext.train --out runs/sopo --resume          # continue after a kill
    torchrun --nproc_per_node=2 -m sopo_ext.train --steps 50   # data-parallel (gloo on CPU)

Output in ``--out`` (default ``runs/train-<method>-<backbone>``): ``metrics.csv`` (one row per
step, evaluation rows added), TensorBoard events in ``tb/``, ``last/`` (checkpoint + training
state for ``--resume``), ``model/`` (the fine-tuned checkpoint, safetensors + config),
``summary.json`` and ``compare_*.gif`` (base vs fine-tuned on a few captions).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from ._cli import check_resume_settings, command_line, fingerprint, resolve_device, run_cli
from .data.batches import MotionTextBatches
from .data import judge
from .data.builtin import resolve_data_root
from .data.humanml3d import HumanML3D
from .methods import METHODS, RENAMED_METHODS, SCALE_REGIMES, PreferenceStep, StepConfig
from .optim import make_adamw, rng_state, set_rng_state, warmup_cosine
from .pretrain import CsvLog
from .profiling import phase, phase_times, reset_phase_times
from .sampling import diffusion_from_meta

__all__ = ["main", "build_parser", "parse_args", "run", "PRESETS"]

#: ``--preset NAME``: defaults that flags given explicitly still override.
PRESETS = {
    # the official SoPo release's loss and sampler (reference-facts.md), not its batch size (64),
    # its padding of every motion to 196 frames or its sampling with MDM in train mode (10% text
    # dropout while sampling): hence the name
    "official-loss": dict(k=2, noise="fresh", guidance_scale=1.0, sampler="ddpm", sampling_steps=50),
    # Diffusion-DPO (Wallace et al.) on MoDiPO-style offline pairs: shared noise and t for the
    # four terms, beta_dpo = 5000 folded into scale = 2500 on the backbone's own per-element mean
    # loss (x0 for MDM, eps for MLD; Wallace et al. weight eps, i.e. x0 x SNR(t))
    "diffusion-dpo": dict(method="modipo", scale_regime="diffusion-dpo", beta_dpo=5000.0,
                          noise="shared"),
}
RENAMED_PRESETS = {
    "official": "--preset official is now --preset official-loss: it sets the release's loss and "
                "sampler, not its batch size (64), padded length (196) or train-mode sampling",
}
HOST_KEYS = ("indices", "lengths")  # batch entries the step reads on the host
#: bumped when the step computes something else for the same flags (2: SFT runs the preference
#: methods' eval-mode forward, x_t is zero at padding, non-finite rewards are left out, z regimes)
STEP_VERSION = 2
#: flags that may differ between a run and its --resume.
RESUME_FREE = {"resume", "out", "device", "threads", "progress", "eval_every", "animation",
               "stop_after", "argv", "ckpt_every", "log_every"}


# ------------------------------------------------------------------------------------ setup
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


def _load(spec: Optional[str], bundled: str, kind: str, data_mean, data_std, what: str):
    c = ckpt_io.load_checkpoint(spec or bundled, kind)
    ckpt_io.check_normalization(c, data_mean, data_std, what=what)
    return c


def _fingerprint(args) -> dict:
    return fingerprint(args, RESUME_FREE)


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


# ------------------------------------------------------------------------------------ eval
def evaluate(policy, diffusion, batches, evaluator, reward, args, device, judged=None) -> Dict[str, float]:
    """The evaluator's metrics of one generated motion per test caption; ``judged`` =
    (specs, mean, std) adds the geometric detail checks (built-in data only)."""
    from .evaluation import generate_split, generation_metrics, judged_accuracy
    moved = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    gen = generate_split(policy, diffusion, moved, steps=args.eval_steps,
                         guidance_scale=args.eval_guidance, seed=args.seed + 1)
    out = generation_metrics(gen, batches, evaluator, reward, tau=args.tau, seed=args.seed)
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


def save_animations(policy, reference, diffusion, batches, args, out: Path, mean, std, n: int = 3) -> List[str]:
    """Side-by-side GIFs (base vs fine-tuned, same initial noise) for a few test captions with a
    detail word (direction, limb, count), where alignment has something to fix."""
    try:
        from . import viz
    except ImportError as e:  # pragma: no cover
        print(f"[train] no animations ({e}); pip install 'sopo_ext[viz]'", file=sys.stderr)
        return []
    from .evaluation import counterfactual_tokens
    from .sampling import generate
    picked = []
    for b in batches:
        for i, tok in enumerate(b["tokens"]):
            if counterfactual_tokens(tok) and len(picked) < n:
                picked.append((b, i))
    paths = []
    dev = next(policy.parameters()).device
    for j, (b, i) in enumerate(picked):
        L = int(b["lengths"][i])
        te, m = b["text_emb"][i:i + 1].to(dev), b["mask"][i:i + 1, :L].to(dev)
        motions = []
        for model in (reference, policy):
            g = torch.Generator(device=dev).manual_seed(args.seed + 7 + j)
            motions.append(generate(model, diffusion, te, m, steps=args.eval_steps,
                                    guidance_scale=args.eval_guidance, generator=g)[0].cpu().numpy())
        p = out / f"compare_{j}.gif"
        viz.save_comparison(motions, ["base", f"{args.method}"], str(p), caption=b["captions"][i],
                            mean=mean, std=std, stride=2, fps=10)
        paths.append(str(p))
    return paths


# ------------------------------------------------------------------------------------ run
def run(args) -> Dict[str, float]:
    if args.threads:
        torch.set_num_threads(args.threads)
    D = Dist(args.device)
    try:
        return _run(args, D)
    finally:
        D.close()


def _run(args, D: "Dist") -> Dict[str, float]:
    device = D.device
    # The global RNG drives dropout and MDM's text dropout in training mode (sft): seed it so a
    # run is a function of --seed (and a --resume, which restores it, equals an uninterrupted run).
    torch.manual_seed(_seed_for(args.seed, D.rank))
    out = Path(args.out)
    if D.main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()

    # ---- data and models -------------------------------------------------------------------
    root = resolve_data_root(args.data)
    train = HumanML3D(root, "train", seed=args.seed, max_len=args.max_len)
    test = HumanML3D(root, "test", seed=args.seed, max_len=args.max_len)
    mean, std = train.mean, train.std_safe
    # the built-in dataset knows what every motion does: evaluation also judges the details
    judged = (judge.load_specs(root), test.mean, test.std_safe) if (root / "specs.json").is_file() else None
    what = f"the dataset at {root}"
    base = _load(args.base, args.backbone, args.backbone, mean, std, what)
    if base.kind != args.backbone:
        raise ValueError(f"--base holds a {base.kind!r} model but --backbone is {args.backbone!r}")
    reward_c = _load(args.reward, "reward", "tmr", mean, std, what)
    evaluator_c = None if args.evaluator == "none" else _load(args.evaluator, "evaluator", "evaluator", mean, std, what)
    from .models.text import get_text_encoder
    names = {base.meta.get("text_encoder"), reward_c.meta.get("text_encoder")} - {None}
    if len(names) > 1:
        raise ValueError(f"the base model and the reward model use different text encoders: {sorted(names)}")
    text_encoder = get_text_encoder(names.pop() if names else args.text_encoder)
    global_batch = args.batch_size
    if global_batch % D.world:
        raise ValueError(f"--batch-size {global_batch} must be divisible by the number of processes {D.world}")
    batches = MotionTextBatches(train, text_encoder, batch_size=global_batch, seed=args.seed)
    test_batches = MotionTextBatches(test, text_encoder, batch_size=32, seed=args.seed,
                                     drop_last=False).eval_batches(32)
    if args.eval_samples:
        keep = max(1, math.ceil(args.eval_samples / 32))
        test_batches = test_batches[:keep]

    diffusion = diffusion_from_meta(base.meta)
    policy = base.model.to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if base.kind == "mld":  # SoPo tunes the latent denoiser; the VAE stays as pretrained
        policy.vae.requires_grad_(False)
    reward = reward_c.model.to(device).eval().requires_grad_(False)
    evaluator = evaluator_c.model.to(device).eval() if evaluator_c else None
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = make_adamw(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = warmup_cosine(opt, args.steps, min(args.warmup, args.steps))

    # ---- resume ------------------------------------------------------------------------------
    step, state, history = 0, None, {}
    # time spent before a resume (up to its checkpoint), so the summary's times cover the whole run
    clock: Dict[str, object] = {"train seconds": 0.0, "train cpu seconds": 0.0, "phase seconds": {}}
    resumed_at: List[int] = []
    last = out / "last"
    if args.resume:
        ckpt_io.recover(last)
        if (last / ckpt_io.CONFIG).is_file():
            c = ckpt_io.load_checkpoint(last, base.kind)
            state = c.train_state()
            if state is None:
                raise ckpt_io.CheckpointError(f"{last} has no training state to resume from")
            if state["args"].get("step_version") != STEP_VERSION:
                raise ValueError(
                    f"{last} was written by an older trainer (step version "
                    f"{state['args'].get('step_version', 1)}, now {STEP_VERSION}: SFT's forward, the "
                    f"padding of x_t and the scale regimes changed), so resuming it would mix two "
                    f"different steps; start a new run with another --out")
            check_resume_settings(state["args"], args, RESUME_FREE)
            policy.load_state_dict(c.model.state_dict())
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            step, history = int(state["step"]), dict(state.get("history", {}))
            clock = dict(state.get("clock", clock))
            resumed_at = list(state.get("resumed at", [])) + [step]
            if D.main:
                print(f"[train] resumed from {last} at step {step}")
        elif D.main:
            print(f"[train] --resume: no checkpoint in {last} yet, starting from scratch")

    ddp_policy = policy
    if D.world > 1:
        ddp_policy = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    cfg = StepConfig(method=args.method, k=args.k, tau=args.tau, c=args.c, beta=args.beta,
                     scale=args.scale, scale_regime=args.scale_regime, beta_dpo=args.beta_dpo,
                     sampling_steps=args.sampling_steps, sampler=args.sampler,
                     guidance_scale=args.guidance_scale, noise=args.noise, cond_drop=args.cond_drop,
                     bf16=args.bf16)
    stepper = PreferenceStep(ddp_policy, reference, diffusion, reward, cfg)

    log = tb = None
    if D.main:
        log = CsvLog(out / "metrics.csv", resume_step=step if state is not None else -1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out / "tb"), purge_step=step if state is not None else None)
        except ImportError:
            print("[train] tensorboard is not installed: no TensorBoard events "
                  "(pip install tensorboard)", file=sys.stderr)

    def log_eval(tag: str, metrics: Dict[str, float], at: int) -> None:
        if log is not None:
            log.add({"step": at, **{f"{tag} {k}": v for k, v in metrics.items()}})
            log.flush()
        if tb is not None:
            for k, v in metrics.items():
                tb.add_scalar(f"{tag}/{k}", v, at)

    def do_eval(tag: str, at: int) -> Optional[Dict[str, float]]:
        res = None
        if D.main and evaluator is not None:
            with phase("evaluation"):
                res = evaluate(policy, diffusion, test_batches, evaluator, reward, args, device, judged)
            log_eval(tag, res, at)
            print(f"[train] {tag} @ step {at}: " + ", ".join(
                f"{k}={res[k]:.4f}" for k in ("R-precision top1", "MM-Dist", "FID", "detail accuracy",
                                              "judged details", "reward")
                if k in res), flush=True)
        D.barrier()
        return res

    # ---- loop --------------------------------------------------------------------------------
    before = history.get("before")
    if step == 0 and args.eval_before:
        before = do_eval("eval", 0)
        history["before"] = before
    from tqdm.auto import tqdm
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.method} ({args.backbone})",
               disable=not (args.progress and D.main), dynamic_ncols=True, file=sys.stdout)
    pending: List[tuple] = []  # (step, lr, {name: scalar tensor}) not yet read back

    def flush_pending() -> None:
        """Log the steps since the last flush: one all-reduce and one host read for all of
        them. Stops the run at the first step whose loss is not finite (on any rank)."""
        if not pending:
            return
        keys = sorted(pending[0][2])
        rows = torch.stack([torch.stack([st[k].detach().float().reshape(()) for k in keys])
                            for _, _, st in pending])
        values = D.mean_rows(rows)
        items = list(pending)
        pending.clear()
        for (at, lr, _), vals in zip(items, values):
            row = dict(zip(keys, vals))
            if not math.isfinite(row["loss"]):
                if log is not None:
                    log.flush()
                raise FloatingPointError(
                    f"non-finite loss ({row['loss']}, mean over ranks) at step {at - 1}; the last good "
                    f"checkpoint is {last if (last / ckpt_io.CONFIG).is_file() else 'none (nothing saved yet)'}")
            if D.main:
                log.add({"step": at, "lr": lr, **row})
                if tb is not None:
                    for k, v in row.items():
                        tb.add_scalar(f"train/{k}", v, at)
                    tb.add_scalar("train/lr", lr, at)
        if D.main:
            row = dict(zip(keys, values[-1]))
            bar.set_postfix({"loss": f"{row['loss']:.4f}",
                             **({"reward": f"{row['reward']:.3f}"} if "reward" in row else {}),
                             **({"valuable": f"{row['valuable']:.2f}"} if "valuable" in row else {})},
                            refresh=False)

    reset_phase_times()
    t0, cpu0 = time.perf_counter(), time.process_time()

    def run_clock() -> Dict[str, object]:
        """Training wall time, CPU time (of this process, all its threads: unlike wall time it does
        not grow while the process waits for a shared core or is paused, so runs on a busy machine
        stay comparable) and per-phase times, including the time before any resume."""
        phases = dict(clock["phase seconds"])
        for k, v in phase_times().items():
            phases[k] = phases.get(k, 0.0) + v
        return {"train seconds": clock["train seconds"] + time.perf_counter() - t0,
                "train cpu seconds": clock["train cpu seconds"] + time.process_time() - cpu0,
                "phase seconds": phases}

    stop_at = step + args.stop_after if args.stop_after else None
    while step < args.steps:
        idx = batches.indices(step)
        mine = idx[D.rank::D.world]
        b = batches.collate(mine, batches.epoch_of(step))
        # dataset indices and lengths stay on the host: reading them never waits for the device
        b = {k: (v.to(device) if torch.is_tensor(v) and k not in HOST_KEYS else v) for k, v in b.items()}
        g = torch.Generator(device=device).manual_seed(_seed_for(args.seed, step, D.rank))

        def gen_for_index(i: int) -> torch.Generator:
            return torch.Generator(device=device).manual_seed(_seed_for(args.seed, 10 ** 9 + i))

        policy.train()
        loss, stats = stepper(b, g, gen_for_index)
        with phase("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with phase("optimizer"):
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            sched.step()
        step += 1
        # the step's numbers stay on the device until the next log point: no host sync per step
        pending.append((step, sched.get_last_lr()[0], {"loss": loss.detach(), "grad_norm": gnorm, **stats}))
        bar.update(1)
        stopping = stop_at is not None and step >= stop_at
        evaluating = bool(args.eval_every) and step % args.eval_every == 0 and step < args.steps
        saving = step % args.ckpt_every == 0 or step == args.steps or stopping
        if step % args.log_every == 0 or evaluating or saving:
            flush_pending()  # raises on a non-finite loss, before anything is saved
        if evaluating:
            do_eval("eval", step)
        if saving:
            if D.main:
                with phase("checkpoint"):
                    # the log first: a kill after the checkpoint must not lose the rows it covers
                    # (a resume drops rows past the checkpoint's step)
                    log.flush()
                    ts = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "rng": rng_state(), "args": _fingerprint(args), "history": history,
                          "clock": run_clock(), "resumed at": resumed_at}
                    ckpt_io.save_checkpoint(last, policy, meta=_meta(args, base, step), mean=mean,
                                            std=std, train_state=ts)
            D.barrier()
        if stopping and step < args.steps:
            bar.close()
            if D.main:
                print(f"[train] stopped after step {step} (--stop-after); continue with --resume")
            return {}
    bar.close()
    final_clock = run_clock()
    train_seconds, train_cpu_seconds = final_clock["train seconds"], final_clock["train cpu seconds"]
    times = final_clock["phase seconds"]

    # ---- the end: evaluation, checkpoint, pictures, summary ------------------------------------
    after = do_eval("eval", step) if args.eval_after else None
    result: Dict[str, float] = {}
    if D.main:
        meta = _meta(args, base, step)
        meta["metrics"] = {"before": before, "after": after}
        ckpt_io.save_checkpoint(out / "model", policy, meta=meta, mean=mean, std=std)
        gifs = []
        if args.animation and evaluator is not None:
            gifs = save_animations(policy, reference, diffusion, test_batches, args, out, mean, std)
        summary = {"before": before, "after": after, "steps": step,
                   "train seconds": round(train_seconds, 1),
                   "train cpu seconds": round(train_cpu_seconds, 1),
                   "phase seconds": {k: round(v, 2) for k, v in sorted(times.items())},
                   # the times above add the runs before each resume up to their checkpoints
                   **({"resumed at steps": resumed_at} if resumed_at else {}),
                   "animations": gifs, "command": command_line("sopo_ext.train", args.argv)}
        ckpt_io.atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        log.flush()
        if tb is not None:
            tb.close()
        print(f"\n[train] {args.method} on {args.backbone}: {step} steps in {train_seconds:.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in sorted(times.items(), key=lambda kv: -kv[1]))})")
        if before and after:
            print(summary_table(before, after, args.tau))
        print(f"[train] fine-tuned checkpoint: {out / 'model'}" +
              (f"; animations: {', '.join(gifs)}" if gifs else ""))
        result = after or {}
    return result


def _meta(args, base, step) -> dict:
    m = dict(base.meta)
    m.pop("metrics", None)
    m.update({"made_by": command_line("sopo_ext.train", args.argv), "base": str(base.path),
              "steps": step, "seed": args.seed, "train": _fingerprint(args)})
    return m


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sopo_ext.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--method", default=None, choices=sorted(METHODS), type=_renamed(RENAMED_METHODS),
      help="default sopo; modipo = offline pairs of the frozen reference (MoDiPO), formerly "
           "called diffusion-dpo")
    a("--backbone", default="mdm", choices=("mdm", "mld"))
    a("--preset", default=None, choices=sorted(PRESETS), type=_renamed(RENAMED_PRESETS),
      help="official-loss: the official release's K=2, fresh noise per loss term, no CFG, 50-step "
           "ancestral sampling (not its batch 64 / 196-frame padding / train-mode sampling); "
           "diffusion-dpo: Wallace et al.'s settings on offline pairs (--method modipo, "
           "--scale-regime diffusion-dpo, --beta-dpo 5000, shared noise and t; the loss stays the "
           "backbone's own: x0 for MDM, eps for MLD)")
    a("--data", default="builtin", help="'builtin' (default) or a HumanML3D directory")
    a("--base", default=None, help="backbone checkpoint (default: the bundled one)")
    a("--reward", default=None, help="reward checkpoint (default: the bundled one)")
    a("--evaluator", default=None, help="evaluator checkpoint (default: bundled; 'none' skips evaluation)")
    a("--text-encoder", default="minilm", help="only used when the checkpoints do not name one")
    a("--out", default=None)
    a("--k", type=int, default=None, help="online samples per caption (default 4)")
    a("--tau", type=float, default=0.45, help="reward threshold of a valuable unpreferred sample")
    a("--c", type=float, default=2.0, help="beta_w = beta (C - S)")
    a("--beta", type=float, default=1.0)
    a("--scale", type=float, default=1.0,
      help="the constant of --scale-regime constant (default 1: the official release, the linear "
           "regime of the sigmoid)")
    a("--scale-regime", default=None, choices=SCALE_REGIMES,
      help="how z is scaled (default constant): constant = --scale; diffusion-dpo = --beta-dpo / 2 "
           "(saturating); paper = T * omega_t per timestep (Eq. 16: T * SNR(t) on MDM's x0 loss, "
           "T on MLD's eps loss). metrics.csv logs z's mean and |z| quantiles, sigmoid(-z) and the "
           "implicit accuracy, so a run shows its regime")
    a("--beta-dpo", type=float, default=None, help="Diffusion-DPO's beta (default 5000)")
    a("--sampling-steps", type=int, default=None, help="sampling steps of the online samples (default 8)")
    a("--sampler", default=None, choices=("ddim", "ddpm"), help="default ddim")
    a("--guidance-scale", type=float, default=None, help="CFG of the online samples (default 1: none)")
    a("--noise", default=None, choices=("shared", "fresh"), help="default shared")
    a("--cond-drop", type=float, default=0.0,
      help="CFG text dropout while fine-tuning, the same rule for every method (SFT included): "
           "each caption dropped with this probability, for the policy and the reference alike "
           "(default 0; the policy runs without dropout in every method)")
    a("--lr", type=float, default=1e-4)
    a("--weight-decay", type=float, default=0.0)
    a("--warmup", type=int, default=20)
    a("--grad-clip", type=float, default=1.0)
    a("--batch-size", type=int, default=16, help="captions per step (over all processes)")
    a("--steps", type=int, default=200)
    a("--max-len", type=int, default=196)
    a("--seed", type=int, default=0)
    a("--device", default="auto")
    a("--threads", type=int, default=None)
    a("--bf16", action="store_true", help="bf16 autocast for the model forwards")
    a("--eval-steps", type=int, default=20, help="DDIM steps of the evaluation samples")
    a("--eval-guidance", type=float, default=2.5)
    a("--eval-samples", type=int, default=None, help="evaluate on the first N test samples")
    a("--eval-every", type=int, default=0, help="also evaluate every N steps")
    a("--no-eval-before", dest="eval_before", action="store_false")
    a("--no-eval-after", dest="eval_after", action="store_false")
    a("--no-animation", dest="animation", action="store_false")
    a("--ckpt-every", type=int, default=50)
    a("--log-every", type=int, default=10,
      help="read the step statistics back (one host sync) every N steps; every step is logged")
    a("--resume", action="store_true")
    a("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    a("--no-progress", dest="progress", action="store_false")
    return ap


def _renamed(renamed: Dict[str, str]):
    """argparse type: a name that was renamed is an error that says what it is called now."""
    def check(value: str) -> str:
        if value in renamed:
            raise argparse.ArgumentTypeError(renamed[value])
        return value
    check.__name__ = "name"
    return check


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    defaults = dict(method="sopo", k=4, noise="shared", guidance_scale=1.0, sampler="ddim",
                    sampling_steps=8, scale_regime="constant", beta_dpo=5000.0)
    if args.preset:
        defaults.update(PRESETS[args.preset])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = f"runs/train-{args.method}-{args.backbone}"
    for k in ("steps", "batch_size", "k", "sampling_steps", "ckpt_every", "log_every", "eval_steps",
              "max_len"):
        if getattr(args, k) < 1:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    for k in ("scale", "beta_dpo", "beta"):
        v = getattr(args, k)
        if not (v > 0 and math.isfinite(v)):
            raise SystemExit(f"error: --{k.replace('_', '-')} must be positive, got {v}")
    if args.scale_regime != "constant" and args.scale != 1.0:
        raise SystemExit(f"error: --scale {args.scale} is the constant of --scale-regime constant; "
                         f"--scale-regime {args.scale_regime} sets the scale itself")
    if not 0.0 <= args.cond_drop < 1.0:
        raise SystemExit(f"error: --cond-drop must be in [0, 1), got {args.cond_drop}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise SystemExit(f"error: --lr must be positive, got {args.lr}")
    if args.eval_samples is not None and args.eval_samples < 32:
        raise SystemExit("error: --eval-samples must be >= 32 (R-precision uses batches of 32)")
    args.argv = argv
    args.step_version = STEP_VERSION  # recorded with the run: --resume refuses another version
    return args


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
