"""dlkern: hand-written GPU kernels for classic CNN building blocks, as drop-in ``torch.nn`` pieces.

``dlkern.functional`` mirrors ``torch.nn.functional``, ``dlkern.nn`` mirrors ``torch.nn``.
"""

from dlkern._extension import build_info
from dlkern import functional, nn

__version__ = "0.1.0"
__all__ = ["build_info", "functional", "nn"]
