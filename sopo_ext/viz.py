"""Motion pictures of 22-joint T2M (HumanML3D) motions: GIF animations and PNG key-frame strips.

Needs ``matplotlib`` (Agg backend, no display) and ``pillow``. Input is a motion as joint
positions ``[T, 22, 3]`` (or ``[T, 66]``) or 263-d features ``[T, 263]`` (optionally normalized:
pass ``mean`` / ``std`` to undo it), numpy or torch; features are turned into joints by
``sopo_ext.data.skeleton.joints_from_features``.

Data coordinates are metres with y up, the body's left at +x; they are drawn with a proper
rotation (no mirroring): plot X = -x, plot Y = z, plot Z = y (up), so the figure stands upright
and its left and right sides are not swapped.

Functions: ``to_joints``, ``save_gif``, ``save_strip``, ``save_comparison``; the command line::

    python -m sopo_ext.viz INPUT.npy --out OUT.gif|OUT.png [--caption TEXT]
        [--mean Mean.npy --std Std.npy] [--compare OTHER.npy ... --labels A B ...]
"""
from __future__ import annotations

import argparse
import os
import textwrap
from typing import Optional, Sequence

import numpy as np

__all__ = ["to_joints", "save_gif", "save_strip", "save_comparison", "CHAIN_COLORS", "main"]

NUM_JOINTS = 22
FEATURE_DIM = 263

#: colours of ``KINEMATIC_CHAIN``: right leg, left leg, spine-head, right arm, left arm
#: (legs red, spine dark grey, arms blue; the right side is the darker shade).
CHAIN_COLORS = ("#c0392b", "#f1948a", "#34495e", "#1f5fa8", "#85b7e8")
_TRACE_COLOR = "#e67e22"


def _mpl_at_least(major: int, minor: int) -> bool:
    try:
        import matplotlib
        v = tuple(int(x) for x in matplotlib.__version__.split(".")[:2])
        return v >= (major, minor)
    except Exception:  # pragma: no cover
        return False


#: clipping 3D artists to the axes box (``axlim_clip``) is matplotlib >= 3.10.
_HAS_AXLIM_CLIP = _mpl_at_least(3, 10)


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------
def _as_numpy(x, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} must be an array, got None")
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu")
            if x.is_complex():
                raise ValueError(f"{name} must be real, got dtype {x.dtype}")
            x = x.to(torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name} could not be converted to an array: {e}") from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating)
                                 or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a.astype(np.float64)


def to_joints(motion, mean=None, std=None, name: str = "motion") -> np.ndarray:
    """Joint positions ``[T, 22, 3]`` (float64 numpy) from ``motion``: joints ``[T, 22, 3]`` or
    ``[T, 66]``, or features ``[T, 263]`` (denormalized as ``f * std + mean`` when ``mean`` and
    ``std`` are given). Leading singleton dims are dropped. Raises ``ValueError`` naming
    ``name`` (or ``mean`` / ``std``) on a wrong shape, no frames, or non-finite values."""
    a = _as_numpy(motion, name)
    while a.ndim > 2 and a.shape[0] == 1 and not (a.ndim == 3 and a.shape[1:] == (NUM_JOINTS, 3)):
        a = a[0]
    if a.ndim == 3 and a.shape[1:] == (NUM_JOINTS, 3):
        kind = "joints"
    elif a.ndim == 2 and a.shape[1] == FEATURE_DIM:
        kind = "features"
    elif a.ndim == 2 and a.shape[1] == 3 * NUM_JOINTS:
        kind = "joints"
        a = a.reshape(a.shape[0], NUM_JOINTS, 3)
    else:
        raise ValueError(f"{name} must have shape [T, 22, 3], [T, 66] (joints) or [T, 263] "
                         f"(features), got {list(a.shape)}")
    if a.shape[0] < 1:
        raise ValueError(f"{name} must have at least one frame, got {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together")
    if mean is not None:
        if kind != "features":
            raise ValueError(f"mean/std apply to features [T, 263] only; {name} has shape "
                             f"{list(a.shape)} (joints)")
        m = _as_numpy(mean, "mean")
        s = _as_numpy(std, "std")
        if m.size != FEATURE_DIM:
            raise ValueError(f"mean must have {FEATURE_DIM} values, got shape {list(m.shape)}")
        if s.size != FEATURE_DIM:
            raise ValueError(f"std must have {FEATURE_DIM} values, got shape {list(s.shape)}")
        m, s = m.reshape(-1), s.reshape(-1)
        if not np.isfinite(m).all():
            raise ValueError("mean contains NaN or infinite values")
        if not np.isfinite(s).all():
            raise ValueError("std contains NaN or infinite values")
        a = a * s + m
    if kind == "features":
        import torch
        from sopo_ext.data.skeleton import joints_from_features
        a = joints_from_features(torch.from_numpy(np.ascontiguousarray(a))).numpy()
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: the features give non-finite joint positions")
    return a


