"""Whether Triton's interpreter runs the kernels: a leaf that both the device code (``kernels/``) and the host
code (``dlkern.ops``) read, so that the kernels import nothing from the op layer.

Triton reads TRITON_INTERPRET once, when it is imported; so does this module (tests/conftest.py sets it first).
"""

import os

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
