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
