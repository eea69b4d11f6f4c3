"""dlkern: hand-written GPU kernels for classic CNN building blocks, as drop-in ``torch.nn`` pieces.

``dlkern.functional`` mirrors ``torch.nn.functional``, ``dlkern.nn`` mirrors ``torch.nn``; ``dlkern.convert(model)``
swaps the stock pieces of an existing model for dlkern's; ``dlkern.models`` holds the seed's MNIST CNN and
``python -m dlkern.train`` trains it.
"""

from dlkern._extension import build_info
from dlkern import functional, nn
from dlkern.convert import convert  # the function; its module stays importable as sys.modules["dlkern.convert"]
from dlkern import models

__version__ = "0.1.0"
__all__ = ["build_info", "functional", "nn", "convert", "models"]
