"""Style transfer: colour maths, per-class statistics matching measured on the stylized
field, multi-view consistency by reprojection, named styles, the weights-free and VGG16
optimisation modes, and the `citygen style` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from citygen.cli import entrypoint
from citygen.config import RenderConfig
from citygen.edit import EditedField, EditStack, PlaneGround
from citygen.edit.analytic import BUILDING, GROUND, VEGETATION, AnalyticCityField
from citygen.edit.field import with_color_branch
from citygen.errors import CitygenError
from citygen.render import render_image
from citygen.render.sampling import camera_rays
from citygen.style import (
    lab_to_rgb,
    mk_map,
    named_style,
    rgb_to_lab,
    scene_colors,
    stats_transforms,
)
from citygen.style.named import NAMED_STYLES
from citygen.style.optimize import (
    RandomFeatures,
    StyleOptimizeConfig,
    VGG16Features,
    look_at,
    optimize_color_branch,
)
from citygen.style.stats import color_stats, load_reference
from survey_io import Camera

CAM = Camera(width=40, height=40, fl_x=40.0, fl_y=40.0, cx=20.0, cy=20.0)
NADIR = look_at(np.array([0.0, 0.0, 40.0]), np.array([0.0, 0.0, 0.0]))
OBLIQUE = look_at(np.array([28.0, -26.0, 34.0]), np.array([-3.0, 2.0, 0.0]))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def field(one_thread):
    return AnalyticCityField(with_occupancy=True, occupancy_resolution=32)


def restyle(transforms, selection=None):
    return {"id": "style", "op": "restyle", "selection": selection, "params": {"method": "stats",
                                                                                "transforms": transforms}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference image whose building and vegetation pixels follow known Gaussians, and its label map."""
    rng = np.random.default_rng(0)
    h, w = 64, 64
    rgb = np.zeros((h, w, 3))
    mix = np.array([[0.05, 0.02, 0.0], [0.02, 0.04, 0.01], [0.0, 0.01, 0.03]])
    rgb[:32] = np.array([0.70, 0.55, 0.40]) + rng.standard_normal((32, w, 3)) @ mix.T
    rgb[32:] = np.array([0.35, 0.50, 0.30]) + 0.03 * rng.standard_normal((32, w, 3))
    labels = np.where(np.arange(h)[:, None] < 32, BUILDING, VEGETATION).repeat(w, 1).astype(np.uint8)
    root = tmp_path_factory.mktemp("ref")
    Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8)).save(root / "ref.png")
    Image.fromarray(labels).save(root / "ref_labels.png")
    return root / "ref.png", root / "ref_labels.png"


# -- colour maths -----------------------------------------------------------------------------------
def test_lab_known_values_and_roundtrip():
    lab = rgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=0.05)
    assert torch.allclose(lab[1], torch.tensor([53.24, 80.09, 67.20]), atol=0.05)  # sRGB red (CIE reference)
    assert torch.allclose(lab[2], torch.zeros(3), atol=1e-4)
    rgb = torch.rand(1000, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-4)


def test_mk_map_matches_mean_and_covariance():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(5000, 3, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0.3, 0], [0, 0.5, 0.2], [0, 0, 2.0]],
                                                                                dtype=torch.float64) + 3
    ref = torch.randn(4000, 3, generator=g, dtype=torch.float64) @ torch.tensor([[0.2, 0, 0.1], [0.4, 1.0, 0], [0, 0.3, 0.7]],
                                                                                dtype=torch.float64) - 1
    ms, cs = src.mean(0), torch.cov(src.T)
    mr, cr = ref.mean(0), torch.cov(ref.T)
    a, b = mk_map(ms, cs, mr, cr, eps=0.0)
    out = src @ a.T + b
    assert torch.allclose(out.mean(0), mr, atol=1e-9)
    assert torch.allclose(torch.cov(out.T), cr, atol=1e-9)
    assert torch.allclose(a, a.T, atol=1e-9)  # the optimal map is symmetric positive definite
    assert bool((torch.linalg.eigvalsh(a) > 0).all())


