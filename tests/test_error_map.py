"""Error-guided pixel sampling: cell lookup, sampling in proportion to the error map, the
running-mean update -- each against closed-form expectations."""

from __future__ import annotations

import pytest
import torch

from citygen.train.error_map import ErrorMap

# two images whose sizes are not multiples of the cell: clipped cells at the right and bottom
SIZES = [(10, 7), (5, 9)]


def _pixel(image: int, row: int, col: int) -> int:
    offset = sum(w * h for w, h in SIZES[:image])
    return offset + row * SIZES[image][0] + col


def test_cells_of_pixels():
    em = ErrorMap(SIZES, cell=4)
    # image 0: 3 x 2 cells; image 1: 2 x 3 cells
    assert em.error.numel() == 3 * 2 + 2 * 3
    cases = {(0, 0, 0): 0, (0, 3, 3): 0, (0, 0, 4): 1, (0, 6, 9): 5, (0, 4, 0): 3,
             (1, 0, 0): 6, (1, 8, 4): 6 + 2 * 2 + 1, (1, 4, 3): 6 + 2}
    idx = torch.tensor([_pixel(*k) for k in cases])
    assert em.cells_of(idx).tolist() == list(cases.values())


def test_sampling_follows_the_error():
    em = ErrorMap(SIZES, cell=4)
    em.error.zero_()
    em.error[5] = 1.0     # image 0's bottom-right cell: rows 4..6, cols 8..9 (clipped)
    em.error[11] = 3.0    # image 1's bottom-right cell: rows 8, cols 4 (one pixel)
    g = torch.Generator().manual_seed(0)
    idx = em.sample(20000, fraction=1.0, generator=g)
    cells = em.cells_of(idx)
    assert set(cells.unique().tolist()) == {5, 11}
    share = (cells == 11).float().mean().item()
    assert abs(share - 0.75) < 0.015
    # every pixel of the clipped cell is drawn, nothing outside it
    in5 = idx[cells == 5]
    expected = {_pixel(0, r, c) for r in range(4, 7) for c in range(8, 10)}
    assert set(in5.tolist()) == expected
    assert set(idx[cells == 11].tolist()) == {_pixel(1, 8, 4)}


def test_uniform_share_covers_every_pixel():
    em = ErrorMap(SIZES, cell=4)
    em.error.zero_()
    em.error[0] = 1.0
    g = torch.Generator().manual_seed(1)
    idx = em.sample(4000, fraction=0.25, generator=g)
    assert idx.numel() == 4000 and int(idx.min()) >= 0 and int(idx.max()) < em.n_pixels
    # 3000 uniform draws over 115 pixels reach all of them; the rest all land in cell 0
    assert idx.unique().numel() == em.n_pixels
    assert (em.cells_of(idx) == 0).sum().item() >= 1000


def test_update_is_a_running_mean_per_cell():
    em = ErrorMap(SIZES, cell=4, decay=0.75)
    idx = torch.tensor([_pixel(0, 0, 0), _pixel(0, 1, 1), _pixel(1, 8, 4)])
    em.update(idx, torch.tensor([0.2, 0.6, 0.0]))
    expected = torch.ones(em.error.numel())
    expected[0] = 0.75 * 1.0 + 0.25 * 0.4    # one observation: the mean of the cell's two rays
    expected[11] = 0.75 * 1.0 + 0.25 * 0.0
    torch.testing.assert_close(em.error, expected)


def test_state_round_trip_and_mismatch():
    em = ErrorMap(SIZES, cell=4)
    em.error.uniform_()
    other = ErrorMap(SIZES, cell=4)
    other.load_state_dict(em.state_dict())
    assert torch.equal(other.error, em.error)
    with pytest.raises(ValueError, match="cells"):
        ErrorMap(SIZES, cell=2).load_state_dict(em.state_dict())
