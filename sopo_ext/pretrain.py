"""Pretrain the models SoPo needs: ``python -m sopo_ext.pretrain {mdm,mld,reward,evaluator}``.

    python -m sopo_ext.pretrain reward    --out runs/reward      # TMR-style reward model
    python -m sopo_ext.pretrain evaluator --out runs/evaluator   # T2M-style evaluator (metrics)
    python -m sopo_ext.pretrain mdm       --out runs/mdm         # MDM-style x0 denoiser
    python -m sopo_ext.pretrain mld       --out runs/mld         # MLD: VAE, then latent denoiser

Data: ``--data builtin`` (default; the procedural dataset, generated and cached on first use) or a
HumanML3D directory. Every run writes into ``--out``::

    model/         the final checkpoint (model.safetensors + config.json; sopo_ext.checkpoint)
    last/          the latest checkpoint with its training state, for --resume
    log.csv        one row per logged step (loss, lr, validation metrics)
    metrics.json   the final validation / test metrics

``--export DIR`` also writes the final checkpoint to DIR (how the bundled checkpoints in
``sopo_ext/checkpoints`` are made; see the README there). ``--resume`` continues from ``last/``
and ends with the same weights as an uninterrupted run (the batches are a function of the seed
and the step; optimizer, scheduler and RNG states are restored); the run's settings must match.
Model sizes are changed with ``--set field=value`` (e.g. ``--set d_model=256 num_layers=6``;
nested MLD fields as ``vae.latent_dim=32``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import checkpoint as ckpt_io
from ._cli import command_line, resolve_device, run_cli
from .runs import CsvLog, fingerprint, resume_state
from .checkpoint import config_from_dict, config_to_dict
from .data.batches import MotionTextBatches
from .data.builtin import resolve_data_root
from .data.humanml3d import HumanML3D
from .optim import make_adamw, rng_state, set_rng_state, warmup_cosine

__all__ = ["main", "build_parser", "run"]

MODELS = ("mdm", "mld", "reward", "evaluator")

#: per-model defaults (steps, batch size, learning rate, ...); every one is a flag.
DEFAULTS: Dict[str, dict] = {
    "reward": dict(steps=2000, batch_size=64, lr=2e-4, warmup=100, val_every=500),
    "evaluator": dict(steps=2000, batch_size=64, lr=2e-4, warmup=100, val_every=500),
    "mdm": dict(steps=8000, batch_size=32, lr=3e-4, warmup=200, val_every=1000),
    "mld": dict(steps=4000, vae_steps=6000, batch_size=32, lr=3e-4, warmup=200, val_every=1000),
}
#: flags that may differ between a run and its --resume (they do not change the result).
RESUME_FREE = {"resume", "out", "export", "device", "threads", "progress", "evaluator", "reward",
               "final_eval", "stop_after", "eval_steps", "eval_guidance", "argv"}


# ------------------------------------------------------------------------------------ helpers
def _parse_value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def apply_overrides(config_cls, base: dict, sets: List[str]):
    """``field=value`` (JSON values, dotted names for nested configs) onto a config dict."""
    d = json.loads(json.dumps(base))
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, val = item.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"--set {key}: {p!r} is not a nested config of {config_cls.__name__}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"--set {key}: unknown field {parts[-1]!r} (known: {sorted(node)})")
        node[parts[-1]] = _parse_value(val)
    return config_from_dict(config_cls, d, "--set")


def _scalars(out: dict) -> Dict[str, float]:
    """The loss dict's side terms as floats (for the log), without the loss itself."""
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items() if k != "loss"}


# ------------------------------------------------------------------------------------ data
class Data:
    """The three splits of a dataset, the text encoder and deterministic batches."""

    def __init__(self, args, need_text: bool):
        self.root = resolve_data_root(args.data)
        kw = dict(max_len=args.max_len)
        self.train = HumanML3D(self.root, "train", seed=args.seed, **kw)
        self.val = HumanML3D(self.root, "val", seed=args.seed, **kw)
        self.test = HumanML3D(self.root, "test", seed=args.seed, **kw)
        self.mean, self.std = self.train.mean, self.train.std_safe
        self.text_encoder = None
        if need_text:
            from .models.text import get_text_encoder
            self.text_encoder = get_text_encoder(args.text_encoder)
        enc = self.text_encoder
        self.train_batches = MotionTextBatches(self.train, enc, batch_size=args.batch_size, seed=args.seed)
        self.val_batches = MotionTextBatches(self.val, enc, batch_size=args.batch_size,
                                             seed=args.seed, drop_last=False).eval_batches(32)
        self.test_batches = MotionTextBatches(self.test, enc, batch_size=args.batch_size,
                                              seed=args.seed, drop_last=False).eval_batches(32)

    @property
    def text_dim(self) -> int:
        return self.text_encoder.dim


