"""Keep freed memory for reuse (glibc's malloc) while the engine works.

Every step of the test-time optimisation allocates and frees tens of tensors of 8-30 MB (a
2 M-voxel level). glibc's malloc serves blocks above its mmap threshold (dynamic, at most
32 MB) straight from the kernel and gives them back when they are freed, so each of those
tensors came as fresh pages that the kernel had to fault in and zero at every step: 2.9 s of
system time in a 20 s registration of two 2 mm T1w scans on one CPU thread. With the threshold
fixed at its ceiling and the heap neither trimmed nor grown by small steps
(:func:`keep_freed_memory`), freed blocks stay in the process for the next step: the same
registration ran 7-11 % faster (system time 0.9-1.4 s), its peak memory 6 % higher
(``benchmarks/README.md``, "Session 37"). PyTorch's own CPU performance notes suggest the
same (or jemalloc / tcmalloc preloaded, which we cannot assume on a user's machine).

The setting is per process and lasts: the process then holds on to up to
:data:`TRIM_THRESHOLD` bytes of freed memory. ``SYNTHMORPH_KEEP_FREED_MEMORY=0`` leaves malloc
as it is. Elsewhere than glibc (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger('synthmorph_app.engine.allocator')

#: Environment variable that turns :func:`keep_freed_memory` off (``0``, ``no``, ``false``).
ENV_VAR = 'SYNTHMORPH_KEEP_FREED_MEMORY'

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: Blocks at least this large still come from mmap (glibc's ceiling for the threshold).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap that the process keeps before giving it back.
TRIM_THRESHOLD = 1024 * 1024 * 1024
#: Extra memory asked of the kernel whenever the heap grows.
TOP_PAD = 256 * 1024 * 1024

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process (see the module docstring); True if it was.

    Called by :func:`.register.register`; later calls return the first call's answer.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_VAR, '1').strip().lower() in ('0', 'no', 'false', 'off'):
        log.debug('%s is off: malloc left as it is', ENV_VAR)
        return False
    if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
        return False
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    log.debug('malloc keeps freed memory for reuse: %s', _applied)
    return _applied