def _check_common(caption, fps=None, stride=None, num_frames=None):
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"caption must be a str or None, got {type(caption).__name__}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                            or not np.isfinite(fps) or fps <= 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, (int, np.integer))
                               or stride < 1):
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if num_frames is not None and (isinstance(num_frames, bool)
                                   or not isinstance(num_frames, (int, np.integer))
                                   or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")


def _check_path(path, name="path") -> str:
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise ValueError(f"{name} must be a non-empty str or path, got {path!r}")
    return os.fspath(path)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def _plot_coords(j: np.ndarray) -> np.ndarray:
    """data (x, y up, z) -> plot (X, Y, Z up) = (-x, z, y): a rotation, not a mirror."""
    return np.stack([-j[..., 0], j[..., 2], j[..., 1]], axis=-1)


def _limits(motions_plot: Sequence[np.ndarray], margin: float = 0.3):
    """Cubic axis limits (equal aspect) covering every frame of every motion (plot coords)."""
    lo = np.min([m.reshape(-1, 3).min(0) for m in motions_plot], axis=0)
    hi = np.max([m.reshape(-1, 3).max(0) for m in motions_plot], axis=0)
    lo[2] = min(lo[2], 0.0)
    center = (lo + hi) / 2
    half = max(float((hi[:2] - lo[:2]).max()) / 2 + margin, 0.8)
    xl = (center[0] - half, center[0] + half)
    yl = (center[1] - half, center[1] + half)
    zl = (lo[2], max(hi[2] + 0.1, lo[2] + 1.9))
    return xl, yl, zl


def _floor_level(motions_plot) -> float:
    return float(min(m[..., 2].min() for m in motions_plot))


class _Panel:
    """One 3D axes showing one motion; artists are created once and updated per frame."""

    def __init__(self, ax, joints_plot: np.ndarray, limits, floor: float, title: Optional[str],
                 follow_radius: Optional[float] = None, elev: float = 20.0, azim: float = 60.0):
        from sopo_ext.data.skeleton import KINEMATIC_CHAIN
        self.ax, self.j, self.floor = ax, joints_plot, floor
        self.chains = [list(c) for c in KINEMATIC_CHAIN]
        self.follow_radius = follow_radius
        xl, yl, zl = limits
        ax.set_xlim(*xl)
        ax.set_ylim(*yl)
        ax.set_zlim(*zl)
        # equal scale on all three axes (the box is as tall as the motion, not cubic)
        rx = xl[1] - xl[0] if follow_radius is None else 2 * follow_radius
        ax.set_box_aspect((rx, rx, zl[1] - zl[0]), zoom=1.25)
        ax.view_init(elev=elev, azim=azim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.pane.set_alpha(0.0)
            axis.line.set_alpha(0.0)
        ax.grid(False)
        if title:
            ax.set_title(title, fontsize=9)
        # with a following camera, clip the floor and traces to the moving axis box
        self._clip = {"axlim_clip": True} if follow_radius is not None and _HAS_AXLIM_CLIP else {}
        self._draw_floor(xl, yl)
        root = joints_plot[:, 0]
        # full trajectory (faint) and the trace up to the current frame (on the floor)
        ax.plot(root[:, 0], root[:, 1], np.full(len(root), floor), color=_TRACE_COLOR,
                alpha=0.25, lw=1.0, **self._clip)
        self.trace, = ax.plot([], [], [], color=_TRACE_COLOR, lw=1.8, **self._clip)
        self.lines = [ax.plot([], [], [], color=c, lw=2.5, marker="o", markersize=2.5,
                              solid_capstyle="round")[0] for c in CHAIN_COLORS]
        self.shadow = [ax.plot([], [], [], color="#555555", alpha=0.25, lw=2.0)[0]
                       for _ in CHAIN_COLORS]

    def _draw_floor(self, xl, yl, n: int = 8):
        from mpl_toolkits.mplot3d.art3d import Poly3DCollection, Line3DCollection
        z = self.floor
        if self.follow_radius is None:
            verts = [[(xl[0], yl[0], z), (xl[1], yl[0], z), (xl[1], yl[1], z), (xl[0], yl[1], z)]]
            self.ax.add_collection3d(Poly3DCollection(verts, facecolor="#dddddd", alpha=0.35,
                                                      edgecolor="none"))
            xs, ys = np.linspace(xl[0], xl[1], n + 1), np.linspace(yl[0], yl[1], n + 1)
            segs = [[(x, yl[0], z), (x, yl[1], z)] for x in xs]
            segs += [[(xl[0], y, z), (xl[1], y, z)] for y in ys]
        else:
            # short 0.25 m pieces so that clipping to the moving window keeps the visible ones
            h = self.follow_radius
            step = 0.25
            xs = np.arange(np.floor((xl[0] - h) / step), np.ceil((xl[1] + h) / step) + 1) * step
            ys = np.arange(np.floor((yl[0] - h) / step), np.ceil((yl[1] + h) / step) + 1) * step
            segs = [[(x, a, z), (x, b, z)] for x in xs for a, b in zip(ys[:-1], ys[1:])]
            segs += [[(a, y, z), (b, y, z)] for y in ys for a, b in zip(xs[:-1], xs[1:])]
        self.ax.add_collection3d(Line3DCollection(segs, colors="#aaaaaa", linewidths=0.5,
                                                  alpha=0.6, **self._clip))

    def set_frame(self, t: int, trace: bool = True):
        t = min(t, len(self.j) - 1)
        p = self.j[t]
        for line, shadow, chain in zip(self.lines, self.shadow, self.chains):
            c = p[chain]
            line.set_data_3d(c[:, 0], c[:, 1], c[:, 2])
            shadow.set_data_3d(c[:, 0], c[:, 1], np.full(len(c), self.floor))
        if trace:
            r = self.j[: t + 1, 0]
            self.trace.set_data_3d(r[:, 0], r[:, 1], np.full(len(r), self.floor))
        if self.follow_radius is not None:
            h = self.follow_radius
            self.ax.set_xlim(p[0, 0] - h, p[0, 0] + h)
            self.ax.set_ylim(p[0, 1] - h, p[0, 1] + h)


def _new_figure(ncols: int, nrows: int = 1, panel_size: float = 3.2, caption=None,
                panel_title_lines: int = 0):
    # no pyplot: a bare Figure on an Agg canvas needs no display and leaves the user's backend
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    w = panel_size * ncols
    # about 11 characters per inch at 10 pt
    lines = textwrap.wrap(caption, max(20, int(w * 11))) if caption else []
    cap_inch = 0.2 * len(lines) + (0.1 if lines else 0.0)
    title_inch = 0.17 * panel_title_lines
    h = panel_size * nrows + cap_inch + title_inch
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10, y=1 - 0.04 / h, va="top")
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=1 - (cap_inch + title_inch) / h,
                        wspace=0.0, hspace=title_inch / panel_size + 0.02)
    return fig


