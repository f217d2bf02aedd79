"""LPIPS (vgg, v0.1): against an independent numpy re-implementation of the published
definition, its metric properties, weights-file errors, the converter from the official
.pth files, and LPIPS in the held-out evaluation and on the command line.

The weights are random with VGG16's real shapes (the real ImageNet VGG16 is not shipped
and never downloaded), which exercises exactly the code path of the real weights."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from boxscene import make_box_survey
from PIL import Image
from safetensors.torch import save_file

from citygen.cli import entrypoint
from citygen.config import load_config
from citygen.errors import CitygenError
from citygen.nets.lpips import CHANNELS, ENV_WEIGHTS, LPIPS, lpips_distance
from citygen.nets.lpips_convert import convert_lpips_weights
from citygen.nets.vgg16 import VGG16Features
from citygen.train import evaluate, train_block
from survey_io import read_transforms

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parents[1]
# torchvision's vgg16 ``features`` indices of the conv layers, grouped by the LPIPS tap they end at
STAGES = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
WIDTHS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512), (512, 512),
          (512, 512), (512, 512), (512, 512), (512, 512)]


def random_vgg(seed: int = 0) -> dict[str, torch.Tensor]:
    """Real-shaped VGG16 conv tensors (He-initialised, small biases), torchvision's names."""
    g = torch.Generator().manual_seed(seed)
    index = [i for stage in STAGES for i in stage]
    out = {}
    for i, (ci, co) in zip(index, WIDTHS):
        out[f"features.{i}.weight"] = torch.randn(co, ci, 3, 3, generator=g) * (2.0 / (9 * ci)) ** 0.5
        out[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.05
    return out


def random_lins(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.weight": torch.rand(1, c, 1, 1, generator=g) * 0.2 for k, c in enumerate(CHANNELS)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file({**random_vgg(), **random_lins()}, str(path), metadata={"net": "vgg", "version": "0.1"})
    return path


@pytest.fixture(scope="module")
def model(weights) -> LPIPS:
    return LPIPS(weights)


# -- an independent reference: numpy, float64, convolution as a sum over the 9 kernel taps ----
def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    c, h, wd = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((w.shape[0], h * wd))
    for dy in range(3):
        for dx in range(3):
            # einsum, not BLAS: a tiny product, and BLAS threads spin on a busy machine
            out += np.einsum("oi,ip->op", w[:, :, dy, dx], p[:, dy:dy + h, dx:dx + wd].reshape(c, h * wd))
    return out.reshape(-1, h, wd) + b[:, None, None]


def _maxpool2(x: np.ndarray) -> np.ndarray:
    c, h, w = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))


@functools.lru_cache(maxsize=2)
def _float64_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


def reference_lpips(a: np.ndarray, b: np.ndarray, path: Path) -> float:
    """LPIPS-vgg v0.1 of (H, W, 3) images in [0, 1], from the paper / the lpips package's definition."""
    t = _float64_weights(path)
    shift, scale = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])

    def taps(img):
        v = ((2.0 * img - 1.0) - shift) / scale
        v = v.transpose(2, 0, 1)
        out = []
        for s, stage in enumerate(STAGES):
            if s:
                v = _maxpool2(v)
            for i in stage:
                v = np.maximum(_conv3x3(v, t[f"features.{i}.weight"], t[f"features.{i}.bias"]), 0.0)
            out.append(v)
        return out

    total = 0.0
    for k, (fa, fb) in enumerate(zip(taps(a.astype(np.float64)), taps(b.astype(np.float64)))):
        na = fa / (np.sqrt((fa ** 2).sum(axis=0)) + 1e-10)
        nb = fb / (np.sqrt((fb ** 2).sum(axis=0)) + 1e-10)
        per_pixel = np.einsum("c,chw->hw", t[f"lin{k}.weight"].reshape(-1), (na - nb) ** 2)
        total += per_pixel.mean()
    return float(total)


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth test image with edges: gradients, a disc and a bar."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.5 + 0.3 * np.sin(6 * x + 3 * y + seed)], -1)
    img[(x - 0.55) ** 2 + (y - 0.4) ** 2 < 0.04] = (0.9, 0.2, 0.1)
    img[(np.abs(y - 0.7) < 0.06)] *= 0.4
    return np.clip(img, 0, 1)


