"""dlkern's DLKERN_* variables (dlkern/_env.py): the allowed spellings mean what they say, anything else raises
naming the variable and what it accepts -- at dlkern's import (DLKERN_AUTOTUNE) and in setup.py (DLKERN_CPU_ONLY).
And TRITON_INTERPRET means to dlkern what it means to Triton."""

import os
import runpy
import subprocess
import sys

import pytest

from dlkern import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAR = "DLKERN_TEST_VARIABLE"
ALLOWED = "expected one of 1, 0, true, false, yes, no, on, off"


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("0", False), ("true", True), ("false", False), ("yes", True), ("no", False), ("on", True),
    ("off", False), ("TRUE", True), ("False", False), ("On", True), ("OFF", False), (" 1 ", True), ("\tno\n", False),
])
def test_flag_allowed_spellings(monkeypatch, value, expected):
    monkeypatch.setenv(VAR, value)
    assert _env.flag(VAR) is expected
    assert _env.flag(VAR, default=not expected) is expected


@pytest.mark.parametrize("value", [None, "", "   "])
@pytest.mark.parametrize("default", [False, True])
def test_flag_unset_or_blank_is_the_default(monkeypatch, value, default):
    if value is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, value)
    assert _env.flag(VAR, default=default) is default


@pytest.mark.parametrize("value", ["garbage", "0.0", "2", "-1", "00", "y", "n", "t", "enable", "disabled", "tru",
                                   "1 0"])
def test_flag_other_spellings_raise(monkeypatch, value):
    monkeypatch.setenv(VAR, value)
    with pytest.raises(ValueError) as raised:
        _env.flag(VAR)
    assert str(raised.value) == f"{VAR}={value!r}: {ALLOWED}"


@pytest.mark.parametrize("value, expected", [
    (None, 24), ("", 24), ("5", 5), (" 7 ", 7), ("0", 0), ("all", "all"), ("ALL", "all"),
])
def test_integer_allowed(monkeypatch, value, expected):
    """As tests/test_gpu_compile.py reads DLKERN_COMPILE_SAMPLE: a count of autotuned variants, or "all"."""
    if value is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, value)
    assert _env.integer(VAR, 24, minimum=0, words=("all",)) == expected


@pytest.mark.parametrize("value, minimum, words, message", [
    ("-1", 0, ("all",), "expected an integer >= 0 or all"),
    ("ten", 0, ("all",), "expected an integer >= 0 or all"),
    ("2.5", 0, ("all",), "expected an integer >= 0 or all"),
    ("every", 0, ("all",), "expected an integer >= 0 or all"),
    ("0", 1, (), "expected an integer >= 1"),
])
def test_integer_other_values_raise(monkeypatch, value, minimum, words, message):
    monkeypatch.setenv(VAR, value)
    with pytest.raises(ValueError) as raised:
        _env.integer(VAR, 24, minimum=minimum, words=words)
    assert str(raised.value) == f"{VAR}={value!r}: {message}"


def _python(code, **env):
    """Runs `code` in a fresh interpreter (dlkern reads its variables once, at import) with `env` set."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("DLKERN_")}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_import_rejects_a_bad_autotune_spelling():
    """dlkern.ops.conv_tiles reads DLKERN_AUTOTUNE when dlkern is imported: a bad spelling fails the import, in one
    message that names the variable and its allowed values (it once switched autotuning on)."""
    proc = _python("import dlkern", DLKERN_AUTOTUNE="garbage")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"ValueError: DLKERN_AUTOTUNE='garbage': {ALLOWED}"


@pytest.mark.parametrize("value, expected", [("off", False), ("FALSE", False), ("yes", True), (None, False)])
def test_import_reads_autotune(value, expected):
    proc = _python("import dlkern.ops.conv_tiles as c; print(c.AUTOTUNE)",
                   **({} if value is None else {"DLKERN_AUTOTUNE": value}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(expected)]


def _setup(value):
    """`setup.py --name` (computes the build's configuration, DLKERN_CPU_ONLY's read among it; builds nothing)."""
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DLKERN_CPU_ONLY": value})


def test_setup_reads_cpu_only():
    assert "DLKERN_CPU_ONLY is set" not in _setup("off").stderr  # "off" once meant a CPU-only build
    assert "DLKERN_CPU_ONLY is set" in _setup("1").stderr
    proc = _setup("maybe")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"ValueError: DLKERN_CPU_ONLY='maybe': {ALLOWED}"


@pytest.mark.parametrize("value", ["1", "0", "", "true", "True", "false", "yes", "no", "on", "off", "y", "Y", "n",
                                   "garbage", " 1", "0.0", "2"])
def test_interpreting_agrees_with_triton(monkeypatch, value):
    """dlkern's INTERPRETING (which picks interpreter tiles and sends CPU tensors to Triton) is true exactly when
    Triton's interpreter runs: "false" or "off" must not mean on to one and off to the other."""
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", value)
    interpreting = runpy.run_path(os.path.join(ROOT, "dlkern", "_interpret.py"))["INTERPRETING"]
    assert interpreting is triton.knobs.runtime.interpret
