"""The command line keeps freed CPU memory: a large block freed and allocated again costs no new page faults."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from maskattn import allocator, cli

# Page faults per allocation of a 64 MiB tensor, written once (4 KiB pages: 16,384 when each one is mapped afresh).
PROBE = """
import resource, sys, torch
from maskattn.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.empty(16 * 2**20).fill_(1.0)
before = faults()
for _ in range(20):
    torch.empty(16 * 2**20).fill_(1.0)
print(applied, (faults() - before) / 20)
"""


def _faults(mode, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keeping_freed_memory_stops_mapping_large_blocks_again():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    applied, kept = _faults("keep", env)
    _, default = _faults("default", env)
    if not applied:
        pytest.skip("this C library has no mallopt (not glibc)")
    assert default > 8000  # glibc's default: the block is mapped again, about one fault per page
    assert kept < default / 4


def test_a_malloc_setting_in_the_environment_wins():
    assert allocator.keep_freed_memory({"MALLOC_ARENA_MAX": "2"}) is False


def test_the_program_applies_it_before_main(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(allocator, "limit_kernel_cache", lambda: calls.append("cache") or True)
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append("main") or 0)
    assert cli.run() == 0 and calls == ["kept", "cache", "main"]
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["maskattn"] == "maskattn.cli:run"


RELEASE_PROBE = """
import sys, torch
from maskattn.allocator import keep_freed_memory, release_freed_memory
def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
applied = keep_freed_memory()
base = rss_mb()
blocks = [torch.ones(n * 2**18) for n in range(8, 40)]  # 8 to 39 MiB each, 760 MiB in all
del blocks
kept = rss_mb() - base
released = release_freed_memory()
print(applied, released, kept, rss_mb() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_released_memory_leaves_the_resident_set():
    """Kept memory stays resident after the tensors are gone; release_freed_memory() gives its pages back."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}  # glibc's own
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True, env=env)
    applied, released, kept, after = out.stdout.split()
    if applied != "True" or released != "True":
        pytest.skip("this C library has no mallopt / malloc_trim (not glibc)")
    assert float(kept) > 500  # of the 760 MiB freed
    assert float(after) < 100


def test_the_kernel_cache_limit_leaves_a_users_setting_alone():
    environ = {}
    assert allocator.limit_kernel_cache(environ) is True
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(allocator.KERNEL_CACHE)}
    mine = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}
    assert allocator.limit_kernel_cache(mine) is False and mine == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}