# ------------------------------------------------------------------------------------ tasks
class Phase:
    def __init__(self, name: str, steps: int, params: Callable, loss: Callable):
        self.name, self.steps, self.params, self.loss = name, int(steps), params, loss


class Task:
    """What differs between the four models: how to build, which phases, how to validate."""
    kind = ""
    need_text = True

    def __init__(self, args, data: Data):
        self.args, self.data = args, data

    def base_config(self) -> dict:
        cfg_cls, _ = self.classes()
        return config_to_dict(cfg_cls())

    def classes(self):
        from .models import model_classes
        return model_classes(self.kind)

    def build(self):
        cfg_cls, model_cls = self.classes()
        cfg = apply_overrides(cfg_cls, self.base_config(), self.args.set)
        return model_cls(cfg)

    def phases(self, model) -> List[Phase]:
        raise NotImplementedError

    def end_phase(self, model, phase: Phase) -> None:
        pass

    def validate(self, model) -> Dict[str, float]:
        return {}

    def final_eval(self, model) -> Dict[str, float]:
        return {}

    def meta(self) -> dict:
        return {}


class _RetrievalTask(Task):
    metric = "cosine"

    def _loss(self, model, b):
        return self.training_loss(model, b)

    def phases(self, model):
        return [Phase("train", self.args.steps, lambda: model.parameters(), self._loss)]

    def _retrieval(self, model, batches) -> Dict[str, float]:
        from .evaluation import embed_split, retrieval_metrics
        t, m = embed_split(model, batches)
        return retrieval_metrics(t, m, self.metric)

    def validate(self, model):
        return {f"val {k}": v for k, v in self._retrieval(model, self.data.val_batches).items()}

    def final_eval(self, model):
        out = self.validate(model)
        out.update({f"test {k}": v for k, v in self._retrieval(model, self.data.test_batches).items()})
        return out


#: words of a caption that its mirrored motion gets wrong
_SIDE_WORDS = {"left", "right", "clockwise", "counterclockwise", "anticlockwise"}


class RewardTask(_RetrievalTask):
    kind = "tmr"

    def base_config(self):
        d = super().base_config()
        d["text_dim"] = self.data.text_dim
        return d

    def training_loss(self, model, b):
        near_miss = self.near_misses(b) if model.config.near_miss_weight > 0 else None
        out = model.training_loss(b["motion"], b["mask"], b["text_emb"], near_miss=near_miss)
        return out["loss"], _scalars(out)

    def near_misses(self, b) -> dict:
        """The detail-aware reward's hard negatives of a training batch (TMR.near_miss_loss):
        each caption with one detail word swapped (``counterfactual_captions``: left/right,
        forward/backward, clockwise, counts, speed), and, for captions that say left, right or
        clockwise, the motion mirrored (HumanML3D's own mirror augmentation, here a negative
        for the unmirrored caption). Training split only: no judge, no test data."""
        from .data import skeleton as sk
        from .evaluation import counterfactual_captions
        texts, owner, mirrored = [], [], []
        for i, cap in enumerate(b["captions"]):
            swaps = counterfactual_captions(cap)
            texts += swaps
            owner += [i] * len(swaps)
            if _SIDE_WORDS & set(re.findall(r"[a-z]+", cap.lower())):
                mirrored.append(i)
        dev = b["motion"].device
        out = {"text_emb": None, "text_owner": None, "mirror_motion": None, "mirror_mask": None,
               "mirror_owner": None}
        if texts:
            out["text_emb"] = self.data.text_encoder.encode(texts).to(dev, torch.float32)
            out["text_owner"] = torch.as_tensor(owner, dtype=torch.long, device=dev)
        if mirrored:
            rows = torch.as_tensor(mirrored, dtype=torch.long, device=dev)
            mean = torch.as_tensor(np.asarray(self.data.mean), dtype=torch.float64, device=dev)
            std = torch.as_tensor(np.asarray(self.data.std), dtype=torch.float64, device=dev)
            mask = b["mask"][rows]
            raw = b["motion"][rows].double() * std + mean
            mir = ((sk.mirror_features(raw) - mean) / std).float() * mask[..., None]
            out.update(mirror_motion=mir, mirror_mask=mask, mirror_owner=rows)
        return out

    def meta(self):
        return {"text_encoder": self.data.text_encoder.name}


