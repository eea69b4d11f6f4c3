"""What differs between the Triton releases dlkern supports, adapted to in one place.

The supported range (README, "Supported versions"; setup.py's requirements): torch 2.11 to 2.14 with the Triton
each ships with, 3.6.0 to 3.8.x. Each adaptation below is chosen by trying the installed Triton, not by its
version number, so a release that changes (or fixes) one of these things is handled as it behaves.

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
