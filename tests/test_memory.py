"""engine/memory.py: the process-memory helpers do what they say to the kernel's view of the mappings."""

import sys

import numpy as np
import pytest

from engine.memory import small_pages
from engine.model.kv_cache import KVCache

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux")


def _vm_flags(addr: int) -> set[str]:
    """VmFlags of the mapping of /proc/self/smaps that holds addr."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


@linux
def test_small_pages_marks_the_mapping_no_huge_pages():
    a = np.zeros((8 << 20) // 4, dtype=np.float32)       # 8 MiB: numpy's own huge-page threshold is 4 MiB
    assert small_pages(a)
    assert "nh" in _vm_flags(a.ctypes.data + a.nbytes // 2)


def test_small_pages_leaves_small_arrays_alone():
    assert not small_pages(np.zeros(1024, dtype=np.float32))


@linux
def test_kv_cache_is_on_small_pages():
    kv = KVCache(n_layers=4, n_kv_heads=3, max_seq=4096, head_dim=64, dtype=np.uint16)
    assert kv.k_all.nbytes >= 4 << 20
    assert "nh" in _vm_flags(kv.k_all.ctypes.data + kv.k_all.nbytes // 2)
    assert "nh" in _vm_flags(kv.v_all.ctypes.data + kv.v_all.nbytes // 2)
