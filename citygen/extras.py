"""Optional heavy dependencies (the package's extras), imported where first needed.

One owner for how a missing extra reaches the user: a single line naming what needed it and the
``pip install`` that provides it (a :class:`~citygen.errors.CitygenError`, exit status 2 at the CLI).
"""

from __future__ import annotations

from typing import Any

from .errors import CitygenError


def require_open3d(purpose: str, alternative: str = "") -> Any:
    """The ``open3d`` module, or a CitygenError saying that ``purpose`` needs the ``mesh`` extra
    (``alternative``: what the user can do instead, e.g. ", or use the heightfield mesh")."""
    try:
        import open3d  # deferred: the mesh extra
    except ImportError as err:
        raise CitygenError(None, f"{purpose} needs open3d: pip install 'citygen[mesh]' (open3d-cpu; on Debian also "
                                 f"apt-get install libusb-1.0-0){alternative} ({err})") from None
    return open3d


__all__ = ["require_open3d"]
