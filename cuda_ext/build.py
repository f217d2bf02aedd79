"""Build the native kernels ahead of time: ``python -m cuda_ext.build``.

Compiles the CPU build (and the CUDA build where torch sees a CUDA device) into the JIT cache
that later processes load from, and prints what is available.  Exit status 1 when the CPU build
fails, so CI can tell.
"""

from __future__ import annotations

import sys

from . import _backend


def main() -> int:
    cpu = _backend.cpu_available()
    cuda = _backend.cuda_available()
    print(f"cuda_ext build folder: {_backend.build_dir()}")
    print(f"  cpu  ({_backend.cpu_isa()}): {'ok' if cpu else 'unavailable'}")
    print(f"  cuda: {'ok' if cuda else 'unavailable'}")
    reason = _backend.unavailable_reason()
    if reason:
        print(f"  ({reason})")
    return 0 if cpu else 1


if __name__ == "__main__":
    sys.exit(main())
