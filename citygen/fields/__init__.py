"""Neural fields: the hash-grid encoding and the networks built on it."""

from .field import CityField
from .hash_encoding import HashEncoding, HashGridConfig
from .sh import sh_encode

__all__ = ["CityField", "HashEncoding", "HashGridConfig", "sh_encode"]
