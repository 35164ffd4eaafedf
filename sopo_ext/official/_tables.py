"""The sinusoid table the released MDM and TMR share (ACTOR's ``PositionalEncoding``), computed
the way they compute it so that float32 rounding matches theirs."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["sinusoid_table"]


def sinusoid_table(max_len: int, d_model: int) -> torch.Tensor:
    """``pe [max_len, 1, d_model]``: sin on even, cos on odd channels, wavelengths up to 10000."""
    pe = torch.zeros(max_len, d_model)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-np.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0).transpose(0, 1)
