"""Loads ``dlkern._C`` (the C++/CUDA ops) and says clearly what to do when it cannot be used.

An extension is tied to the torch it was compiled against; loading it under another torch fails with undefined
symbols, or worse. setup.py records what it built against in ``_build_info.json`` beside the library, and this
module checks that record before loading the library.
"""

import json
import os

import torch

REBUILD_HINT = "rebuild it against the installed torch: pip install --no-build-isolation -e ."
_BUILD_INFO_PATH = os.path.join(os.path.dirname(__file__), "_build_info.json")


def _read_build_info():
    try:
        with open(_BUILD_INFO_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImportError(f"dlkern: cannot read {_BUILD_INFO_PATH} ({e}); {REBUILD_HINT}") from e


def _load():
    info = _read_build_info()
    if info is None:
        raise ImportError(f"dlkern: the C++/CUDA extension dlkern._C is not built; {REBUILD_HINT}")
    if info.get("torch") != torch.__version__:
        raise ImportError(
            f"dlkern: the extension dlkern._C was built for torch {info.get('torch')}, but torch "
            f"{torch.__version__} is installed; {REBUILD_HINT}"
        )
    try:
        from dlkern import _C  # noqa: F401  (loading the library registers torch.ops.dlkern.*)
    except ImportError as e:
        raise ImportError(f"dlkern: the extension dlkern._C failed to load ({e}); {REBUILD_HINT}") from e
    return info


build_info = _load()