def _prepare(motions, mean, std, names):
    js = [to_joints(m, mean, std, name=n) for m, n in zip(motions, names)]
    jp = [_plot_coords(j) for j in js]
    return js, jp


def _even_dims(fig, dpi):
    """Round the pixel size to even numbers (friendlier to video tools)."""
    w, h = fig.get_size_inches()
    fig.set_size_inches(round(w * dpi / 2) * 2 / dpi, round(h * dpi / 2) * 2 / dpi)


def _write_gif(fig, panels, num_t: int, path: str, fps: float, stride: int, dpi: int,
               counter=None):
    from matplotlib.animation import PillowWriter
    frames = list(range(0, num_t, stride))
    writer = PillowWriter(fps=fps / stride)
    with writer.saving(fig, path, dpi):
        for t in frames:
            for p in panels:
                p.set_frame(t)
            if counter is not None:
                counter.set_text(f"{t + 1}/{num_t}")
            writer.grab_frame()
    return len(frames)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def save_gif(motion, path, caption: Optional[str] = None, fps: float = 20, *, stride: int = 1,
             mean=None, std=None, follow: bool = False, dpi: int = 80,
             elev: float = 20.0, azim: float = 60.0) -> str:
    """Animated GIF of one motion: a 3D stick figure (legs red, spine grey, arms blue; right
    side darker) over a floor grid with its shadow, the root trajectory traced on the floor,
    and ``caption`` (wrapped) as the title. Plays in real time: every ``stride``-th frame at
    ``fps / stride`` frames per second; ``ceil(T / stride)`` GIF frames (a frame counter in the
    corner keeps every frame distinct). The axes cover the whole trajectory; ``follow=True``
    instead keeps a 3 m window centred on the root. Returns the path."""
    _check_common(caption, fps, stride)
    path = _check_path(path)
    js, jp = _prepare([motion], mean, std, ["motion"])
    fig = _new_figure(1, caption=caption)
    _even_dims(fig, dpi)
    lim = _limits(jp)
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    panel = _Panel(ax, jp[0], lim, _floor_level(jp), None, 1.5 if follow else None, elev, azim)
    counter = fig.text(0.98, 0.02, "", ha="right", va="bottom", fontsize=7, color="#666666")
    _write_gif(fig, [panel], len(jp[0]), path, fps, stride, dpi, counter)
    return path


