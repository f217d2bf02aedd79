"""Real spherical harmonics of unit directions, closed form, degree 1..5 (1..25 outputs).

The basis and its ordering are tiny-cuda-nn's ``SphericalHarmonics`` encoding (the one
instant-ngp and nerfacto use): for degree ``d`` there are ``d**2`` outputs, band ``l`` of
``0..d-1`` in ``m = -l..l`` order, with the standard real-SH normalisation constants.
tcnn maps directions from [0, 1] to [-1, 1] first; here the input is the unit direction itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CitygenError


def sh_encode(dirs: Tensor, degree: int = 4) -> Tensor:
    """Encode (N, 3) unit directions into (N, degree**2) real spherical-harmonic values."""
    if not 1 <= degree <= 5:
        raise CitygenError(None, f"spherical harmonics: degree must be 1..5, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]                         # l = 0
    if degree > 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [
            1.0925484305920792 * xy,
            -1.0925484305920792 * yz,
            0.94617469575755997 * zz - 0.31539156525251999,
            -1.0925484305920792 * xz,
            0.54627421529603959 * (xx - yy),
        ]
    if degree > 3:
        out += [
            0.59004358992664352 * y * (-3.0 * xx + yy),
            2.8906114426405538 * xy * z,
            0.45704579946446572 * y * (1.0 - 5.0 * zz),
            0.3731763325901154 * z * (5.0 * zz - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * zz),
            1.4453057213202769 * z * (xx - yy),
            0.59004358992664352 * x * (-xx + 3.0 * yy),
        ]
    if degree > 4:
        out += [
            2.5033429417967046 * xy * (xx - yy),
            1.7701307697799304 * yz * (-3.0 * xx + yy),
            0.94617469575756008 * xy * (7.0 * zz - 1.0),
            0.66904654355728921 * yz * (3.0 - 7.0 * zz),
            -3.1735664074561294 * zz + 3.7024941420321507 * zz * zz + 0.31735664074561293,
            0.66904654355728921 * xz * (3.0 - 7.0 * zz),
            0.47308734787878004 * (xx - yy) * (7.0 * zz - 1.0),
            1.7701307697799304 * xz * (-xx + 3.0 * yy),
            -3.7550144126950569 * xx * yy + 0.62583573544917614 * xx * xx + 0.62583573544917614 * yy * yy,
        ]
    return torch.stack(out, dim=-1)
