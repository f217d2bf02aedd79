"""`citygen demo`'s training progress, read from the blocks' metrics logs (the demo itself takes
10-15 minutes and is run by hand; see README)."""

from __future__ import annotations

import io
import json

from rich.console import Console

from citygen import demo


def _log(path, steps_psnr):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "psnr_train": p, "time": 1.0}) + "\n"
                                                for s, p in steps_psnr))


def test_demo_trains_fixed_steps_without_a_time_cap(tmp_path, monkeypatch):
    """The demo's training is a fixed step count, seeded, with the tiny preset's time cap removed."""
    import citygen.tile
    from citygen.config import load_config

    seen = {}

    class Result:
        blocks = {}

        def raise_for_failures(self):
            pass

    def fake_train_tile(tile, data, config, executor, overrides):
        seen.update(config=config, executor=executor, overrides=overrides)
        return Result()

    monkeypatch.setattr(citygen.tile, "train_tile", fake_train_tile)
    demo._train(tmp_path, tmp_path / "transforms.json", 2100, 7, 4, Console(file=io.StringIO()))
    cfg = load_config(seen["config"], seen["overrides"])
    assert (cfg.steps, cfg.max_seconds, cfg.seed) == (2100, 0.0, 7)
    assert load_config("tiny").max_seconds > 0  # the preset itself keeps its cap for `citygen train`
    assert demo.BLOCK_STEPS == 1300


def test_progress_reads_the_blocks_metrics(tmp_path):
    _log(tmp_path / "block_0_0", [(1000, 20.0), (2100, 23.5)])          # finished
    _log(tmp_path / "block_0_1", [(50, 17.0), (100, 18.25)])            # training now
    # a tile block spends its rays in twice the steps at half the batch (citygen.tile.block_batch):
    # 100 of its 4200 steps are 50 of the demo's 2100 block steps
    (tmp_path / "block_0_1" / "config.json").write_text(json.dumps({"steps": 4200}))
    (tmp_path / "block_1_0").mkdir()                                     # not started
    console = Console(file=io.StringIO(), force_terminal=False)
    progress = demo._TrainProgress(tmp_path, 2100, 4, console)
    assert progress.poll() == (2150, "0_1", {"step": 100, "psnr_train": 18.25, "time": 1.0, "of": 4200})
    progress._t0, progress._done0 = 0.0, 0                               # as if started at time 0
    done, text = progress.status()
    assert done == 2150
    assert text.startswith("block 0_1 step 100/4200, train PSNR 18.25 dB; ") and "steps/s, ETA " in text
    assert demo._clock(367) == "6 min 07 s" and demo._clock(42) == "42 s"
