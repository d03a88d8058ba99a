"""2-D sinusoidal positional encoding used as the normalizing flows' condition.

Feature vectors are modelled one position at a time; conditioning on (row, column) lets one flow per level learn
position-dependent normality (e.g. the border of an object differs from its centre), as in CFlow-AD and BGAD.
"""

from __future__ import annotations

import math

import torch

from bgad_core.errors import ConfigError


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Return a ``(dim, height, width)`` sin/cos encoding: first half encodes the column, second half the row.

    Args:
        dim: encoding channels; a multiple of 4 so that each axis gets paired sin/cos channels.
        height: rows of the feature grid.
        width: columns of the feature grid.
    """
    if dim % 4 != 0:
        raise ConfigError(f"pos_embed_dim must be a multiple of 4, got {dim}")
    half = dim // 2
    div_term = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    cols = torch.arange(0.0, width).unsqueeze(1) * div_term  # (W, half/2)
    rows = torch.arange(0.0, height).unsqueeze(1) * div_term  # (H, half/2)
    encoding = torch.zeros(dim, height, width)
    encoding[0:half:2] = torch.sin(cols).T.unsqueeze(1).expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(cols).T.unsqueeze(1).expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T.unsqueeze(2).expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows).T.unsqueeze(2).expand(-1, -1, width)
    return encoding