# -- statistics-based style -------------------------------------------------------------------------
def test_stats_style_matches_reference_per_class(field, reference):
    transforms = stats_transforms([field], reference[0], reference[1], classes=["building", "vegetation"], n=32)
    assert set(transforms) == {"building", "vegetation"}
    edited = EditedField(field, [restyle(transforms)], ground=PlaneGround(0.0))
    ref_c, ref_l = load_reference(*reference)
    src_c, src_l = scene_colors(field, n=32)
    out_c, out_l = scene_colors(edited, n=32)
    assert torch.equal(src_l, out_l)  # geometry and classes untouched
    # building: full covariance matched (Lab); the scene's building colours span 3-D
    m_out, c_out = color_stats(out_c[out_l == BUILDING])
    m_ref, c_ref = color_stats(ref_c[ref_l == BUILDING])
    assert float((m_out - m_ref).abs().max()) < 0.5
    assert float(torch.linalg.norm(c_out - c_ref) / torch.linalg.norm(c_ref)) < 0.05
    # vegetation (two shades only in the scene: a degenerate covariance): the mean is matched
    m_out, _ = color_stats(out_c[out_l == VEGETATION])
    m_ref, _ = color_stats(ref_c[ref_l == VEGETATION])
    assert float((m_out - m_ref).abs().max()) < 0.5
    # classes outside the style keep their colours exactly
    assert torch.equal(out_c[out_l == GROUND], src_c[src_l == GROUND])


def test_style_is_multiview_consistent(field, reference):
    transforms = stats_transforms([field], reference[0], None, classes=["building"], n=32)  # global statistics
    edited = EditedField(field, [restyle(transforms)], ground=PlaneGround(0.0))
    cfg = RenderConfig(step_size=0.1)
    a, b = render_image(edited, CAM, NADIR, render=cfg), render_image(edited, CAM, OBLIQUE, render=cfg)
    base = render_image(field, CAM, NADIR, render=cfg)
    o, d, z = camera_rays(CAM, NADIR)
    pts = o + d * (a["depth"].reshape(-1) / z)[:, None]                 # 3-D points seen in view A
    w2c = np.linalg.inv(OBLIQUE)
    pc = pts.double() @ torch.from_numpy(w2c[:3, :3]).T + torch.from_numpy(w2c[:3, 3])
    col = (CAM.cx + CAM.fl_x * pc[:, 0] / pc[:, 2]).floor().long()
    row = (CAM.cy + CAM.fl_y * pc[:, 1] / pc[:, 2]).floor().long()
    inside = (col >= 0) & (col < CAM.width) & (row >= 0) & (row < CAM.height) & (a["acc"].reshape(-1) > 0.99)
    idx = inside.nonzero().squeeze(-1)
    # visible in B too: B's depth at the reprojected pixel agrees with the point's depth in B
    seen = (b["depth"][row[idx], col[idx]] - pc[idx, 2].float()).abs() < 0.15
    idx = idx[seen]
    la = a["semantics"].reshape(-1, 7).argmax(-1)[idx]
    lb = b["semantics"].argmax(-1)[row[idx], col[idx]]
    idx = idx[(la == lb) & (la == BUILDING)]
    assert idx.numel() > 40
    ca, cb = a["rgb"].reshape(-1, 3)[idx], b["rgb"][row[idx], col[idx]]
    assert not torch.allclose(ca, base["rgb"].reshape(-1, 3)[idx], atol=0.05)  # it was restyled ...
    agree = (ca - cb).abs().max(-1).values < 0.02                             # ... identically in both views
    assert float(agree.float().mean()) > 0.95


