"""sopo_ext: fused ops and a drop-in loss for SoPo fine-tuning of text-to-motion diffusion models.

    import sopo_ext
    from sopo_ext import functional as SF   # reward_scores, min_cosine_similarity, sopo_loss
    from sopo_ext import reference          # the same math in plain PyTorch (source of truth)
    loss_fn = sopo_ext.SoPoLoss(tau=0.45)   # selection + loss, for existing trainers
    from sopo_ext import SoPoConfig, SoPoTrainer   # the whole fine-tuning run (python -m sopo_ext.train)
    summary = SoPoTrainer(SoPoConfig(steps=50)).train()
"""
from . import _ops  # noqa: F401  (registers fake kernels and autograd of the custom ops)
from . import functional, reference
from .functional import LossStats, RewardScores
from .dropin import DropInWarning, check_dropin
from .loss import SoPoLoss, SoPoSelection

__version__ = "0.1.0"

__all__ = ["functional", "reference", "SoPoLoss", "SoPoSelection", "RewardScores", "LossStats",
           "check_dropin", "DropInWarning", "SoPoConfig", "SoPoTrainer", "__version__"]

_LAZY = {"SoPoConfig": "config", "SoPoTrainer": "trainer"}


def __getattr__(name):
    # the trainer pulls in models, data and evaluation: imported on first use, so that
    # `import sopo_ext` for the loss alone stays light
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
