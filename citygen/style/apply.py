"""Styles as edits: compute a style for a tile and push it on the tile's edit stack as a
``restyle`` edit (non-destructive, undoable, applied in the field at render time)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from survey_io.atomic import atomic_path
from survey_io.semantics import CLASSES

from ..edit.selection import SpecError, class_ids
from ..edit.stack import EditStack
from ..edit.tile import tile_blocks, tile_field_wrapper
from ..errors import CitygenError
from ..store.layout import edit_file, open_block_field
from .named import named_style
from .optimize import RandomFeatures, StyleOptimizeConfig, VGG16Features, load_reference_image, optimize_color_branch
from .stats import load_reference, match_statistics, scene_colors

# The edit package (and .optimize, which builds on it) is imported in the functions below: edit's
# operations take the colour transforms from citygen.style.color, so citygen.style cannot import
# edit while it loads.  That import circle goes when the colour transforms move below edit
# (issue 14, the edit-operations part).


def _load_blocks(tile_dir: Path, device: str):

    wrap = tile_field_wrapper(tile_dir)
    fields = {}
    for block_id, folder in tile_blocks(tile_dir).items():
        field, _ = open_block_field(folder, device)
        fields[block_id] = (field, wrap(block_id, field))
    return fields


def stats_transforms(fields, reference: Path, labels: Path | None = None, classes: list[str] | None = None,
                     method: str = "mk", space: str = "lab", n: int = 64) -> dict[str, dict]:
    """Per-class transforms (JSON) matching the colours of ``fields`` (field-likes, edits
    applied) to the reference image's."""
    ref_c, ref_l = load_reference(reference, labels)  # first: a bad file fails before any rendering
    cols, labs = [], []
    for f in fields:
        c, lab = scene_colors(f, n=n)
        cols.append(c)
        labs.append(lab)
    ids = None if classes is None else [CLASSES.index(c) for c in classes]
    tr = match_statistics(torch.cat(cols), torch.cat(labs), ref_c, ref_l, ids, method=method, space=space)
    if not tr:
        raise CitygenError(reference, "none of the selected classes is visible enough in the tile to restyle")
    return {k: v.to_dict() for k, v in tr.items()}


def add_style(tile_dir: str | Path, *, named: str | None = None, reference: str | Path | None = None,
              labels: str | Path | None = None, classes: list[str] | None = None, method: str = "stats",
              weights: str | Path | None = None, steps: int = 200, device: str = "cpu",
              optimize_config=None) -> dict:
    """Add a ``restyle`` edit to the tile's stack (and save it); returns the edit.

    Args:
        named: a named style (:data:`citygen.style.named.NAMED_STYLES`), or
        reference: a reference image (with ``labels``, an optional uint8 class-id map of it).
        classes: restrict the style to these class names.
        method: "stats" (per-class colour statistics, Monge-Kantorovich in Lab) or
            "optimize" (fine-tune the colour branch of each block; ``weights``: VGG16
            safetensors for the Gram loss, else the weights-free random features).
        steps: optimisation steps per block (optimize).
        optimize_config: a full :class:`~citygen.style.optimize.StyleOptimizeConfig` (overrides ``steps``).
    """

    tile_dir = Path(tile_dir)
    if (named is None) == (reference is None):
        raise CitygenError(None, "style: give exactly one of a named style or a reference image")
    if classes is not None:
        try:
            class_ids(classes)
        except SpecError as err:
            raise CitygenError(None, f"style: {err}") from None
    stack = EditStack.load(tile_dir)
    if named is not None:
        return _push(stack, {"method": "named", "name": named, "transforms": named_style(named, classes)}, None)
    if method == "stats":
        load_reference(reference, labels)  # fail fast on a bad reference, before loading the blocks
        fields = [edited for _, edited in _load_blocks(tile_dir, device).values()]
        params = {"method": "stats", "reference": Path(reference).name,
                  "transforms": stats_transforms(fields, Path(reference), None if labels is None else Path(labels),
                                                 classes)}
        return _push(stack, params, None)
    if method != "optimize":
        raise CitygenError(None, f"style: unknown method {method!r} (stats, optimize)")
    net = VGG16Features(weights) if weights is not None else RandomFeatures()
    ref = load_reference_image(reference)
    edit_id = stack.new_id("restyle")
    ids = None if classes is None else class_ids(classes)
    files, report = {}, {}
    for block_id, (field, _) in _load_blocks(tile_dir, device).items():
        tensors, rep = optimize_color_branch(field, ref, optimize_config or StyleOptimizeConfig(steps=steps), net, ids)
        rel = edit_file(edit_id, block_id)
        with atomic_path(tile_dir / rel) as tmp:
            save_file(tensors, str(tmp))
        files[block_id] = rel
        report[block_id] = {"loss_before": round(rep["loss_before"], 6), "loss_after": round(rep["loss_after"], 6)}
    params = {"method": "optimize", "reference": Path(reference).name, "weights": files, "report": report,
              "feature_net": "vgg16" if weights is not None else "random"}
    return _push(stack, params, None if classes is None else {"class": list(classes)}, edit_id)


def _push(stack, params, selection, edit_id=None) -> dict:
    edit = stack.add("restyle", selection, params, edit_id=edit_id)
    stack.save()
    return edit


__all__ = ["add_style", "stats_transforms"]
