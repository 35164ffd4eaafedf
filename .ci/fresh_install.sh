#!/usr/bin/env bash
# The README's set-up on a fresh venv, as a new user runs it (pip's default build isolation):
#   pip install torch==2.14.1 && pip install -e .   then python -m sopo_ext.train (short)
#   pip install .  (a wheel: the ops compile on first import from the sources it ships)
# Usage: bash .ci/fresh_install.sh              a new venv (thrown away), torch installed into it
#        bash .ci/fresh_install.sh --use VENV   a venv that has torch and nothing else yet (CI's,
#                                               which then goes on to the ahead-of-time build)
# About 6 minutes on 2 cores (4.5 with --use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
USE_VENV=""
if [ "${1:-}" = "--use" ]; then USE_VENV=$(cd "$2" && pwd); fi
# a copy of the source tree without build outputs (no in-tree sopo_ext/_C*.so from another build)
ROOT="$WORK/src"
mkdir -p "$ROOT"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$ROOT"
cd "$ROOT"

export PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1
t() { date +%s; }
t0=$(t)
if [ -n "$USE_VENV" ]; then
  VENV=$USE_VENV
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  if python -m pip show -q sopo_ext 2>/dev/null; then echo "error: $VENV already has sopo_ext" >&2; exit 1; fi
else
  VENV="$WORK/venv"
  python3 -m venv --clear "$VENV"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  python -m pip install -q torch==2.14.1
fi
t1=$(t); echo "fresh venv: pip install torch==2.14.1: $((t1 - t0)) s"

# ---- 1. pip install -e . (build isolation hides torch: nothing is compiled at install)
python -m pip install -q -e .
t2=$(t); echo "fresh venv: pip install -e .: $((t2 - t1)) s"
export SOPO_EXT_CACHE="$WORK/cache-editable"
python -m sopo_ext.train --steps 2 --batch-size 4 --k 2 --sampling-steps 2 --eval-samples 32 \
  --eval-steps 2 --no-animation --no-progress --out "$WORK/run"
python - "$WORK/run" <<'PY'
import json, sys
from pathlib import Path
from sopo_ext import _library
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
assert summary["steps"] == 2 and summary["after"]["R-precision top1"] >= 0, summary
assert _library.loaded["source"] == "jit", _library.loaded
print(f"fresh venv: editable install trained 2 steps; ops {_library.loaded}")
PY
t3=$(t); echo "fresh venv: first import (compile) + short train: $((t3 - t2)) s"

# ---- 2. pip install . (a wheel): run from outside the repository, ops compiled from the wheel
python -m pip uninstall -q -y sopo_ext
python -m pip install -q .
t4=$(t); echo "fresh venv: pip install .: $((t4 - t3)) s"
export SOPO_EXT_CACHE="$WORK/cache-wheel"
(cd "$WORK" && python - "$ROOT/csrc" <<'PY'
import filecmp, sys
from pathlib import Path
import torch
import sopo_ext
from sopo_ext import _library, functional as SF, reference as R
pkg = Path(sopo_ext.__file__).parent
assert "site-packages" in str(pkg), pkg  # the installed copy, not the repository
assert _library.loaded["source"] == "jit" and str(pkg / "_csrc") == str(_library.csrc_dir()), _library.loaded
repo = Path(sys.argv[1])
files = sorted(p.relative_to(repo) for p in repo.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh"))
same, diff, missing = filecmp.cmpfiles(repo, pkg / "_csrc", [str(f) for f in files], shallow=False)
assert not diff and not missing and len(same) == len(files), (diff, missing)
g = torch.Generator().manual_seed(0)
te, me = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
for a, b in zip(SF.reward_scores(te, me, 0.4), R.reward_scores(te, me, 0.4)):
    assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b), (a, b)
torch.testing.assert_close(SF.min_cosine_similarity(te, me), R.min_cosine_similarity(te, me))
print(f"fresh venv: wheel ships {len(files)} source files; ops compiled from them match the reference")
PY
)
t5=$(t); echo "fresh venv: first import of the wheel (compile) + checks: $((t5 - t4)) s"
du -sh "$VENV" | sed 's/^/fresh venv: disk /'
python -m pip uninstall -q -y sopo_ext  # leave the venv as it was, plus the dependencies
