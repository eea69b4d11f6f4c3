"""What every dlkern module says to TorchScript.

``torch.jit.script`` compiles a module's Python ``forward``; dlkern's forwards call Python-level autograd Functions and
launchers that TorchScript cannot compile, and a scripted stock twin would silently stop running dlkern's kernels. So
scripting a dlkern module (or a model holding one) raises a clear error instead. ``torch.jit.trace`` and
``torch.export`` work: they record the registered ``torch.ops.dlkern`` ops.
"""


class NotScriptable:
    """Mixin for dlkern modules: ``torch.jit.script`` raises an error naming the module and the alternatives.

    TorchScript calls ``__prepare_scriptable__`` on the scripted module and on every submodule before compiling.
    """

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"dlkern.nn.{type(self).__name__}: torch.jit.script is not supported by dlkern modules (their forward "
            "runs Python autograd Functions and Triton launchers). Use torch.jit.trace, torch.export or "
            "torch.compile instead, or script the stock torch.nn model."
        )
