"""citygen: city-scale neural reconstruction, rendering, editing and export."""

from .errors import CitygenError

__version__ = "0.1.0"
__all__ = ["CitygenError", "__version__"]
