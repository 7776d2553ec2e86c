"""`anomalens.memory.retain_freed_memory`: freed activations are reused, not faulted in afresh (glibc only).

Each case runs in its own interpreter, because the setting is process-wide. The program imitates a
forward pass on 64 MiB activations (each op a fresh output, its input freed), 8 rounds, and counts the
minor page faults of rounds 2-8: glibc's default maps every such block anew and faults it in one 4 KiB
page at a time (8 blocks of 16,384 pages a round, 917,504 in all); with freed memory retained the blocks
come back from the heap. The heap may still grow by a block or three in rounds 2-5, by how the aligned
blocks fall (it varies with address randomisation: 0 to 49,153 faults in 20 runs), and not after that.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

PAGES_PER_ROUND = 8 * 64 * 2**20 // 4096

PROGRAM = """
import resource, torch
from anomalens.memory import retain_freed_memory
print(retain_freed_memory())
x = torch.ones(16 * 2**20)
for i in range(8):
    if i == 1:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        y = x * 2
        x = y + 1
        del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env: dict[str, str]) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    retained, faults = done.stdout.split()
    return retained, int(faults)


def test_retained_memory_is_reused_without_page_faults():
    retained, faults = run({"ANOMALENS_MALLOC": ""})  # whatever the caller's environment says
    assert retained == "True"
    assert faults < PAGES_PER_ROUND  # under one round's worth over seven rounds


def test_system_setting_leaves_malloc_alone():
    retained, faults = run({"ANOMALENS_MALLOC": "system"})
    assert retained == "False"
    assert faults >= 7 * PAGES_PER_ROUND // 2  # the fresh pages the setting avoids