def _key_frames(num_t: int, n: int) -> list:
    n = min(n, num_t)
    return [int(round(x)) for x in np.linspace(0, num_t - 1, n)]


def save_strip(motion, path, caption: Optional[str] = None, num_frames: int = 6, *,
               mean=None, std=None, follow: bool = False, dpi: int = 80,
               elev: float = 20.0, azim: float = 60.0) -> str:
    """PNG strip of ``num_frames`` key frames (evenly spaced, first and last included; at most
    T) side by side, each titled with its frame index and time, same axis limits in all panels
    (the whole trajectory, or a window on the root with ``follow=True``), the trajectory traced
    up to each key frame. Returns the path."""
    _check_common(caption, num_frames=num_frames)
    path = _check_path(path)
    js, jp = _prepare([motion], mean, std, ["motion"])
    _grid(fig_rows=[jp[0]], row_labels=None, path=path, caption=caption, num_frames=num_frames,
          follow=follow, dpi=dpi, elev=elev, azim=azim)
    return path


def _grid(fig_rows, row_labels, path, caption, num_frames, follow, dpi, elev, azim):
    num_t = max(len(j) for j in fig_rows)
    keys = _key_frames(num_t, num_frames)
    fig = _new_figure(len(keys), len(fig_rows), panel_size=2.6, caption=caption,
                      panel_title_lines=1 if row_labels is None else 2)
    lim = _limits(fig_rows)
    floor = _floor_level(fig_rows)
    for r, jpl in enumerate(fig_rows):
        for c, t in enumerate(keys):
            ax = fig.add_subplot(len(fig_rows), len(keys), r * len(keys) + c + 1, projection="3d")
            tt = min(t, len(jpl) - 1)
            title = f"frame {tt} ({tt / 20:.1f} s)"
            if row_labels is not None and c == 0:
                title = f"{row_labels[r]}\n{title}"
            panel = _Panel(ax, jpl, lim, floor, title, 1.5 if follow else None, elev, azim)
            panel.set_frame(t)
    _even_dims(fig, dpi)
    fig.savefig(path, dpi=dpi, format="png")


