"""Whether Triton's interpreter runs the kernels: a leaf that both the device code (``kernels/``) and the host
code (``dlkern.ops``) read, so that the kernels import nothing from the op layer.

Triton reads TRITON_INTERPRET once, when it is imported; so does this module (tests/conftest.py sets it first).
When it is set, the installed interpreter gets the fixes dlkern's kernels need (``dlkern._compat``:
Triton 3.6's, under numpy >= 2.4, cannot run a loop with a runtime bound).
"""

import os

# Triton's own reading of the variable (triton.knobs, getenv_bool): these spellings, in any case, switch it on and
# anything else leaves it off. dlkern must agree with it exactly (with "not in ('', '0')", TRITON_INTERPRET=false
# had dlkern planning for the interpreter while Triton compiled for the GPU).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")

if INTERPRETING:
    from dlkern._compat import patch_interpreter

    patch_interpreter()
