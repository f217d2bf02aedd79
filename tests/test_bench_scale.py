"""`citygen bench scale`'s machinery: the log-log fit against closed forms, a failing stage
reported in one line, bad options refused (the chain itself runs in `citygen bench scale`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from citygen.bench_scale import fit_exponent, run_stage
from citygen.errors import CitygenError


def test_fit_recovers_an_exact_power_law():
    x = [0.1, 0.25, 1.0, 4.0]
    fit = fit_exponent(x, [3.0 * v ** 1.5 for v in x])
    assert fit["k"] == pytest.approx(1.5, abs=1e-9) and fit["c"] == pytest.approx(3.0, rel=1e-9)
    assert fit["rms_log10"] < 1e-9 and fit["points"] == 4


def test_fit_is_least_squares_on_log_log():
    rng = np.random.default_rng(0)
    x = np.array([0.1, 0.25, 1.0, 4.0])
    y = 20.0 * x ** 0.8 * np.exp(rng.normal(0, 0.3, 4))
    lx, ly = np.log10(x), np.log10(y)
    # closed form of the least-squares slope and intercept
    k = ((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()
    b = ly.mean() - k * lx.mean()
    fit = fit_exponent(x, y)
    assert fit["k"] == pytest.approx(k, abs=1e-12) and fit["c"] == pytest.approx(10 ** b, rel=1e-12)
    assert fit["rms_log10"] == pytest.approx(np.sqrt(np.mean((ly - k * lx - b) ** 2)), abs=1e-12)


def test_fit_needs_two_distinct_positive_points():
    assert fit_exponent([1.0], [2.0]) is None
    assert fit_exponent([1.0, 1.0], [2.0, 3.0]) is None
    assert fit_exponent([1.0, 2.0], [0.0, 3.0]) is None


def test_failing_stage_is_one_line(tmp_path):
    with pytest.raises(CitygenError) as err:
        run_stage("plan", {"root": str(tmp_path), "block_size": 250.0}, tmp_path / "stage_plan.json", timeout_s=300)
    assert "stage plan failed" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "stage_plan.json").exists()


def test_bench_scale_rejects_bad_area(tmp_path):
    result = subprocess.run([sys.executable, "-m", "citygen.cli", "bench", "scale", "--scale-dir", str(tmp_path),
                             "--scale-areas", "0.1", "-1"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "--scale-areas -1" in result.stderr and "Traceback" not in result.stderr


def test_finished_stage_is_reused_only_with_the_same_arguments(tmp_path):
    import json

    out = tmp_path / "stage_plan.json"
    args = {"root": str(tmp_path), "block_size": 250.0}
    out.write_text(json.dumps({"stage": "plan", "seconds": 1.0, "process_s": 3.0, "args": args, "blocks": 4}))
    assert run_stage("plan", args, out)["reused"] is True        # no process: the plan would fail here
    with pytest.raises(CitygenError):
        run_stage("plan", {**args, "block_size": 500.0}, out, timeout_s=300)


def test_affine_fit_recovers_a_fixed_cost_plus_a_cost_per_unit():
    from citygen.bench_scale import fit_affine

    fit = fit_affine([4, 6, 12, 30], [85.0 + 15.0 * b for b in (4, 6, 12, 30)])
    assert fit["a"] == pytest.approx(85.0, abs=1e-9) and fit["b"] == pytest.approx(15.0, rel=1e-12)
    # a negative intercept is not a cost: the least-squares line through the origin instead
    x, y = np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 8.0])
    fit = fit_affine(x, y)
    assert fit["a"] == 0.0 and fit["b"] == pytest.approx((x * y).sum() / (x * x).sum(), rel=1e-12)
    # no growth: a constant, the mean
    fit = fit_affine([1.0, 2.0], [5.0, 3.0])
    assert fit["a"] == pytest.approx(4.0) and fit["b"] == 0.0
    # one size run: proportional
    assert fit_affine([2.0, 2.0], [4.0, 6.0]) == {"a": 0.0, "b": 2.5, "points": 2}
    assert fit_affine([], []) is None and fit_affine([0.0, 1.0], [1.0, 2.0]) is None


def test_affine_extrapolation_is_not_below_the_power_law_through_two_points():
    """Why the estimate is affine: through two small sizes of fixed + linear cost, the power law
    bends below the truth at 7.5x the size, the affine fit is exact."""
    from citygen.bench_scale import fit_affine

    t = [85.0 + 15.0 * b for b in (4, 6)]
    power, affine = fit_exponent([4, 6], t), fit_affine([4, 6], t)
    truth = 85.0 + 15.0 * 30
    assert power["c"] * 30 ** power["k"] < 0.75 * truth
    assert affine["a"] + affine["b"] * 30 == pytest.approx(truth, rel=1e-12)


def test_views_to_render_are_evenly_spaced_and_per_block():
    from citygen.bench_scale import views_to_render

    names = [f"v{i:03d}" for i in range(228)]
    chosen = views_to_render(names, 30, per_block=2)
    assert len(chosen) == 60 == len(set(chosen)) and chosen[0] == "v000" and chosen[-1] == "v227"
    steps = np.diff([int(n[1:]) for n in chosen])
    assert steps.min() >= 3 and steps.max() <= 4          # 227 / 59 = 3.85 apart
    # 8 of 9: the indices round(k * 8 / 7), k = 0..7
    assert views_to_render(names[:9], 4, per_block=2) == [names[i] for i in (0, 1, 2, 3, 5, 6, 7, 8)]
    assert views_to_render(names[:5], 4, per_block=2) == names[:5]


def test_export_driver_is_the_export_grid():
    from citygen.bench_scale import export_cells
    from citygen.export.raster import OrthoGrid

    for area, gsd in ((0.1, 2.0), (0.25, 2.0), (4.0, 2.0), (0.1, 1.0), (1.0, 0.7)):
        half = (area ** 0.5) * 1000.0 / 2
        g = OrthoGrid.covering((-half, -half, half, half), gsd)
        assert export_cells(area, gsd) == g.width * g.height


def test_estimate_of_an_area_not_run_follows_each_stage_driver():
    from citygen.bench_scale import DRIVERS, STAGES, fit_and_estimate, predicted_sizes

    def run(area):
        sizes = predicted_sizes(area)
        # every stage: 3 s fixed + 0.5 s per unit of its driver, 2 s of start-up
        stages = {n: {"seconds": 3.0 + 0.5 * sizes[DRIVERS[n]], "startup_s": 2.0,
                      "process_s": 5.0 + 0.5 * sizes[DRIVERS[n]], "peak_rss_bytes": 1e8} for n in STAGES}
        return {"area_km2": area, "images": sizes["images"], "sizes": sizes, "stages": stages}

    runs = [run(0.1), run(0.25)]
    fits, estimate = fit_and_estimate(runs, (0.1, 1.0))
    assert estimate["0.1"]["measured"] and estimate["0.1"]["stages_s"] == {n: s["process_s"] for n, s in
                                                                          runs[0]["stages"].items()}
    big = predicted_sizes(1.0)
    for n in STAGES:
        assert estimate["1"]["stages_s"][n] == pytest.approx(5.0 + 0.5 * big[DRIVERS[n]], rel=1e-9), n
        assert fits[n]["affine_vs_driver"]["a"] == pytest.approx(3.0, abs=1e-6)
        assert estimate["1"]["idle_stages_s"][n] == estimate["1"]["stages_s"][n]     # no CPU time recorded
    # a stage that got 40 % of a core: its idle time is 40 % of its wall time
    for r in runs:
        r["stages"]["export"]["cpu_s"] = 0.4 * r["stages"]["export"]["seconds"]
    _, estimate = fit_and_estimate(runs, (1.0,))
    assert estimate["1"]["idle_stages_s"]["export"] == pytest.approx(0.4 * estimate["1"]["stages_s"]["export"])
    assert estimate["1"]["idle_total_s"] == pytest.approx(
        estimate["1"]["total_s"] - 0.6 * estimate["1"]["stages_s"]["export"])


def test_training_estimate_is_per_block_fixed_plus_per_image():
    from citygen.bench_scale import DRIVERS, STAGES, fit_and_estimate, predicted_sizes

    def run(area, images_per_block):
        sizes = predicted_sizes(area)
        stages = {n: {"seconds": 3.0 + 0.5 * sizes[DRIVERS[n]], "startup_s": 2.0,
                      "process_s": 5.0 + 0.5 * sizes[DRIVERS[n]], "peak_rss_bytes": 1e8} for n in STAGES}
        # each block: 7 s fixed + 0.1 s per training image; 4 s of the stage outside the blocks
        walls = [{"id": str(i), "images": n, "seconds": 7.0 + 0.1 * n} for i, n in enumerate(images_per_block)]
        stages["train"].update(per_block=walls, seconds=4.0 + sum(w["seconds"] for w in walls))
        return {"area_km2": area, "images": sizes["images"], "sizes": sizes, "stages": stages}

    runs = [run(0.1, [40, 10, 60, 15]), run(0.25, [19, 75, 28, 35, 126, 50])]
    fits, estimate = fit_and_estimate(runs, (4.0,))
    assert fits["train"]["per_block"]["a"] == pytest.approx(7.0) and fits["train"]["per_block"]["b"] == pytest.approx(0.1)
    big = predicted_sizes(4.0)
    assert big["pairs"] > big["blocks"] * 126      # interior blocks see more images than the small tiles' any
    assert estimate["4"]["stages_s"]["train"] == pytest.approx(4.0 + 7.0 * big["blocks"] + 0.1 * big["pairs"] + 2.0)
