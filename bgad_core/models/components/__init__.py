"""Parts every detector family shares: from a coarse score grid to an anomaly map at image resolution.

    >>> import torch
    >>> from bgad_core.models.components import gaussian_blur, upsample
    >>> gaussian_blur(upsample(torch.zeros(2, 4, 4), (32, 32)), sigma=4.0).shape
    torch.Size([2, 32, 32])
"""

from bgad_core.models.components.postprocess import gaussian_blur, upsample

__all__ = ["gaussian_blur", "upsample"]