def test_named_styles(field, tmp_path, capsys):
    before_c, before_l = scene_colors(field, n=24, tilts=())
    luma = torch.tensor([0.2126, 0.7152, 0.0722])
    results = {}
    for name in NAMED_STYLES:
        edited = EditedField(field, [restyle(named_style(name))], ground=PlaneGround(0.0))
        results[name], labels = scene_colors(edited, n=24, tilts=())
        assert torch.equal(labels, before_l)
    assert float((results["night"] @ luma).mean()) < 0.5 * float((before_c @ luma).mean())
    sep = results["sepia"]
    assert bool((sep[:, 0] >= sep[:, 1] - 1e-6).all() and (sep[:, 1] >= sep[:, 2] - 1e-6).all())
    assert float((results["winter"][before_l == GROUND] @ luma).mean()) > 0.6
    veg = results["autumn"][before_l == VEGETATION]
    assert bool((veg[:, 0] > veg[:, 1]).all())  # green leaves turned orange
    # restricted to a class, a style leaves the others alone; the sky follows a global style
    only = EditedField(field, [restyle(named_style("night", ["building"]))], ground=PlaneGround(0.0))
    c, l = scene_colors(only, n=24, tilts=())
    assert torch.equal(c[l != BUILDING], before_c[before_l != BUILDING])
    sky = torch.tensor([[0.0, 0.0, 1.0]])
    assert not torch.allclose(EditedField(field, [restyle(named_style("night"))]).background(sky), field.background(sky))
    assert torch.equal(only.background(sky), field.background(sky))
    # the CLI adds a named style as an undoable restyle edit
    tile = tmp_path / "tile"
    tile.mkdir()
    assert entrypoint(["style", str(tile), "--named", "sunset", "--classes", "building,road"]) == 0
    edit = EditStack.load(tile).edits[0]
    assert edit["op"] == "restyle" and set(edit["params"]["transforms"]) == {"building", "road"}
    assert entrypoint(["edit", str(tile), "undo"]) == 0 and EditStack.load(tile).edits == []
    capsys.readouterr()
    assert entrypoint(["style", str(tile), "--named", "vaporwave"]) == 2
    assert "unknown style" in capsys.readouterr().err
    assert entrypoint(["style", str(tile)]) == 2
    assert entrypoint(["style", str(tile), "--named", "night", "--classes", "spaceship"]) == 2