class EvaluatorTask(_RetrievalTask):
    kind = "evaluator"
    metric = "euclidean"
    need_text = False  # the evaluator reads word/POS tokens (T2M), not the sentence embedding

    def base_config(self):
        from .models.evaluator import build_vocab
        d = super().base_config()
        tokens = [list(c.tokens) for s in self.data.train.samples for c in s.captions]
        d["vocab"] = build_vocab(tokens)
        return d

    def training_loss(self, model, b):
        out = model.training_loss(b["motion"], b["mask"], b["tokens"])
        return out["loss"], _scalars(out)


class _DiffusionTask(Task):
    """Shared by MDM and MLD: the diffusion, the validation loss and the generation metrics."""
    default_schedule = "cosine"
    prediction = "x0"

    def __init__(self, args, data):
        super().__init__(args, data)
        from .diffusion import DiffusionConfig, GaussianDiffusion
        self.diffusion_config = DiffusionConfig(num_steps=args.diffusion_steps,
                                                schedule=args.schedule or self.default_schedule,
                                                prediction=self.prediction)
        self.diffusion = GaussianDiffusion(self.diffusion_config)

    def base_config(self):
        d = super().base_config()
        self._set_text_dim(d)
        return d

    def _set_text_dim(self, d):
        d["text_dim"] = self.data.text_dim

    def meta(self):
        return {"diffusion": config_to_dict(self.diffusion_config),
                "text_encoder": self.data.text_encoder.name}

    def diffusion_loss(self, model, x0, text_emb, mask, generator=None):
        out = self.diffusion.training_losses(model, x0, text_emb, mask, generator=generator)
        loss = out["loss"] if isinstance(out, dict) else out
        return loss.mean()

    def final_eval(self, model):
        out = self.validate(model)
        ev = self._load_judge(self.args.evaluator, "evaluator", "evaluator")
        if ev is None:
            return out
        rw = self._load_judge(self.args.reward, "reward", "tmr")
        from .evaluation import generate_split, generation_metrics
        t0 = time.perf_counter()
        gen = generate_split(model, self.diffusion, self.data.test_batches, steps=self.args.eval_steps,
                             guidance_scale=self.args.eval_guidance, seed=self.args.seed)
        m = generation_metrics(gen, self.data.test_batches, ev, rw)
        out.update({f"test {k}": v for k, v in m.items()})
        out["test generation seconds"] = round(time.perf_counter() - t0, 1)
        return out

    def _load_judge(self, spec, bundled: str, kind: str):
        if spec == "none":
            return None
        try:
            c = ckpt_io.load_checkpoint(spec or bundled, kind)
            ckpt_io.check_normalization(c, self.data.mean, self.data.std, what=str(self.data.root))
            return c.model
        except (FileNotFoundError, ckpt_io.CheckpointError) as e:
            if spec:  # asked for explicitly: a real error
                raise
            print(f"[pretrain] no {bundled} for the final evaluation ({e})", file=sys.stderr)
            return None


class MDMTask(_DiffusionTask):
    kind = "mdm"

    def phases(self, model):
        def loss(m, b):
            return self.diffusion_loss(m, b["motion"], b["text_emb"], b["mask"]), {}
        return [Phase("train", self.args.steps, lambda: model.parameters(), loss)]

    def validate(self, model):
        g = torch.Generator().manual_seed(1234)
        model.eval()
        with torch.no_grad():
            losses = [self.diffusion_loss(model, b["motion"], b["text_emb"], b["mask"], g).item() * len(b["motion"])
                      for b in self.data.val_batches]
        return {"val loss": sum(losses) / len(self.data.val)}


