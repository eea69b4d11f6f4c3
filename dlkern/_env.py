"""dlkern's environment variables, read one way: a spelling outside the allowed ones raises, naming the variable
and what it accepts, instead of silently meaning something (``DLKERN_AUTOTUNE=off`` once switched autotuning on).

The variables: ``DLKERN_AUTOTUNE`` (dlkern.ops.conv_tiles, read at import), ``DLKERN_CPU_ONLY`` (setup.py),
``DLKERN_COMPILE_SAMPLE`` (tests/test_gpu_compile.py); ``DLKERN_COMMIT`` (bench/timing.py, bench/gpu_plan.py)
is free text.

A leaf on the standard library alone: setup.py loads this file by path, before dlkern is built.
"""

import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
_FLAG_SPELLINGS = ", ".join(word for pair in zip(TRUE, FALSE) for word in pair)  # 1, 0, true, false, ...


def _read(name):
    """The variable's value stripped, or None when it is unset or blank (the default applies)."""
    value = os.environ.get(name)
    return value.strip() if value is not None and value.strip() else None


def flag(name, default=False):
    """A boolean variable: 0/1, true/false, yes/no or on/off (any case, surrounding blanks ignored); unset or
    blank gives `default`. Anything else raises ValueError naming the variable and the allowed values."""
    word = _read(name)
    if word is None:
        return default
    if word.lower() in TRUE:
        return True
    if word.lower() in FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected one of {_FLAG_SPELLINGS}")


def integer(name, default, *, minimum=1, words=()):
    """An integer variable of at least `minimum`, or one of `words` (returned lower-cased, e.g. "all"); unset or
    blank gives `default`. Anything else raises ValueError naming the variable and what it accepts."""
    word = _read(name)
    if word is None:
        return default
    if word.lower() in words:
        return word.lower()
    try:
        value = int(word)
    except ValueError:
        value = None
    if value is None or value < minimum:
        allowed = " or ".join([f"an integer >= {minimum}"] + list(words))
        raise ValueError(f"{name}={os.environ[name]!r}: expected {allowed}")
    return value