def save_comparison(motions: Sequence, labels: Optional[Sequence[str]], path,
                    caption: Optional[str] = None, gif: bool = True, *, fps: float = 20,
                    stride: int = 1, num_frames: int = 6, mean=None, std=None,
                    follow: bool = False, dpi: int = 80, elev: float = 20.0,
                    azim: float = 60.0) -> str:
    """Several motions side by side with the same axis limits (e.g. base model vs. SoPo
    fine-tune on one caption), each panel titled with its label, ``caption`` as the figure
    title. ``gif=True``: one animated GIF (``ceil(max T / stride)`` frames; shorter motions hold
    their last pose). ``gif=False``: a PNG grid, one row per motion, ``num_frames`` key frames
    per row. ``mean`` / ``std`` apply to every motion given as features. Returns the path."""
    _check_common(caption, fps, stride, num_frames)
    path = _check_path(path)
    if isinstance(motions, (str, bytes)) or not isinstance(motions, (list, tuple)):
        raise ValueError(f"motions must be a list or tuple of motions, got "
                         f"{type(motions).__name__}")
    if len(motions) < 1:
        raise ValueError("motions must contain at least one motion")
    if labels is None:
        labels = [f"motion {i}" for i in range(len(motions))]
    if isinstance(labels, str) or len(labels) != len(motions):
        raise ValueError(f"labels must be a sequence of {len(motions)} strings, got {labels!r}")
    labels = [str(x) for x in labels]
    js, jp = _prepare(motions, mean, std, [f"motions[{i}]" for i in range(len(motions))])
    if not gif:
        _grid(fig_rows=jp, row_labels=labels, path=path, caption=caption,
              num_frames=num_frames, follow=follow, dpi=dpi, elev=elev, azim=azim)
        return path
    fig = _new_figure(len(jp), caption=caption, panel_title_lines=1)
    _even_dims(fig, dpi)
    lim = _limits(jp)
    floor = _floor_level(jp)
    panels = []
    for i, (j, lab) in enumerate(zip(jp, labels)):
        ax = fig.add_subplot(1, len(jp), i + 1, projection="3d")
        panels.append(_Panel(ax, j, lim, floor, lab, 1.5 if follow else None, elev, azim))
    counter = fig.text(0.99, 0.02, "", ha="right", va="bottom", fontsize=7, color="#666666")
    _write_gif(fig, panels, max(len(j) for j in jp), path, fps, stride, dpi, counter)
    return path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _load(path: str, name: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file {path!r}")
    return np.load(path, allow_pickle=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sopo_ext.viz",
        description="Render a T2M motion (.npy joints [T,22,3] or features [T,263]) as an "
                    "animated GIF (--out X.gif) or a PNG key-frame strip (--out X.png).")
    p.add_argument("input", help="motion .npy: joints [T,22,3] / [T,66] or features [T,263]")
    p.add_argument("--out", required=True, help="output path ending in .gif or .png")
    p.add_argument("--caption", default=None, help="title text (wrapped)")
    p.add_argument("--mean", default=None, help="Mean.npy to denormalize features")
    p.add_argument("--std", default=None, help="Std.npy to denormalize features")
    p.add_argument("--compare", nargs="+", default=None, metavar="OTHER.npy",
                   help="more motions to show side by side with INPUT")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one label per motion (INPUT first) for --compare")
    p.add_argument("--fps", type=float, default=20.0)
    p.add_argument("--stride", type=int, default=1, help="render every stride-th frame (GIF)")
    p.add_argument("--num-frames", type=int, default=6, help="key frames in a PNG strip")
    p.add_argument("--follow", action="store_true", help="camera window follows the root")
    p.add_argument("--dpi", type=int, default=80)
    a = p.parse_args(argv)
    ext = os.path.splitext(a.out)[1].lower()
    if ext not in (".gif", ".png"):
        p.error(f"--out must end in .gif or .png, got {a.out!r}")
    if (a.mean is None) != (a.std is None):
        p.error("--mean and --std must be given together")
    try:
        mean = _load(a.mean, "--mean") if a.mean else None
        std = _load(a.std, "--std") if a.std else None
        motion = _load(a.input, "input")
        kw = dict(mean=mean, std=std, follow=a.follow, dpi=a.dpi)
        if a.compare:
            motions = [motion] + [_load(f, "--compare") for f in a.compare]
            labels = a.labels or [os.path.splitext(os.path.basename(f))[0]
                                  for f in [a.input] + a.compare]
            save_comparison(motions, labels, a.out, a.caption, gif=(ext == ".gif"), fps=a.fps,
                            stride=a.stride, num_frames=a.num_frames, **kw)
        elif ext == ".gif":
            save_gif(motion, a.out, a.caption, a.fps, stride=a.stride, **kw)
        else:
            save_strip(motion, a.out, a.caption, a.num_frames, **kw)
    except ValueError as e:
        p.error(str(e))
    print(a.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
