"""Build (once, on first use) and load the C++ sources of ``csrc/`` as torch operator libraries.

``torch.utils.cpp_extension.load`` compiles into torch's extension cache (``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``) and reuses the build while the source is unchanged. Every library is compiled
with ``-O3 -fopenmp -ffp-contract=off``: no multiply-add is ever fused, so float arithmetic rounds each operation
as the eager oracles do. ``BSNN_NO_COMPILE`` turns every build off (the callers fall back, with a warning).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]


def build(name: str, source: str) -> None:
    """Compile (first use) and load ``csrc/<source>`` as the ``torch.ops.<name>`` library; raises on failure."""
    if os.environ.get("BSNN_NO_COMPILE"):
        raise RuntimeError("BSNN_NO_COMPILE is set")
    # imported here, not at the top: importing cpp_extension probes for CUDA and logs about it on every import
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.load(name=name, sources=[str(CSRC / source)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)


def code_paths(name: str, source: str, what: str, fallback: str) -> tuple[str, ...] | None:
    """Build and load ``csrc/<source>`` as ``torch.ops.<name>`` (first use) and return the code paths its
    ``cpu_paths()`` op reports for this CPU, best last; None, with one logged warning naming ``what`` failed to
    build and ``fallback`` (what runs instead), where it cannot be built: a simulation never crashes on it."""
    try:
        build(name, source)
        return tuple(getattr(torch.ops, name).cpu_paths().split(","))
    except Exception as e:  # noqa: BLE001 - no compiler, failed build or load
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log.warning("bsnn: %s could not be built (%s: %s); %s", what, type(e).__name__, msg[:200], fallback)
        return None
