#!/usr/bin/env python
"""Build the LPIPS weights file citygen's evaluation reads (``--lpips-weights``) from the
official files: torchvision's VGG16 ImageNet weights and the lpips package's v0.1 vgg.pth.

    python scripts/convert_lpips_weights.py \\
        --vgg ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth \\
        --lin site-packages/lpips/weights/v0.1/vgg.pth --out lpips_vgg.safetensors

Nothing is downloaded; both inputs are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tyro

from citygen.errors import CitygenError
from citygen.nets.lpips_convert import convert_lpips_weights


def main(vgg: Path, lin: Path, out: Path) -> None:
    """Convert the official VGG16 and LPIPS lin weights into one safetensors file.

    Args:
        vgg: torchvision's vgg16 state dict (vgg16-397923af.pth).
        lin: the lpips package's weights/v0.1/vgg.pth.
        out: the safetensors file to write.
    """
    print(json.dumps(convert_lpips_weights(vgg, lin, out), indent=2))


if __name__ == "__main__":
    try:
        tyro.cli(main)
    except CitygenError as err:
        print(f"convert_lpips_weights: error: {err}", file=sys.stderr)
        sys.exit(2)
