"""SoPo fine-tuning from Python: python examples/train_with_api.py [OUT_DIR]"""
import sys

from sopo_ext import SoPoConfig, SoPoTrainer

config = SoPoConfig(method="sopo", backbone="mdm", steps=50, tau=0.45, eval_samples=64,
                    out=sys.argv[1] if len(sys.argv) > 1 else "runs/api-example")
summary = SoPoTrainer(config).train()  # the same run as: python -m sopo_ext.train --steps 50 ...
before, after = summary["before"], summary["after"]
print(f"R-precision top1 {before['R-precision top1']:.3f} -> {after['R-precision top1']:.3f}")