class MLDTask(_DiffusionTask):
    kind = "mld"
    default_schedule = "scaled_linear"
    prediction = "eps"

    def _set_text_dim(self, d):
        d["denoiser"]["text_dim"] = self.data.text_dim

    def phases(self, model):
        def vae_loss(m, b):
            out = m.vae.vae_loss(b["motion"], b["mask"], kl_weight=self.args.kl_weight)
            return out["loss"], _scalars(out)

        def denoiser_loss(m, b):
            with torch.no_grad():
                z = m.encode(b["motion"], b["mask"])
            return self.diffusion_loss(m, z, b["text_emb"], None), {}

        return [Phase("vae", self.args.vae_steps, lambda: model.vae.parameters(), vae_loss),
                Phase("denoiser", self.args.steps, lambda: model.denoiser.parameters(), denoiser_loss)]

    def end_phase(self, model, phase):
        if phase.name != "vae":
            return
        model.eval()
        with torch.no_grad():  # the latent scale of LDM/MLD: diffusion runs on unit-variance latents
            zs = [model.vae.encode_dist(b["motion"], b["mask"])[0] for b in
                  MotionTextBatches(self.data.train, None, batch_size=64, drop_last=False).eval_batches(64)]
        model.set_latent_stats(torch.cat(zs))

    def validate(self, model):
        model.eval()
        g = torch.Generator().manual_seed(1234)
        rec, den, n = 0.0, 0.0, 0
        with torch.no_grad():
            for b in self.data.val_batches:
                x = model.vae.decode(model.vae.encode_dist(b["motion"], b["mask"])[0], b["mask"])
                m = b["mask"][..., None].float()
                rec += float((((x - b["motion"]) ** 2) * m).sum() / (m.sum() * x.shape[-1])) * len(x)
                z = model.encode(b["motion"], b["mask"])
                den += self.diffusion_loss(model, z, b["text_emb"], None, g).item() * len(x)
                n += len(x)
        return {"val recon mse": rec / n, "val loss": den / n}


TASKS = {"mdm": MDMTask, "mld": MLDTask, "reward": RewardTask, "evaluator": EvaluatorTask}


# ------------------------------------------------------------------------------------ loop
def _fingerprint(args) -> dict:
    return fingerprint(args, RESUME_FREE)


def _phase_at(phases: List[Phase], step: int):
    start = 0
    for i, ph in enumerate(phases):
        if step < start + ph.steps:
            return i, start
        start += ph.steps
    return len(phases), start


def run(args) -> Dict[str, float]:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    c = state = None
    last = out / "last"
    if args.resume:
        c, state = resume_state(last, _fingerprint(args), who="pretrain")

    torch.manual_seed(args.seed)
    data = Data(args, need_text=TASKS[args.model].need_text)
    task = TASKS[args.model](args, data)
    model = task.build()
    phases = task.phases(model)
    total = sum(ph.steps for ph in phases)
    step = 0
    if state is not None:
        model.load_state_dict(c.model.state_dict())
        step = int(state["step"])
    model.to(device)
    log = CsvLog(out / "log.csv", resume_step=step if state is not None else -1)
    history: Dict[str, float] = dict(state.get("last_val", {})) if state else {}

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=step, desc=f"pretrain {args.model}", disable=not args.progress,
               dynamic_ncols=True, file=sys.stdout)
    t_start = time.perf_counter()
    stop_at = step + args.stop_after if args.stop_after else None
    while step < total:
        pi, p_start = _phase_at(phases, step)
        ph = phases[pi]
        opt = make_adamw(ph.params(), lr=args.lr, weight_decay=args.weight_decay)
        sched = warmup_cosine(opt, ph.steps, min(args.warmup, ph.steps))
        if state is not None:
            if state.get("phase") == pi and step > p_start:  # resumed inside this phase
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
        state = None
        p_end = p_start + ph.steps
        while step < p_end:
            model.train()
            b = data.train_batches.batch(step)
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            loss, extras = ph.loss(model, b)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at step {step} (phase {ph.name}); the last good "
                    f"checkpoint is {last if (last / ckpt_io.CONFIG).is_file() else 'none'}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(ph.params(), args.grad_clip)
            opt.step()
            sched.step()
            step += 1
            row = {"step": step, "phase": ph.name, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                   "grad_norm": float(gnorm), **extras}
            if step % args.val_every == 0 or step == p_end:
                if step == p_end:
                    task.end_phase(model, ph)
                history = task.validate(model)
                row.update(history)
                bar.write(f"[{args.model}] step {step}/{total} " +
                          " ".join(f"{k}={v:.4g}" for k, v in history.items()))
            log.add(row)
            bar.set_postfix(loss=f"{loss.item():.4f}", phase=ph.name, refresh=False)
            bar.update(1)
            done = step == total
            if step % args.ckpt_every == 0 or done or (stop_at is not None and step >= stop_at):
                ts = {"step": step, "phase": pi, "optimizer": opt.state_dict(),
                      "scheduler": sched.state_dict(), "rng": rng_state(), "args": _fingerprint(args),
                      "last_val": history}
                log.flush()  # before the checkpoint: a resume keeps exactly the rows up to it
                ckpt_io.save_checkpoint(last, model, meta=_meta(args, task, step), mean=data.mean,
                                        std=data.std, train_state=ts)
            if stop_at is not None and step >= stop_at and not done:
                bar.close()
                print(f"[pretrain] stopped after step {step} (--stop-after); resume with --resume")
                return history
    bar.close()
    model.eval()
    final = task.final_eval(model) if args.final_eval else dict(history)
    final["train seconds"] = round(time.perf_counter() - t_start, 1)
    meta = _meta(args, task, step, final)
    ckpt_io.save_checkpoint(out / "model", model, meta=meta, mean=data.mean, std=data.std)
    if args.export:
        ckpt_io.save_checkpoint(Path(args.export), model, meta=meta, mean=data.mean, std=data.std)
    ckpt_io.atomic_write_text(out / "metrics.json", json.dumps(final, indent=1, sort_keys=True) + "\n")
    log.flush()
    print(f"[pretrain] {args.model}: {step} steps; final checkpoint {out / 'model'}"
          + (f" (exported to {args.export})" if args.export else ""))
    for k, v in final.items():
        print(f"  {k:32s} {v:.4f}" if isinstance(v, float) else f"  {k:32s} {v}")
    return final


