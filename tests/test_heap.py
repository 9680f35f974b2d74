"""bsnn.snn.heap: glibc keeps a simulation's freed buffers mapped, so reusing them takes no page faults."""

import subprocess
import sys

import pytest

from bsnn.errors import ConfigError
from bsnn.simulate import SimConfig
from bsnn.snn.heap import is_glibc

# three 16 MiB buffers allocated, written and freed five times (48 MiB free at the heap's top each time: more than
# glibc's default trim threshold after its dynamic adjustment); prints the minor faults of the last four rounds
PROBE = """
import resource, sys, torch
from bsnn.snn.heap import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = [torch.ones(4 * 2**20) for _ in range(3)]
    del bufs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not is_glibc(), reason="the malloc tuning applies to glibc only")
def test_retained_memory_is_reused_without_page_faults_and_the_default_heap_faults_it_back_in():
    pages = 3 * 16 * 2**20 // 4096  # one round's pages
    default, retained = _faults("default"), _faults("retain")
    assert retained <= pages // 2, f"{retained} minor faults in 4 rounds with the memory retained"
    # control: glibc's defaults give the memory back and fault it in again (~3 rounds' pages; at least one round's)
    assert default >= max(pages, 2 * retained), f"control: only {default} minor faults in 4 rounds with glibc's defaults"


def test_retain_memory_must_be_a_boolean():
    with pytest.raises(ConfigError, match="retain_memory must be true or false"):
        SimConfig(retain_memory="yes").validate()
