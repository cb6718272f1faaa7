"""The Triton kernels of core.triton_pass on the CPU, in Triton's interpreter: the checks in
tests/support/triton_interpreted.py, run by a pytest of their own with TRITON_INTERPRET=1
set before triton is imported (in this process torch.compile may have imported it already)."""
import os
import re
import subprocess
import sys
from pathlib import Path

CHECKS = Path(__file__).parent / "support" / "triton_interpreted.py"


def test_triton_passes_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                          str(CHECKS)], env=env, capture_output=True, text=True, timeout=500,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) == 7, out.stdout[-2000:]  # every check ran; none skipped
