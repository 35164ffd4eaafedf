"""The one-shot GPU check: everything a first GPU run should establish, as one command.

    bash .ci/gpu                          # = python3 sopo_ext/gpu_check.py (report in $OUT or gpu_report/)
    bash .ci/gpu --dry-run                # the plan, on any machine
    bash .ci/gpu --only tests,train       # some steps

It runs as a script (not ``python -m``), so that nothing imports, and so compiles, the package
before the build step does.

For whoever has a machine with an NVIDIA GPU for a few minutes. It needs that machine's own torch
(2.11 or newer), a CUDA toolkit (nvcc) and no package registry: nothing is downloaded. Steps, each
with its own time limit; a failed step is reported and the next one still runs:

  env        the GPU, driver, torch, CUDA, nvcc, Python
  build      the ops against this torch, strict (spills and warnings are errors), for this GPU's
             architecture plus PTX: pip install --no-deps --no-build-isolation -e .
  tests      the CUDA tests (tests/test_cuda_ops.py, the CUDA-parametrized op suites, resources)
  bench      the CUDA benchmarks in quick mode (every benchmark body once)
  train      20 SoPo steps on MDM and on MLD on cuda, on tiny generated models and data
  graphs     CUDA-graph capture and replay of the loss (forward + backward), of a model step
             and of the whole fast sampling loop (MDM, MLD; with and without CFG)
  sanitizer  compute-sanitizer memcheck, racecheck and initcheck on a small workload of every op

It writes ``<out>/gpu_report.md`` (a table of steps, then each step's command and output tail)
and ``<out>/gpu_report.json``. Target: under 5 minutes on one H100 / H200 class machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["STEPS", "Step", "StepResult", "plan", "run_steps", "render_markdown", "main",
           "MIN_TORCH", "torch_supported"]

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script (bash .ci/gpu): import sopo_ext from the repository, and
    sys.path[0] = str(ROOT)  # only when a workload asks (importing it before the build compiles)
SELF = str(Path(__file__).resolve())
MIN_TORCH = (2, 11)
TAIL = 4000  # characters of each step's output kept in the report


@dataclass
class Step:
    name: str
    what: str
    commands: List[List[str]]
    timeout: int
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    what: str
    status: str  # ok | failed | timeout | skipped | planned
    seconds: float
    commands: List[str]
    returncodes: List[int]
    tail: str
    figures: Dict[str, object] = field(default_factory=dict)


def torch_supported(version: str) -> bool:
    """torch 2.11 or newer (the GPU machine has 2.11; the package is tested on 2.11 and 2.14)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= MIN_TORCH


def _py() -> List[str]:
    return [sys.executable]


