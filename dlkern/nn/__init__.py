"""dlkern's modules: drop-in twins of their ``torch.nn`` namesakes (same constructor arguments, repr, parameters
and state_dict keys -- they subclass them), running dlkern's kernels."""

from dlkern.nn.pooling import MaxPool2d

__all__ = ["MaxPool2d"]
