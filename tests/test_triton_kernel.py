"""The Triton IF kernel equals the oracle, run on the CPU by Triton's interpreter (a subprocess, because
TRITON_INTERPRET must be set before triton is imported)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from bsnn.snn.functional import if_multistep
    from bsnn.snn.kernels import get_kernel
    torch.manual_seed(0)
    for shape, theta in [((7, 3, 4, 5, 5), torch.rand(4, 1, 1) + 0.3), ((9, 5, 33), torch.tensor(1.0)),
                         ((6, 2, 3, 2, 2), torch.tensor(0.7))]:
        x = torch.randn(*shape)
        v0 = torch.rand(*shape[1:]) * 0.5
        s_ref, v_ref = if_multistep(x, theta, v0)
        s, v = get_kernel("triton")(x, theta, v0)
        assert torch.equal(s, s_ref), shape
        torch.testing.assert_close(v, v_ref)
    print("ok")
""")


def test_triton_kernel_matches_oracle_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