def as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).float()


def test_matches_the_independent_reference(model, weights):
    rng = np.random.default_rng(0)
    # odd sizes: the pools floor (24 -> 12 -> 6 -> 3 -> 1, 20 -> 10 -> 5 -> 2 -> 1)
    a = scene(20, 24)
    b = np.clip(a + 0.08 * rng.normal(size=a.shape), 0, 1)
    c = rng.random(a.shape)
    for x, y in ((a, b), (a, c), (b, c)):
        expected = reference_lpips(x, y, weights)
        assert expected > 0.01
        assert lpips_distance(model, as_tensor(x), as_tensor(y)) == pytest.approx(expected, abs=1e-5)
    # a batch is scored view by view
    batch = model(torch.stack([as_tensor(a), as_tensor(a)]).permute(0, 3, 1, 2),
                  torch.stack([as_tensor(b), as_tensor(c)]).permute(0, 3, 1, 2))
    assert batch.tolist() == pytest.approx([reference_lpips(a, b, weights), reference_lpips(a, c, weights)], abs=1e-5)


def test_identity_symmetry_and_growth_with_noise(model):
    a = as_tensor(scene(32, 40))
    assert lpips_distance(model, a, a) == 0.0
    noise = torch.from_numpy(np.random.default_rng(1).normal(size=a.shape)).float()
    noisy = (a + 0.1 * noise).clamp(0, 1)
    assert lpips_distance(model, a, noisy) == pytest.approx(lpips_distance(model, noisy, a), rel=1e-6)
    scores = [lpips_distance(model, a, (a + s * noise).clamp(0, 1)) for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(lo < hi for lo, hi in zip(scores, scores[1:])), scores
    with pytest.raises(CitygenError, match="at least 16x16"):
        lpips_distance(model, a[:12, :12], a[:12, :12])


def test_bad_weight_files_name_the_file_and_the_problem(tmp_path, weights):
    good = {**random_vgg(), **random_lins()}

    def write(name, tensors, metadata=None):
        path = tmp_path / name
        save_file(tensors, str(path), metadata=metadata)
        return path

    with pytest.raises(CitygenError, match="missing.safetensors.*unreadable"):
        LPIPS(tmp_path / "missing.safetensors")
    data = weights.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CitygenError, match="truncated.safetensors.*unreadable"):
        LPIPS(tmp_path / "truncated.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(CitygenError, match="junk.safetensors"):
        LPIPS(tmp_path / "junk.safetensors")
    # a style-only VGG16 file (convs up to relu4_3) lacks relu5_3's convs
    style_only = {k: v for k, v in good.items() if not k.startswith(("features.24", "features.26", "features.28"))}
    with pytest.raises(CitygenError, match="vgg_only.safetensors.*features.24.weight"):
        LPIPS(write("vgg_only.safetensors", style_only))
    with pytest.raises(CitygenError, match="no_lin.safetensors.*lin3.weight.*convert_lpips_weights"):
        LPIPS(write("no_lin.safetensors", {k: v for k, v in good.items() if k != "lin3.weight"}))
    with pytest.raises(CitygenError, match=r"lin_shape.safetensors.*lin1.weight has shape \(1, 64, 1, 1\)"):
        LPIPS(write("lin_shape.safetensors", {**good, "lin1.weight": torch.rand(1, 64, 1, 1)}))
    with pytest.raises(CitygenError, match="negative.safetensors.*lin0.weight.*non-negative"):
        LPIPS(write("negative.safetensors", {**good, "lin0.weight": -torch.rand(1, 64, 1, 1)}))
    with pytest.raises(CitygenError, match=r"conv_shape.safetensors.*features.5.weight has shape"):
        LPIPS(write("conv_shape.safetensors", {**good, "features.5.weight": torch.zeros(128, 32, 3, 3)}))
    with pytest.raises(CitygenError, match="alex.safetensors.*net='alex'"):
        LPIPS(write("alex.safetensors", good, {"net": "alex", "version": "0.1"}))


def test_style_vgg_reads_an_lpips_file(weights, model):
    """One VGG16 implementation: the style loss's trunk loads the LPIPS file's convs."""
    net = VGG16Features(weights)
    assert len(net.features) == 23  # up to relu4_3
    assert torch.equal(net.features[21].weight, model.net.features[21].weight)


# -- converter -----------------------------------------------------------------------------------
def _official_files(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    """Stand-ins for vgg16-397923af.pth (real conv shapes, a small fake classifier) and lpips'
    v0.1 vgg.pth (its key names)."""
    vgg = {**random_vgg(3), "classifier.0.weight": torch.zeros(8, 4), "classifier.0.bias": torch.zeros(8)}
    lin = {f"lin{k}.model.1.weight": w for k, w in enumerate(random_lins(4).values())}
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    return tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth", vgg, lin


def test_converter_maps_the_official_files(tmp_path):
    vgg_path, lin_path, vgg, lin = _official_files(tmp_path)
    out = tmp_path / "out" / "lpips_vgg.safetensors"
    info = convert_lpips_weights(vgg_path, lin_path, out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == {k for k in vgg if k.startswith("features.")} | {f"lin{k}.weight" for k in range(5)}
    for k in keys:
        source = vgg[k] if k.startswith("features.") else lin[k.replace(".weight", ".model.1.weight")]
        assert torch.equal(tensors[k], source), k
    assert meta["vgg_sha256"] == hashlib.sha256(vgg_path.read_bytes()).hexdigest() == info["vgg_sha256"]
    assert meta["lin_sha256"] == hashlib.sha256(lin_path.read_bytes()).hexdigest()
    assert (meta["format"], meta["net"], meta["version"]) == ("citygen.lpips", "vgg", "0.1")
    m = LPIPS(out)
    assert m.describe()["lin_source"] == "vgg.pth" and m.describe()["weights"] == str(out)
    assert [p.name for p in out.parent.iterdir()] == ["lpips_vgg.safetensors"]  # no temp files left


def test_converter_errors(tmp_path):
    vgg_path, lin_path, vgg, lin = _official_files(tmp_path)
    out = tmp_path / "out.safetensors"

    def save(name, obj):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    with pytest.raises(CitygenError, match="nothere.pth.*unreadable"):
        convert_lpips_weights(tmp_path / "nothere.pth", lin_path, out)
    data = vgg_path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CitygenError, match="cut.pth.*unreadable"):
        convert_lpips_weights(tmp_path / "cut.pth", lin_path, out)
    with pytest.raises(CitygenError, match="tensor.pth.*expected a state dict"):
        convert_lpips_weights(vgg_path, save("tensor.pth", torch.zeros(3)), out)
    with pytest.raises(CitygenError, match="swapped.pth.*features.0.weight.*missing"):
        convert_lpips_weights(save("swapped.pth", lin), lin_path, out)
    with pytest.raises(CitygenError, match="empty.pth.*lin0.model.1.weight.*missing"):
        convert_lpips_weights(vgg_path, save("empty.pth", {}), out)
    wrong = {**vgg, "features.28.weight": torch.zeros(512, 256, 3, 3)}
    with pytest.raises(CitygenError, match=r"wrong.pth.*features.28.weight has shape \(512, 256, 3, 3\)"):
        convert_lpips_weights(save("wrong.pth", wrong), lin_path, out)
    with pytest.raises(CitygenError, match="bn.pth.*vgg16_bn"):
        convert_lpips_weights(save("bn.pth", {**vgg, "features.1.running_mean": torch.zeros(64)}), lin_path, out)
    negative = {**lin, "lin2.model.1.weight": -lin["lin2.model.1.weight"]}
    with pytest.raises(CitygenError, match="neg.pth.*lin2.model.1.weight.*negative"):
        convert_lpips_weights(vgg_path, save("neg.pth", negative), out)
    assert not out.exists()
    # the script: one line naming the file, exit status 2
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_lpips_weights.py"), "--vgg",
                          str(tmp_path / "cut.pth"), "--lin", str(lin_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "cut.pth" in run.stderr and "Traceback" not in run.stderr


# -- evaluation and command line -------------------------------------------------------------------
@pytest.fixture(scope="module")
def box_survey(tmp_path_factory) -> Path:
    return make_box_survey(tmp_path_factory.mktemp("boxes"), n_train=4, n_test=2)


def _tiny_cfg(**extra):
    return load_config("tiny", {"field.n_levels": 3, "field.log2_hashmap_size": 10, "field.max_resolution": 32,
                                "field.hidden_dim": 16, "field.semantic_hidden_dim": 16, "field.backend": "torch",
                                "render.step_size": 1.0, "render.grid_resolution": 8, "steps": 2,
                                "rays_per_batch": 32, "log_every": 1, "eval_at_end": False, "threads": 1, **extra})


@pytest.fixture(scope="module")
def run(box_survey, tmp_path_factory):
    """A barely trained run (2 steps): LPIPS is scored on whatever it renders."""
    return train_block(_tiny_cfg(), box_survey, tmp_path_factory.mktemp("run"), progress=False)


def test_evaluate_reports_lpips_of_the_written_pngs(box_survey, run, tmp_path, weights, model):
    report = evaluate(run.checkpoint, box_survey, tmp_path / "eval", lpips_weights=weights)
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["lpips"]["weights"] == str(weights) and saved["lpips"]["net"] == "vgg"
    survey = read_transforms(box_survey)
    assert [v["name"] for v in saved["views"]] == survey.test_names
    for i, view in enumerate(saved["views"]):
        rendered = np.asarray(Image.open(tmp_path / "eval" / f"{Path(view['name']).stem}_rgb.png")) / 255.0
        gt = np.asarray(Image.open(box_survey.parent / view["name"]).convert("RGB")) / 255.0
        assert view["lpips"] == pytest.approx(lpips_distance(model, as_tensor(rendered), as_tensor(gt)), abs=1e-6)
        if i == 0:  # and once against the numpy reference
            assert view["lpips"] == pytest.approx(reference_lpips(rendered, gt, weights), abs=1e-5)
    assert saved["mean"]["lpips"] == pytest.approx(np.mean([v["lpips"] for v in saved["views"]]))
    assert saved["lpips"]["mean"] == saved["mean"]["lpips"] and report["mean"] == saved["mean"]
    without = evaluate(run.checkpoint, box_survey, tmp_path / "eval2", write_images=False)
    assert without["lpips"] is None and "lpips" not in without["mean"] and "--lpips-weights" in without["lpips_note"]
    assert without["mean"]["psnr"] == pytest.approx(report["mean"]["psnr"])


def test_bad_lpips_weights_fail_before_training(box_survey, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CitygenError, match="bad.safetensors"):
        train_block(_tiny_cfg(eval_at_end=True), box_survey, tmp_path / "run", progress=False, lpips_weights=bad)
    assert not (tmp_path / "run" / "checkpoints").exists()
    args = ["train", "--data", str(box_survey), "--out", str(tmp_path / "cli"), "--steps", "2"]
    assert entrypoint([*args, "--lpips-weights", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err and not (tmp_path / "cli").exists()
    monkeypatch.setenv(ENV_WEIGHTS, str(tmp_path / "from_env.safetensors"))
    assert entrypoint(args) == 2
    assert "from_env.safetensors" in capsys.readouterr().err
    assert entrypoint(["render", str(tmp_path / "no_tile"), "--out", str(tmp_path / "r")]) == 2
    assert "from_env.safetensors" in capsys.readouterr().err


def test_render_command_scores_lpips(box_survey, run, tmp_path, weights, model, capsys):
    """`citygen render` on a training run (a one-block tile) with --lpips-weights."""
    out = tmp_path / "renders"
    assert entrypoint(["render", str(run.out), "--out", str(out), "--data", str(box_survey),
                       "--lpips-weights", str(weights)]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lpips"]["weights"] == str(weights)
    for view in metrics["views"]:
        rendered = np.asarray(Image.open(out / f"{Path(view['name']).stem}_rgb.png")) / 255.0
        gt = np.asarray(Image.open(box_survey.parent / view["name"]).convert("RGB")) / 255.0
        assert view["lpips"] == pytest.approx(lpips_distance(model, as_tensor(rendered), as_tensor(gt)), abs=1e-6)
    assert printed["mean"]["lpips"] == pytest.approx(np.mean([v["lpips"] for v in metrics["views"]]))
