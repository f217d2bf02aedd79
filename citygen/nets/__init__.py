"""Pretrained image networks whose weights the user supplies by path (never downloaded):
the VGG16 convolutional trunk (style losses, LPIPS) and the LPIPS perceptual metric."""

from .lpips import LPIPS, lpips_distance
from .vgg16 import VGG16Features

__all__ = ["LPIPS", "VGG16Features", "lpips_distance"]
