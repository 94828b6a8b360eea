"""The engine's malloc setting: freed blocks of tens of MB stay in the process for reuse."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

LIBC, LIBC_VERSION = platform.libc_ver()
# mallinfo2 (what the check reads) came with glibc 2.33
GLIBC = sys.platform.startswith('linux') and LIBC == 'glibc' and tuple(
    int(part) for part in LIBC_VERSION.split('.')[:2]) >= (2, 33)

# Allocates and frees 20 MB (as a refinement step does), then prints whether the engine's
# setting was applied and how many bytes glibc holds free in its heap (mallinfo2).
SCRIPT = textwrap.dedent(
    """
    import ctypes
    import numpy as np
    from synthmorph_app.engine.allocator import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
            'uordblks', 'fordblks', 'keepcost')]

    applied = keep_freed_memory()
    assert keep_freed_memory() is applied  # once per process
    block = np.ones(5 * 1024 * 1024, dtype=np.float32)
    del block
    libc = ctypes.CDLL('libc.so.6')
    libc.mallinfo2.restype = MallInfo2
    print(applied, libc.mallinfo2().fordblks)
    """
)


def _run(env_value):
    env = dict(os.environ)
    env.pop('SYNTHMORPH_KEEP_FREED_MEMORY', None)
    if env_value is not None:
        env['SYNTHMORPH_KEEP_FREED_MEMORY'] = env_value
    out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == 'True', int(out[1])


@pytest.mark.skipif(not GLIBC, reason='the setting is for glibc malloc (the check reads mallinfo2 of glibc 2.33+)')
def test_freed_blocks_stay_for_reuse_unless_turned_off():
    applied, free_bytes = _run(None)
    assert applied and free_bytes >= 20 * 1024 * 1024
    applied, free_bytes = _run('0')
    assert not applied and free_bytes < 20 * 1024 * 1024  # given back to the kernel