def plan(out: Path, *, python: Optional[List[str]] = None, jobs: Optional[int] = None) -> List[Step]:
    """The steps, as commands run from the repository root."""
    py = python or _py()
    jobs = jobs or max(1, min(16, os.cpu_count() or 1))
    work = out / "work"
    san = ["compute-sanitizer", "--error-exitcode", "9", "--print-limit", "20"]
    small = [*py, SELF, "workload", "small"]
    train_common = ["--device", "cuda", "--steps", "20", "--batch-size", "8", "--k", "4",
                    "--sampling-steps", "4", "--evaluator", "none", "--no-animation", "--no-progress",
                    "--log-every", "5", "--data", str(work / "assets" / "data"),
                    "--reward", str(work / "assets" / "reward" / "model")]
    return [
        Step("env", "the GPU, driver, torch, CUDA, nvcc, Python",
             [["nvidia-smi"], [*py, SELF, "workload", "env"], ["nvcc", "--version"]], 60),
        Step("build", "the ops against this torch: strict CUDA build, sm_80 + sm_90 + compute_90 PTX",
             [[*py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
              [*py, SELF, "workload", "loaded"]], 420,
             env={"SOPO_EXT_STRICT_CUDA": "1", "MAX_JOBS": str(jobs)}),
        Step("tests", "the CUDA tests, the device-parametrized op suites, the kernels' resources",
             [[*py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
              [*py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_resources.py"]], 420),
        Step("bench", "the CUDA benchmarks, quick mode (each body once)",
             [[*py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_bench_cuda.py",
               "--benchmark-disable"]], 240),
        Step("train", "20 SoPo steps on MDM and on MLD on cuda (tiny generated models and data)",
             [[*py, SELF, "workload", "assets", str(work / "assets")],
              [*py, "-m", "sopo_ext.train", "--backbone", "mdm", "--base", str(work / "assets" / "mdm" / "model"),
               "--out", str(work / "train-mdm"), *train_common],
              [*py, "-m", "sopo_ext.train", "--backbone", "mld", "--base", str(work / "assets" / "mld" / "model"),
               "--out", str(work / "train-mld"), *train_common]], 420,
             env={"SOPO_EXT_CACHE": str(work / "cache")}),
        Step("graphs", "CUDA-graph capture and replay of the loss and of a model step",
             [[*py, SELF, "workload", "graphs"]], 180),
        Step("sanitizer", "compute-sanitizer memcheck, racecheck, initcheck on every op (small)",
             [[*san, "--tool", "memcheck", *small], [*san, "--tool", "racecheck", *small],
              [*san, "--tool", "initcheck", *small]], 420,
             env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
    ]


def _figures(name: str, text: str) -> Dict[str, object]:
    """A few numbers read off a step's output, for the report's table."""
    f: Dict[str, object] = {}
    m = re.search(r"(\d+) passed", text)
    if m:
        f["passed"] = int(m.group(1))
    m = re.search(r"(\d+) failed", text)
    if m:
        f["failed"] = int(m.group(1))
    m = re.search(r"(\d+) skipped", text)
    if m:
        f["skipped"] = int(m.group(1))
    if name == "train":
        f["runs"] = len(re.findall(r"\[train\] sopo on (?:mdm|mld): 20 steps", text))
    if name == "sanitizer":
        f["errors reported"] = sum(int(x) for x in re.findall(r"^=+ ERROR SUMMARY: (\d+) error", text, flags=re.M))
    if name in ("graphs", "env"):
        for k, v in re.findall(r"^gpu_check (\S+): (.+)$", text, flags=re.M):
            f[k] = v
    return f


def run_steps(steps: Sequence[Step], *, dry_run: bool = False, budget: Optional[float] = None,
              log=print) -> List[StepResult]:
    """Runs the steps in order from the repository root; never raises for a failing step."""
    results: List[StepResult] = []
    t_start = time.perf_counter()
    for st in steps:
        cmds = [shlex.join(c) for c in st.commands]
        if dry_run:
            results.append(StepResult(st.name, st.what, "planned", 0.0, cmds, [], ""))
            log(f"[gpu_check] {st.name}: would run " + " && ".join(cmds))
            continue
        left = None if budget is None else budget - (time.perf_counter() - t_start)
        if left is not None and left < 10:
            results.append(StepResult(st.name, st.what, "skipped", 0.0, cmds, [],
                                      f"skipped: the time budget ({budget:.0f} s) is spent"))
            log(f"[gpu_check] {st.name}: skipped (budget)")
            continue
        log(f"[gpu_check] {st.name}: {st.what}")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **st.env)
        t0, out, codes, status = time.perf_counter(), [], [], "ok"
        for c in st.commands:
            limit = st.timeout - (time.perf_counter() - t0)
            if left is not None:
                limit = min(limit, left - (time.perf_counter() - t0))
            if shutil.which(c[0]) is None and not os.path.isfile(c[0]):
                out.append(f"$ {shlex.join(c)}\n{c[0]}: not found\n")
                codes.append(127)
                status = "failed"
                continue
            try:
                p = subprocess.run(c, cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=max(1.0, limit))
                out.append(f"$ {shlex.join(c)}\n{p.stdout}{p.stderr}")
                codes.append(p.returncode)
                if p.returncode != 0:
                    status = "failed"
            except subprocess.TimeoutExpired as e:
                text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                out.append(f"$ {shlex.join(c)}\n{text}\n[timed out after {limit:.0f} s]\n")
                codes.append(124)
                status = "timeout"
                break
        text = "\n".join(out)
        results.append(StepResult(st.name, st.what, status, round(time.perf_counter() - t0, 1), cmds,
                                  codes, text[-TAIL:], _figures(st.name, text)))
        log(f"[gpu_check] {st.name}: {status} in {results[-1].seconds:.0f} s")
    return results


def render_markdown(results: Sequence[StepResult], header: Dict[str, str]) -> str:
    lines = ["# sopo_ext GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| step | status | seconds | figures | what |", "|---|---|---:|---|---|"]
    for r in results:
        figs = ", ".join(f"{k} {v}" for k, v in r.figures.items()) or ""
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {figs} | {r.what} |")
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", ""]
        lines += [f"    $ {c}" for c in r.commands]
        if r.tail:
            lines += ["", "```", r.tail.rstrip(), "```"]
    return "\n".join(lines) + "\n"


# ---- workloads (run by the steps, in their own processes) -------------------------------------
def _workload_env() -> None:
    import torch
    print(f"gpu_check torch: {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"gpu_check python: {platform.python_version()}")
    if not torch_supported(torch.__version__):
        raise SystemExit(f"gpu_check: torch {torch.__version__} is older than "
                         f"{'.'.join(map(str, MIN_TORCH))}; sopo_ext needs torch 2.11 or newer")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device")
    p = torch.cuda.get_device_properties(0)
    print(f"gpu_check gpu: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs")


def _workload_loaded() -> None:
    import torch
    import sopo_ext  # noqa: F401
    from sopo_ext import _library
    info = _library.load()
    print(f"gpu_check library: {info}")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sopo_ext::sopo_loss_forward", "CUDA"):
        raise SystemExit("gpu_check: the loaded library has no CUDA kernels")


def _workload_assets(root: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_configs import make_tiny_assets
    a = make_tiny_assets(Path(root))
    print(f"gpu_check assets: {a['root']}")


def _loss_inputs(B: int, N: int, dtype, device, seed: int = 0):
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs = [torch.randn(B, N, generator=g).to(dtype).to(device) for _ in range(6)]
    mask = (torch.rand(B, N, generator=g) > 0.2).to(device)
    mask[:, 0] = True
    kw = dict(beta_w=(1 + torch.rand(B, generator=g)).to(device), valuable=(torch.arange(B) % 2 == 0).to(device),
              mask_w=mask, mask_l=mask.flip(0))
    return xs, kw


def _workload_small() -> None:
    """Every op, forward and backward, fp32 and bf16, masked and not: for compute-sanitizer."""
    import torch
    import sopo_ext.functional as SF
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        for masked in (False, True):
            xs, kw = _loss_inputs(5, 1027, dtype, dev)
            if not masked:
                kw.pop("mask_w"), kw.pop("mask_l")
            pw, pl = xs[0].clone().requires_grad_(), xs[3].clone().requires_grad_()
            loss = SF.sopo_loss(pw, xs[1], xs[2], pl, xs[4], xs[5], **kw)
            loss.backward()
            w = torch.tensor([0.3, 1.7, 0.1, 2.0, 0.9], device=dev)
            pw2 = xs[0].clone().requires_grad_()
            (SF.sopo_loss(pw2, xs[1], xs[2], xs[3], xs[4], xs[5], reduction="none", **kw) * w).sum().backward()
        text, motion = torch.randn(5, 64, device=dev, dtype=dtype), torch.randn(5, 4, 64, device=dev, dtype=dtype)
        SF.reward_scores(text, motion, 0.45)
        SF.min_cosine_similarity(torch.randn(5, 300, device=dev, dtype=dtype),
                                 torch.randn(5, 4, 300, device=dev, dtype=dtype))
    torch.cuda.synchronize()
    print("gpu_check small: ok")


def _workload_graphs() -> None:
    """Capture the loss forward + backward, and a small denoiser's forward + loss + backward,
    into CUDA graphs; replay on new inputs; compare with eager."""
    import torch
    import sopo_ext.functional as SF
    dev = "cuda"
    xs, kw = _loss_inputs(16, 263 * 49, torch.float32, dev, seed=1)
    static = [x.clone() for x in xs]
    pw = static[0].clone().requires_grad_()
    pl = static[3].clone().requires_grad_()

    def loss_step():
        pw.grad = pl.grad = None
        loss = SF.sopo_loss(pw, static[1], static[2], pl, static[4], static[5], **kw)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            loss_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    pw.grad = pl.grad = None
    with torch.cuda.graph(graph):
        static_loss = SF.sopo_loss(pw, static[1], static[2], pl, static[4], static[5], **kw)
        static_loss.backward()
    new, _ = _loss_inputs(16, 263 * 49, torch.float32, dev, seed=2)
    with torch.no_grad():
        for s, n in zip(static, new):
            s.copy_(n)
        pw.copy_(new[0])
        pl.copy_(new[3])
    graph.replay()
    torch.cuda.synchronize()
    ew, el = new[0].clone().requires_grad_(), new[3].clone().requires_grad_()
    eager = SF.sopo_loss(ew, new[1], new[2], el, new[4], new[5], **kw)
    eager.backward()
    err = max((static_loss - eager).abs().item(), (pw.grad - ew.grad).abs().max().item(),
              (pl.grad - el.grad).abs().max().item())
    print(f"gpu_check loss graph: replay vs eager max abs diff {err:.3g}")
    if not err <= 1e-5 * max(1.0, eager.abs().item()):
        raise SystemExit("gpu_check: the captured loss differs from eager")

    from sopo_ext.checkpoint import load_checkpoint
    model = load_checkpoint("mdm", "mdm").model.to(dev).eval()
    ref = load_checkpoint("mdm", "mdm").model.to(dev).eval().requires_grad_(False)
    B, T = 8, 60
    d = model.config.text_dim
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(B, T, 263, generator=g).to(dev)
    t = torch.randint(0, 50, (B,), generator=g).to(dev)
    text = torch.randn(B, d, generator=g).to(dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    uncond = torch.zeros(B, dtype=torch.bool, device=dev)
    params = [p for p in model.parameters() if p.requires_grad]

    def model_step():
        for p in params:
            p.grad = None
        pw_, rw_ = model(x, t, text, mask, uncond), ref(x, t, text, mask, uncond)
        loss = SF.sopo_loss(pw_, rw_, x, pw_, rw_, x, beta_w=torch.ones(B, device=dev),
                            valuable=torch.zeros(B, dtype=torch.bool, device=dev), mask_w=mask[..., None],
                            mask_l=mask[..., None])
        loss.backward()
        return loss

    with torch.cuda.stream(side):
        for _ in range(3):
            model_step()
    torch.cuda.current_stream().wait_stream(side)
    eager_loss = model_step().detach().clone()
    eager_grads = [p.grad.clone() for p in params]
    graph2 = torch.cuda.CUDAGraph()
    for p in params:
        p.grad = None
    with torch.cuda.graph(graph2):
        captured = model_step()
    graph2.replay()
    torch.cuda.synchronize()
    gerr = max((p.grad - e).abs().max().item() for p, e in zip(params, eager_grads))
    print(f"gpu_check model graph: replay vs eager loss diff {(captured - eager_loss).abs().item():.3g}, "
          f"max grad diff {gerr:.3g}")
    _sampling_graphs(side)


def _sampling_graphs(side) -> None:
    """The fast sampling loop (issue 17) of the bundled MDM and MLD, 8 DDIM steps, without and
    with CFG, captured whole as one CUDA graph: replay on a new x_T vs the eager fast loop and
    the plain loop, and replay vs eager wall time."""
    import time

    import torch
    from sopo_ext.checkpoint import load_checkpoint
    from sopo_ext.sampling import diffusion_from_meta
    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(4)
    for kind in ("mdm", "mld"):
        c = load_checkpoint(kind, kind)
        model = c.model.to(dev).eval()
        diffusion = diffusion_from_meta(c.meta)
        rows, T = 64, 196
        text_dim = model.config.text_dim if kind == "mdm" else model.denoiser.config.text_dim
        text = torch.randn(rows, text_dim, generator=g).to(dev)
        lengths = torch.randint(40, T + 1, (rows,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).to(dev) if kind == "mdm" else None
        shape = (rows, T, 263) if kind == "mdm" else (rows,) + tuple(model.latent_shape)
        for scale in (1.0, 2.5):
            x_T = torch.randn(shape, generator=g).to(dev)

            def loop(fast=True):
                return diffusion.sample(model, x_T, text, mask, steps=8, sampler="ddim",
                                        guidance_scale=scale, fast=fast)
            with torch.cuda.stream(side):
                for _ in range(2):
                    loop()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = loop()
            x_T.copy_(torch.randn(shape, generator=g).to(dev))
            graph.replay()
            eager, plain = loop(), loop(fast=False)
            torch.cuda.synchronize()
            scale_ref = plain.abs().max().item()
            e_graph = (captured - eager).abs().max().item() / scale_ref
            e_plain = (eager - plain).abs().max().item() / scale_ref
            times = {}
            for name, fn in (("eager", loop), ("graph", graph.replay)):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
                times[name] = (time.perf_counter() - t0) / 10
            print(f"gpu_check sampling graph: {kind}, CFG {scale}, {rows} x {T}, 8 DDIM steps: "
                  f"replay vs eager fast loop {e_graph:.3g}, fast vs plain loop {e_plain:.3g} "
                  f"(relative to the largest value); eager {times['eager'] * 1e3:.2f} ms, "
                  f"graph replay {times['graph'] * 1e3:.2f} ms "
                  f"({times['eager'] / times['graph']:.2f}x)")
            if not (e_graph <= 1e-4 and e_plain <= 1e-4):
                raise SystemExit("gpu_check: the captured or fast sampling loop differs from the plain loop")


WORKLOADS = {"env": _workload_env, "loaded": _workload_loaded, "small": _workload_small,
             "graphs": _workload_graphs}


# ---- CLI ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bash .ci/gpu", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_report",
                    help="report directory (default $OUT, else gpu_report)")
    ap.add_argument("--only", default=None, help="comma-separated steps (default all: "
                    + ",".join(s.name for s in plan(Path("x"))) + ")")
    ap.add_argument("--dry-run", action="store_true", help="write the plan, run nothing")
    ap.add_argument("--budget", type=float, default=None, help="seconds; later steps are skipped when spent")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: cores, max 16)")
    args = ap.parse_args(argv)
    names = [s.name for s in plan(Path(args.out))]
    if args.only:
        args.only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"--only: unknown step(s) {unknown}; the steps are {', '.join(names)}")
    if args.budget is not None and not args.budget > 0:
        ap.error(f"--budget must be positive, got {args.budget}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["workload"]:
        if len(argv) < 2 or argv[1] not in (*WORKLOADS, "assets"):
            print(f"usage: gpu_check.py workload {{{','.join([*WORKLOADS, 'assets'])}}}",
                  file=sys.stderr)
            return 2
        if argv[1] == "assets":
            _workload_assets(argv[2] if len(argv) > 2 else "gpu_assets")
        else:
            WORKLOADS[argv[1]]()
        return 0
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(out.resolve(), jobs=args.jobs)
    if args.only:
        steps = [s for s in steps if s.name in args.only]
    t0 = time.perf_counter()
    results = run_steps(steps, dry_run=args.dry_run, budget=args.budget)
    header = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
              "python": platform.python_version(), "total seconds": f"{time.perf_counter() - t0:.1f}",
              "mode": "dry run (nothing executed)" if args.dry_run else "executed"}
    (out / "gpu_report.md").write_text(render_markdown(results, header))
    (out / "gpu_report.json").write_text(json.dumps({"header": header, "steps": [asdict(r) for r in results]},
                                                    indent=1) + "\n")
    print(f"[gpu_check] report: {out / 'gpu_report.md'}")
    bad = [r.name for r in results if r.status not in ("ok", "planned")]
    if bad:
        print(f"[gpu_check] not ok: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
