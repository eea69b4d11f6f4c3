"""dlkern's cached launch plans pass each kernel exactly what Triton's own launch path passes (see
tests/launch_plan_check.py, run in a subprocess without TRITON_INTERPRET: plans exist only for compiled kernels,
stood in here by bench/host_stub.py's driver)."""

import os
import subprocess
import sys

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_plan_check.py")


def test_launch_plans_match_tritons_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "launch plans: all checks passed" in result.stdout
