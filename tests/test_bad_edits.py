"""Bad edits are refused when they are added, not at export: one line naming the file or the
option and the problem, exit status 2, and ``edits.json`` exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from citygen.cli import entrypoint
from citygen.edit import EditStack
from citygen.errors import CitygenError

BOW_TIE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
COLLINEAR = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [3, 3], [0, 0]]]}
HOLE_OUTSIDE = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]],
                                                  [[10, 10], [11, 10], [11, 11], [10, 10]]]}
# a MultiPolygon whose second part crosses itself (each part is checked on its own)
MULTI = {"type": "MultiPolygon", "coordinates": [[[[20, 20], [24, 20], [24, 24], [20, 20]]], BOW_TIE["coordinates"]]}


@pytest.fixture
def tile(tmp_path):
    """A tile folder whose stack already holds one edit (the file the bad adds must not touch)."""
    tile = tmp_path / "tile"
    tile.mkdir()
    assert entrypoint(["edit", str(tile), "add", "--op", "remove", "--class", "vehicle"]) == 0
    return tile


def refused(tile: Path, capsys, argv: list[str], *expected: str) -> str:
    before = (tile / "edits.json").read_bytes()
    capsys.readouterr()
    assert entrypoint(["edit", str(tile), "add", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("citygen: error: "), err
    for text in expected:
        assert text in err, (text, err)
    assert (tile / "edits.json").read_bytes() == before
    return err


@pytest.mark.parametrize("geojson, problem", [
    (BOW_TIE, "self-intersection at (5, 5)"),
    (COLLINEAR, "not a simple polygon"),
    (HOLE_OUTSIDE, "hole lies outside shell at (10, 10)"),
    (MULTI, "polygon 2 of 2 is not a simple polygon: self-intersection at (5, 5)"),
])
def test_invalid_polygon_refused_naming_file_and_where(tile, tmp_path, capsys, geojson, problem):
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": geojson}))
    refused(tile, capsys, ["--op", "remove", "--polygon", str(path), "--polygon-crs", "local"], str(path), problem)


def test_invalid_polygon_refused_by_the_library_and_on_load(tile):
    stack = EditStack.load(tile)
    with pytest.raises(CitygenError, match=r"edits\.json: .*self-intersection at \(5, 5\)"):
        stack.add("recolor", {"polygon": BOW_TIE, "crs": "local"}, {"color": [1, 0, 0]})
    # a stack written by hand with the bow tie is refused on load, naming the stack file
    data = json.loads((tile / "edits.json").read_text())
    data["edits"].append({"id": "bad", "op": "remove", "selection": {"polygon": BOW_TIE, "crs": "local"},
                          "params": {}, "enabled": True})
    (tile / "edits.json").write_text(json.dumps(data))
    with pytest.raises(CitygenError, match=r"edits\.json: invalid edit stack: edits\[1\].*self-intersection"):
        EditStack.load(tile)


def _checkpoint(folder: Path) -> None:
    """A small, untrained field checkpoint (loadable: the sidecar and tensors fit its config)."""
    from citygen.config import TrainConfig, to_dict
    from citygen.store.checkpoint import save_checkpoint
    from citygen.store.field import build_field
    from survey_io.semantics import CLASSES

    cfg = TrainConfig()
    cfg.field.n_levels, cfg.field.log2_hashmap_size, cfg.field.base_resolution = 2, 8, 4
    cfg.field.max_resolution, cfg.field.hidden_dim, cfg.field.appearance_dim = 8, 8, 4
    cfg.field.semantic_hidden_dim, cfg.field.backend = 8, "torch"
    cfg.render.grid_resolution = 8
    aabb = [[-2.0, -2.0, 0.0], [2.0, 2.0, 4.0]]
    f = build_field(cfg, torch.tensor(aabb).numpy(), 1, len(CLASSES), torch.tensor([[0.0, 0.0, 10.0]]),
                    torch.device("cpu"))
    meta = {"config": to_dict(cfg), "aabb": aabb, "classes": list(CLASSES), "image_names": ["a.png"],
            "optimizer": {"type": "Adam", "groups": []}}
    save_checkpoint(folder / "checkpoints", 1, {f"model.{k}": v for k, v in f.state_dict().items()}, meta)


INSERT = ["--op", "insert", "--source-box", "-1,-1,0,1,1,3", "--anchor", "0,0,0", "--anchor-local"]


def test_insert_asset_checked_when_added(tile, tmp_path, capsys):
    refused(tile, capsys, [*INSERT, "--asset", "assets/tower"], str(tile / "assets" / "tower"), "not found")
    refused(tile, capsys, [*INSERT, "--asset", "../elsewhere"], "--asset", "escapes the tile folder")
    # a link out of the tile folder is refused like a '..' path
    outside = tmp_path / "outside"
    _checkpoint(outside)
    (tile / "assets").mkdir()
    (tile / "assets" / "link").symlink_to(outside)
    refused(tile, capsys, [*INSERT, "--asset", "assets/link"], "assets/link", "escapes the tile folder")
    # a folder without a checkpoint, and a checkpoint whose tensor file is cut short
    (tile / "assets" / "empty").mkdir()
    refused(tile, capsys, [*INSERT, "--asset", "assets/empty"], "assets/empty", "no checkpoint found")
    _checkpoint(tile / "assets" / "cut")
    tensors = next((tile / "assets" / "cut" / "checkpoints").glob("*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    refused(tile, capsys, [*INSERT, "--asset", "assets/cut"], tensors.name, "truncated or corrupt")
    # a loadable checkpoint inside the tile is accepted
    _checkpoint(tile / "assets" / "tower")
    assert entrypoint(["edit", str(tile), "add", *INSERT, "--asset", "assets/tower"]) == 0
    assert [e["op"] for e in EditStack.load(tile).edits] == ["remove", "insert"]


@pytest.mark.parametrize("argv, expected", [
    (["--op", "raise", "--box", "0,0,0,5,5,20", "--dz", "5000"], ("--dz", "outside [-1000, 1000]")),
    (["--op", "raise", "--dz", "3", "--params", '{"dzz": 1}'], ("--params", "unknown param 'dzz' for raise")),
    (["--op", "recolor", "--color", "1,0,0", "--params", '{"strenght": 0.5}'], ("--params", "'strenght'")),
    (["--op", "remove", "--box", "5,5,5,0,0,0"], ("--box", "min must be below max")),
    (["--op", "remove", "--height", "3,1"], ("--height", "height range")),
    (["--op", "remove", "--class", "vehicel"], ("--class", "unknown class 'vehicel'")),
    (["--op", "remove", "--class", ""], ("--class", "unknown class ''")),  # not "no selection": everything
    (["--op", "remove", "--box", ""], ("--box", "needs 6 comma-separated numbers")),
    (["--op", "explode", "--class", "vehicle"], ("--op", "unknown op 'explode'")),
    (["--op", "scale_height", "--factor", "0", "--box", "0,0,0,1,1,1"], ("--factor", "outside")),
    (["--op", "duplicate", "--offset", "1e6,0,0", "--box", "0,0,0,1,1,1"], ("--offset", "beyond 100 km")),
])
def test_bad_parameters_refused_naming_the_option(tile, capsys, argv, expected):
    refused(tile, capsys, argv, *expected)


def test_ten_thousand_edits_are_accepted(tmp_path):
    """The stack's size limit stays 10,000 edits per list (each edit is cheap to apply now)."""
    stack = EditStack(tile_dir=tmp_path)
    for i in range(10_000):
        stack.edits.append({"id": f"e{i}", "op": "recolor", "selection": {"box": [i, 0, 0, i + 1, 1, 1]},
                            "params": {"color": [1, 0, 0]}, "enabled": True})
    stack.save()
    assert len(EditStack.load(tmp_path).edits) == 10_000
    with pytest.raises(CitygenError, match=r"edits\.json: refusing to write .* 10001 edits \(limit 10000\)"):
        stack.add("recolor", {"box": [0, 0, 0, 1, 1, 1]}, {"color": [1, 0, 0]})
        stack.save()
    assert len(EditStack.load(tmp_path).edits) == 10_000
