"""Optimisation-based style transfer: fine-tune the field's colour branch on rendered views.

Only the colour branch (``color_geo``, ``color_cond``, ``color_mlp`` of a CityField) is
trained; density, geometry features and semantics are frozen, so the geometry cannot change
and the result, being a field, is multi-view consistent.  Each step renders a few small
random views looking down into the block and minimises

    style_weight   * sum_l |Gram(F_l(I)) - Gram(F_l(reference))|^2     (Gatys et al.)
  + color_weight   * SW2(pixels of I, pixels of reference)              (sliced Wasserstein)
  + content_weight * |F_deep(I) - F_deep(I_0)|^2                        (I_0: the unstylized view)

with ``F`` a feature network:

* :class:`VGG16Features` (:mod:`citygen.nets.vgg16`): VGG16's convolutional layers
  (``relu1_2, relu2_2, relu3_3, relu4_3``), weights **supplied by the user** as a safetensors
  file with torchvision's key layout (``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}``;
  the ``features.`` prefix is optional).  Nothing is downloaded.  One way to make such a file, on a machine
  with torchvision: ``safetensors.torch.save_file({k: v for k, v in
  torchvision.models.vgg16(weights="DEFAULT").state_dict().items() if k.startswith("features.")},
  "vgg16.safetensors")``.  An LPIPS weights file (``scripts/convert_lpips_weights.py``) works too.
* :class:`RandomFeatures`: weights-free mode: a fixed, deterministically seeded random
  multi-scale conv net (random features carry texture statistics well enough for
  Gram matching, Ustyuzhaninov et al. 2017); with the colour term this needs no file.

With ``classes``, the losses see the stylized colours only on pixels of those classes (the
rest of the view keeps the unstylized render), matching the restyle edit that applies the
weights only there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from survey_io import Camera

from ..edit.field import color_branch, with_color_branch
from ..errors import CitygenError
from ..nets.vgg16 import VGG16Features  # shared with LPIPS; re-exported here for the style API
from ..render.sampling import camera_rays, look_at
from ..render.volume import render_rays


class RandomFeatures(nn.Module):
    """Weights-free feature net: three seeded random conv stages at 1, 1/2, 1/4 resolution."""

    def __init__(self, seed: int = 0, widths=(32, 64, 128)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        convs, c_in = [], 3
        for i, w in enumerate(widths):
            conv = nn.Conv2d(c_in, w, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (c_in * 9)))
                conv.bias.zero_()
            convs.append(conv)
            c_in = w
        self.convs = nn.ModuleList(convs)
        self.requires_grad_(False)

    def forward(self, img: Tensor) -> list[Tensor]:
        x = (img - 0.5) / 0.25
        taps = []
        for conv in self.convs:
            x = F.relu(conv(x))
            taps.append(x)
        return taps


def gram(f: Tensor, mask: Tensor | None = None) -> Tensor:
    """Gram matrices (B, C, C) of features (B, C, H, W), over the pixels of ``mask`` (B, 1, h, w) when given."""
    b, c, h, w = f.shape
    if mask is None:
        f = f.reshape(b, c, h * w)
        return f @ f.transpose(1, 2) / (c * h * w)
    m = F.interpolate(mask, size=(h, w), mode="area")
    f = (f * m).reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * m.sum((1, 2, 3)).clamp_min(1.0)[:, None, None])


def sliced_wasserstein(a: Tensor, b: Tensor, n_dirs: int = 32, generator: torch.Generator | None = None) -> Tensor:
    """Sliced 2-Wasserstein distance squared between colour sets a (N, 3) and b (M, 3)."""
    d = torch.randn(3, n_dirs, generator=generator)
    d = (d / d.norm(dim=0, keepdim=True)).to(a)
    pa, _ = torch.sort(a @ d, dim=0)
    pb, _ = torch.sort(b @ d, dim=0)
    if pb.shape[0] != pa.shape[0]:  # compare at matching quantiles
        q = (torch.arange(pa.shape[0], device=a.device) + 0.5) / pa.shape[0] * pb.shape[0] - 0.5
        pb = pb[q.round().long().clamp(0, pb.shape[0] - 1)]
    return ((pa - pb) ** 2).mean()


def random_views(aabb: Tensor, n: int, size: int, rng: np.random.Generator, fov_deg: float = 60.0):
    """``n`` random pinhole views (rays) looking down into the box from above it."""
    lo, hi = aabb[0].cpu().numpy().astype(np.float64), aabb[1].cpu().numpy().astype(np.float64)
    ext = hi - lo
    f = size / (2 * math.tan(math.radians(fov_deg) / 2))
    cam = Camera(width=size, height=size, fl_x=f, fl_y=f, cx=size / 2, cy=size / 2)
    views = []
    for _ in range(n):
        target = lo + ext * np.array([rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), 0.0])
        a, tilt = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, math.radians(45))
        dist = 0.35 * float(ext[:2].max())
        eye = target + dist * np.array([math.sin(tilt) * math.cos(a), math.sin(tilt) * math.sin(a), math.cos(tilt)])
        eye[2] = max(eye[2], hi[2] + 0.5)
        o, d, _ = camera_rays(cam, look_at(eye, target), device=aabb.device)
        views.append((o, d))
    return views


@dataclass
class StyleOptimizeConfig:
    steps: int = 200
    #: the fixed pool of random views (looking down into the block) trained and scored on
    n_views: int = 8
    views_per_step: int = 2
    size: int = 48
    lr: float = 2e-2
    style_weight: float = 1.0
    color_weight: float = 10.0
    content_weight: float = 0.05
    step_size: float | None = None     # marching step, metres (default: box diagonal / 256)
    seed: int = 0


def _render(field, views, code, step_size, classes):
    imgs, masks = [], []
    for o, d in views:
        out = render_rays(field, o, d, code, step_size=step_size, occupancy=getattr(field, "occupancy", None))
        s = math.isqrt(o.shape[0])
        imgs.append(out["rgb"].reshape(s, s, 3).permute(2, 0, 1))
        if classes is not None:
            lab = out["semantics"].argmax(-1)
            masks.append(torch.isin(lab, torch.tensor(classes, device=lab.device)).reshape(1, s, s).float())
    return torch.stack(imgs), (torch.stack(masks) if masks else None)


def style_loss(img: Tensor, img0: Tensor, mask: Tensor | None, ref_feats, ref_pixels: Tensor, net,
               cfg: StyleOptimizeConfig, generator: torch.Generator) -> tuple[Tensor, dict]:
    """The total loss of stylized views ``img`` (B, 3, H, W) against the unstylized ``img0``."""
    if mask is not None:
        img = mask * img + (1 - mask) * img0
    feats = net(img)
    style = sum(((gram(f, mask) - gram(r).expand(f.shape[0], -1, -1)) ** 2).sum((1, 2)).mean()
                for f, r in zip(feats, ref_feats))
    pix = img.permute(0, 2, 3, 1).reshape(-1, 3)
    if mask is not None and bool((mask > 0).any()):
        pix = pix[mask.reshape(-1) > 0]
    color = sliced_wasserstein(pix, ref_pixels, generator=generator)
    with torch.no_grad():
        f0 = net(img0)[-1]
    content = F.mse_loss(feats[-1], f0)
    total = cfg.style_weight * style + cfg.color_weight * color + cfg.content_weight * content
    return total, {"style": float(style.detach()), "color": float(color.detach()), "content": float(content.detach())}


def optimize_color_branch(field, reference: Tensor, cfg: StyleOptimizeConfig | None = None, net: nn.Module | None = None,
                          classes: list[int] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Fine-tune a copy of ``field``'s colour branch towards the style of ``reference`` (3, H, W).

    Returns:
        (colour-branch tensors ``{"<module>.<param>": tensor}``, report with the mean loss over
        the view pool before and after, and the per-step history).
    """
    cfg = cfg or StyleOptimizeConfig()
    net = net or RandomFeatures(cfg.seed)
    device = field.aabb.device
    net = net.to(device)
    start = {f"{n}.{k}": v.detach().clone() for n, m in color_branch(field).items() for k, v in m.state_dict().items()}
    styled = with_color_branch(field, start)
    params = [p for m in color_branch(styled).values() for p in m.parameters()]
    frozen = [p for p in field.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    step_size = cfg.step_size or float(torch.linalg.norm(field.aabb[1] - field.aabb[0])) / 256
    code = field.appearance.weight.detach().mean(0) if hasattr(field, "appearance") else torch.zeros(0, device=device)
    ref = reference.to(device)[None].float()
    with torch.no_grad():
        ref_feats = [f.detach() for f in net(ref)]
    ref_pixels = ref[0].permute(1, 2, 0).reshape(-1, 3)
    pool = random_views(field.aabb, cfg.n_views, cfg.size, np.random.default_rng(cfg.seed))
    with torch.no_grad():  # the unstylized renders of the pool (density and geometry are frozen)
        originals = [_render(field, [v], code, step_size, classes) for v in pool]

    def loss_on(k: int, generator: torch.Generator):
        img, _ = _render(styled, [pool[k]], code, step_size, None)
        img0, mask = originals[k]
        return style_loss(img, img0, mask, ref_feats, ref_pixels, net, cfg, generator)

    def evaluate() -> float:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            return sum(float(loss_on(k, g)[0]) for k in range(len(pool))) / len(pool)

    opt = torch.optim.Adam(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    order = np.random.default_rng(cfg.seed + 2)
    history = []
    try:
        before = evaluate()
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            record = {"step": step + 1, "loss": 0.0}
            for k in order.choice(len(pool), size=min(cfg.views_per_step, len(pool)), replace=False):
                loss, parts = loss_on(int(k), g)
                (loss / cfg.views_per_step).backward()
                for name, value in [("loss", float(loss.detach())), *parts.items()]:
                    record[name] = record.get(name, 0.0) + value / cfg.views_per_step
            opt.step()
            history.append(record)
        after = evaluate()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    tensors = {f"{n}.{k}": v.detach().cpu().contiguous() for n, m in color_branch(styled).items()
               for k, v in m.state_dict().items()}
    return tensors, {"loss_before": before, "loss_after": after, "history": history}


def load_reference_image(path, max_side: int = 256) -> Tensor:
    """A reference image as (3, H, W) in [0, 1], its long side at most ``max_side``."""

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = max_side / max(im.size)
            if scale < 1:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise CitygenError(path, f"reference image unreadable ({err})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


__all__ = ["RandomFeatures", "StyleOptimizeConfig", "VGG16Features", "gram", "load_reference_image",
           "optimize_color_branch", "random_views", "sliced_wasserstein", "style_loss"]