# -- optimisation-based style -----------------------------------------------------------------------
def _stripes(size=32) -> torch.Tensor:
    img = torch.zeros(3, size, size)
    stripe = (torch.arange(size) // 4) % 2 == 0
    img[:, :, stripe] = torch.tensor([0.95, 0.55, 0.1])[:, None, None]
    img[:, :, ~stripe] = torch.tensor([0.1, 0.2, 0.6])[:, None, None]
    return img


def test_optimize_weights_free_reduces_loss_and_applies_as_edit(field, tmp_path):
    from safetensors.torch import save_file

    cfg = StyleOptimizeConfig(steps=10, n_views=4, views_per_step=2, size=24, lr=0.05, step_size=0.25)
    tensors, report = optimize_color_branch(field, _stripes(), cfg, RandomFeatures(0), classes=[BUILDING])
    assert report["loss_after"] < 0.85 * report["loss_before"], report
    assert len(report["history"]) == 10
    assert torch.equal(field.color_mlp.weight, torch.eye(3))  # the field itself is untouched

    tile = tmp_path / "tile"
    save_file(tensors, str(tile.mkdir() or tile / "style.safetensors"))
    stack = EditStack(tile_dir=tile)
    stack.add("restyle", {"class": "building"}, {"method": "optimize", "weights": {"block": "style.safetensors"}})
    stack.save()
    edited = EditedField(field, EditStack.load(tile), ground=PlaneGround(0.0), block_id="block")
    x = torch.tensor([[-8.0, -6.0, 9.9], [10.0, -15.0, -0.1]])  # a roof, the ground
    d, app = torch.tensor([[0.0, 0.0, -1.0]]).expand(2, 3), torch.zeros(2, 4)
    styled = with_color_branch(field, tensors)
    geo = field.density(x)[1]
    got = edited.samples(x, d, app).rgb
    assert torch.allclose(got[0], styled.color(geo, d, app)[0], atol=1e-6)
    assert not torch.allclose(got[0], field.color(geo, d, app)[0], atol=1e-3)
    assert torch.equal(got[1], field.color(geo, d, app)[1])  # not a building: unchanged
    bad = EditStack(tile_dir=tile)
    bad.add("restyle", None, {"method": "optimize", "weights": {"block": "missing.safetensors"}})
    with pytest.raises(CitygenError, match="missing.safetensors"):
        EditedField(field, bad, ground=PlaneGround(0.0), block_id="block")


def test_vgg16_weights_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512), (512, 512),
             (512, 512)]
    index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (ci, co) in zip(index, convs):
        tensors[f"features.{i}.weight"] = torch.randn(co, ci, 3, 3, generator=g) * (2.0 / (9 * ci)) ** 0.5
        tensors[f"features.{i}.bias"] = torch.zeros(co)
    save_file(tensors, str(tmp_path / "vgg16.safetensors"))
    net = VGG16Features(tmp_path / "vgg16.safetensors")
    taps = net(torch.rand(1, 3, 32, 32))
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512] and [t.shape[-1] for t in taps] == [32, 16, 8, 4]
    assert torch.equal(net.features[21].weight, tensors["features.21.weight"])
    del tensors["features.19.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CitygenError, match="broken.safetensors.*features.19.weight"):
        VGG16Features(tmp_path / "broken.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CitygenError, match="junk.safetensors"):
        VGG16Features(tmp_path / "junk.safetensors")


def test_style_cli_on_a_trained_run(tmp_path, reference, capsys):
    """Statistics and optimize modes end to end on a (small, untrained) CityField checkpoint."""
    from citygen.config import TrainConfig, to_dict
    from citygen.store.checkpoint import save_checkpoint
    from citygen.store.field import build_field, load_field
    from survey_io.semantics import CLASSES

    cfg = TrainConfig()
    cfg.field.n_levels, cfg.field.log2_hashmap_size, cfg.field.max_resolution = 2, 10, 16
    cfg.field.hidden_dim, cfg.field.appearance_dim, cfg.field.backend = 16, 4, "torch"
    cfg.render.grid_resolution = 8
    torch.manual_seed(0)
    aabb = np.array([[-10.0, -10.0, -2.0], [10.0, 10.0, 6.0]])
    f = build_field(cfg, aabb, 2, len(CLASSES), torch.zeros(2, 3), torch.device("cpu"))
    tile = tmp_path / "run"
    save_checkpoint(tile / "checkpoints", 1, {f"model.{k}": v for k, v in f.state_dict().items()},
                    {"config": to_dict(cfg), "aabb": aabb.tolist(), "classes": list(CLASSES),
                     "image_names": ["a", "b"], "optimizer": {"type": "Adam", "groups": []},
                     "georef": {"crs": "EPSG:32651", "origin": [354281.0, 3456101.0, 14.0]}})
    assert entrypoint(["style", str(tile), "--reference", str(reference[0])]) == 0
    edit = EditStack.load(tile).edits[0]
    assert edit["params"]["method"] == "stats" and edit["params"]["transforms"]
    from citygen.style import add_style

    edit = add_style(tile, reference=reference[0], method="optimize",
                     optimize_config=StyleOptimizeConfig(steps=1, n_views=2, views_per_step=1, size=12))
    assert EditStack.load(tile).edits[1] == edit
    rel = edit["params"]["weights"]["block"]
    assert (tile / rel).is_file() and rel.startswith("edits/")
    field, _ = load_field(tile)
    from citygen.edit import tile_field_wrapper

    wrapped = tile_field_wrapper(tile)("block", field)
    out = render_image(wrapped, Camera(width=8, height=8, fl_x=8.0, fl_y=8.0, cx=4.0, cy=4.0),
                       look_at(np.array([0.0, 0.0, 20.0]), np.zeros(3)), render=RenderConfig(step_size=0.5))
    assert out["rgb"].shape == (8, 8, 3) and bool(torch.isfinite(out["rgb"]).all())
    # every renderer opened on the tile applies its stack: TileRenderer.open equals the wrapper
    # path above, and differs from the trained weights (apply_edits=False)
    from citygen.render.tile import TileRenderer

    cam, c2w = Camera(width=8, height=8, fl_x=8.0, fl_y=8.0, cx=4.0, cy=4.0), look_at(np.array([0.0, 0.0, 20.0]), np.zeros(3))
    styled = TileRenderer.open(tile).render_view(cam, c2w)["rgb"]
    plain = TileRenderer.open(tile, apply_edits=False).render_view(cam, c2w)["rgb"]
    plain_direct = render_image(field, cam, c2w, render=RenderConfig(step_size=0.5))["rgb"]
    assert (styled - plain).abs().max() > 1e-3
    assert (plain - plain_direct).abs().max() < 0.05
    capsys.readouterr()
    assert entrypoint(["style", str(tile), "--reference", str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg" in capsys.readouterr().err