def _meta(args, task, step, metrics=None) -> dict:
    m = {"made_by": command_line("sopo_ext.pretrain", args.argv), "seed": args.seed,
         "steps": step, "data": "builtin" if args.data in (None, "builtin") else str(args.data),
         "torch": torch.__version__}
    m.update(task.meta())
    if metrics:
        m["metrics"] = metrics
    return m


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sopo_ext.pretrain", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("--data", default="builtin", help="'builtin' (default) or a HumanML3D directory")
    ap.add_argument("--out", default=None, help="run directory (default runs/pretrain-<model>)")
    ap.add_argument("--export", default=None, help="also write the final checkpoint here")
    ap.add_argument("--steps", type=int, default=None, help="training steps (MLD: denoiser steps)")
    ap.add_argument("--vae-steps", type=int, default=None, help="MLD: VAE steps before the denoiser")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="MLD VAE KL weight (MLD: 1e-4)")
    ap.add_argument("--diffusion-steps", type=int, default=1000)
    ap.add_argument("--schedule", default=None, choices=("cosine", "scaled_linear", "linear"),
                    help="default: cosine (MDM), scaled_linear (MLD)")
    ap.add_argument("--max-len", type=int, default=196)
    ap.add_argument("--text-encoder", default="minilm", help="minilm (default) or hash")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model config overrides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, default=None)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true", help="continue from <out>/last")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--evaluator", default=None,
                    help="MDM/MLD final metrics: evaluator checkpoint (default: bundled; 'none' skips)")
    ap.add_argument("--reward", default=None, help="MDM/MLD final metrics: reward checkpoint (default: bundled)")
    ap.add_argument("--no-final-eval", dest="final_eval", action="store_false")
    ap.add_argument("--eval-steps", type=int, default=50, help="DDIM steps of the final evaluation")
    ap.add_argument("--eval-guidance", type=float, default=2.5, help="CFG scale of the final evaluation")
    return ap


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    d = DEFAULTS[args.model]
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.model != "mld":
        args.vae_steps = None
    if args.out is None:
        args.out = f"runs/pretrain-{args.model}"
    for k in ("steps", "batch_size", "val_every", "ckpt_every", "diffusion_steps", "max_len"):
        if getattr(args, k) < 1:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.model == "mld" and args.vae_steps < 1:
        raise SystemExit(f"error: --vae-steps must be >= 1, got {args.vae_steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise SystemExit(f"error: --lr must be positive, got {args.lr}")
    args.argv = argv
    return args


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
