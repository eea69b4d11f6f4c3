"""What differs between the torch and Triton releases dlkern supports, adapted to in one place.

The supported range (README, "Supported versions"; setup.py's requirements): torch 2.11 to 2.14 with the Triton
each ships with, 3.6.0 to 3.8.x. Each adaptation below is chosen by trying the installed release, not by its
version number, so a release that changes (or fixes) one of these things is handled as it behaves.

Triton:

- **The interpreter's int conversion** (TRITON_INTERPRET=1). Triton 3.6's interpreter turns a scalar into a
  Python int with ``int()`` of a one-element numpy array; numpy >= 2.4 refuses that ("only 0-dimensional arrays
  can be converted to Python scalars"), so every ``range()`` whose bound is not a constexpr -- a kernel argument,
  a program id, a loaded value -- fails. Triton 3.7 fixed it (triton-lang/triton issue #9171:
  ``int(data.squeeze())``). :func:`patch_interpreter` applies that same one-line fix where the installed
  interpreter needs it; the compiled kernels are untouched.
- **The launcher's argument order.** dlkern's launch plans (``dlkern.ops.triton_support.launch``) call a compiled
  kernel's launcher directly, with the arguments ``JITFunction.run`` passes it at its end -- an internal call
  that a release may change. :func:`planned_launches_supported` reads that call in the installed Triton's source;
  where it is not the order the plans use (3.6, 3.7 and 3.8 all pass the same), plans are off and every launch
  takes Triton's own path (correct, ~10 µs slower per launch), with a one-time warning.

torch:

- **Checks under torch.compile.** torch 2.11's Dynamo cannot trace ``torch._check(cond, lambda: f"...{x}")`` (a
  message closure) even when the condition holds ("Can't extract message from torch._check()"); 2.13's can.
  :func:`check` is torch._check in a form that also traces on 2.11.
- **BatchNorm's eps.** torch 2.11 refuses eps <= 0 always ("batch_norm eps must be positive"); later releases
  allow eps = 0 in eval and word the refusals apart (pytorch/pytorch PR #175508). :func:`batch_norm_eps_error`
  says what the installed torch says.
"""

import ast
import functools
import inspect
import textwrap
import warnings

# What JITFunction.run passes to the compiled kernel's launcher (triton 3.6.0, 3.7.1, 3.8.0): the plans pass
# the same, with None for the launch metadata and the two hooks (they are used only when no hook is set).
LAUNCHER_CALL = (
    "grid_0", "grid_1", "grid_2", "stream", "kernel.function", "kernel.packed_metadata", "launch_metadata",
    "knobs.runtime.launch_enter_hook", "knobs.runtime.launch_exit_hook", "*bound_args.values()",
)


def launcher_call():
    """The arguments of the ``kernel.run(...)`` call in the installed ``JITFunction.run``, as source strings;
    None if that call cannot be found (no source, or no such call)."""
    from triton.runtime.jit import JITFunction

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(JITFunction.run)))
    except (OSError, TypeError, SyntaxError):
        return None
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run"
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "kernel"]
    if len(calls) != 1 or calls[0].keywords:
        return None
    return tuple(ast.unparse(arg) for arg in calls[0].args)


@functools.lru_cache(maxsize=None)
def planned_launches_supported():
    """Whether the installed Triton launches a compiled kernel as dlkern's launch plans do (checked once); if
    not, warns once that launches take Triton's own path."""
    found = launcher_call()
    if found == LAUNCHER_CALL:
        return True
    import triton

    warnings.warn(
        f"dlkern: triton {triton.__version__} calls its compiled kernels' launcher as {found}, not as dlkern's launch "
        f"plans do ({LAUNCHER_CALL}); every launch takes Triton's own path (correct, but with more host time per "
        "launch). dlkern supports triton 3.6 to 3.8.", stacklevel=2)
    return False


def interpreter_index_broken():
    """Whether the installed Triton interpreter fails to use a scalar tensor as an index (``range(n)`` for a
    kernel argument n), as Triton 3.6's does under numpy >= 2.4. Tries it."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    try:
        scope = interpreter._LangPatchScope()
    except AttributeError:  # another interpreter: nothing known to fix
        return False
    try:
        interpreter._patch_lang_tensor(tl.tensor, scope)
        scalar = tl.tensor(interpreter.TensorHandle(np.array([3], dtype=np.int32), tl.int32), tl.int32)
        return len(range(scalar)) != 3
    except TypeError:
        return True
    except AttributeError:
        return False
    finally:
        scope.restore()


_patched = False


def patch_interpreter():
    """Applies Triton 3.7's fix of the interpreter's ``__index__`` (triton-lang/triton issue #9171) where the
    installed interpreter needs it; returns whether it did (idempotent). Call only with TRITON_INTERPRET set."""
    global _patched
    if _patched:
        return True
    from triton.runtime import interpreter

    if not interpreter_index_broken():
        return False
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _patched = True
    return True


# ---------------------------------------------------------------------------------------------------- torch


def check(condition, message):
    """``torch._check(condition, message)``, also traceable by torch 2.11's Dynamo, which cannot trace a message
    closure. `message`: the text, or a function returning it. A plain bool is decided here -- nothing to do when
    it holds (and ~1.5 µs saved), RuntimeError(text) as torch._check raises when it does not; a symbolic
    condition (a SymBool under torch.compile) goes to torch._check, a text as a closure-free function."""
    if condition is True:
        return
    if condition is False:
        raise RuntimeError(message if isinstance(message, str) else message())
    import torch

    torch._check(condition, (lambda text=message: text) if isinstance(message, str) else message)


def _batch_norm_allows_zero_eps_in_eval():
    import torch

    try:
        torch.nn.functional.batch_norm(torch.zeros(2, 1), torch.zeros(1), torch.ones(1), eps=0.0)
    except ValueError:
        return False
    return True


# Asked of the installed torch once, at import (never while torch.compile traces an op's checks).
BATCH_NORM_EPS_ZERO_IN_EVAL = _batch_norm_allows_zero_eps_in_eval()


def batch_norm_eps_error(training, eps):
    """The message of F.batch_norm's ValueError for this eps, as the installed torch words it, or None where it
    accepts eps (any eps > 0)."""
    if eps > 0.0:
        return None
    if not BATCH_NORM_EPS_ZERO_IN_EVAL:  # torch 2.10, 2.11
        return f"batch_norm eps must be positive, but got {eps}"
    if training:
        return f"batch_norm eps must be positive during training, but got {eps}"
    return f"batch_norm eps must be non-negative, but got {eps}" if eps < 0.0 else None
