"""Space-filling-curve token orders (dit_accel.attention.curve): permutation, adjacency, Hilbert blocks, locality."""

import pytest
import torch

from dit_accel.attention.curve import curve_order, gilbert_order, inverse_order, locality

SIZES = [(1, 1), (1, 7), (7, 1), (2, 2), (5, 3), (3, 5), (6, 10), (13, 17), (16, 16), (32, 32), (3, 64), (64, 3)]


def steps(order: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step |dy| and |dx| between consecutive cells of ``order``."""
    y, x = order // width, order % width
    return (y[1:] - y[:-1]).abs(), (x[1:] - x[:-1]).abs()


def needs_diagonal(height: int, width: int) -> bool:
    """Gilbert ends next to its start along the longer side; with the longer side odd and the shorter side even
    (> 2) both corners have the same checkerboard colour, so one diagonal step is unavoidable."""
    longer, shorter = max(height, width), min(height, width)
    return longer % 2 == 1 and shorter % 2 == 0 and shorter > 2


@pytest.mark.parametrize("height,width", SIZES)
def test_permutation(height: int, width: int) -> None:
    order = gilbert_order(height, width)
    assert order.dtype == torch.int64 and order.shape == (height * width,)
    assert torch.equal(order.sort().values, torch.arange(height * width))
    assert int(order[0]) == 0


@pytest.mark.parametrize("height,width", SIZES + [(4, 5), (5, 4), (6, 9), (24, 40), (2, 9)])
def test_adjacency(height: int, width: int) -> None:
    dy, dx = steps(gilbert_order(height, width), width)
    assert bool((torch.maximum(dy, dx) == 1).all()), "every step goes to one of the 8 neighbouring cells"
    diagonal = int((dy + dx != 1).sum())
    assert diagonal == (1 if needs_diagonal(height, width) else 0)


def test_adjacency_sweep() -> None:
    """All sizes up to 24x24: a permutation, 8-neighbour steps, and at most the one unavoidable diagonal step."""
    for height in range(1, 25):
        for width in range(1, 25):
            order = gilbert_order(height, width)
            assert torch.equal(order.sort().values, torch.arange(height * width)), (height, width)
            dy, dx = steps(order, width)
            assert bool((torch.maximum(dy, dx) == 1).all()), (height, width)
            assert int((dy + dx != 1).sum()) == int(needs_diagonal(height, width)), (height, width)


@pytest.mark.parametrize("n", [8, 16, 32])
def test_hilbert_blocks_are_contiguous(n: int) -> None:
    order = gilbert_order(n, n)
    y, x = order // n, order % n
    block = 2
    while block <= n:
        ids = (y // block) * (n // block) + x // block
        changes = int((ids[1:] != ids[:-1]).sum())
        assert changes == (n // block) ** 2 - 1, f"some aligned {block}x{block} block is visited in pieces"
        block *= 2


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40)])
@pytest.mark.parametrize("tile", [16, 64])
def test_locality_beats_raster(height: int, width: int, tile: int) -> None:
    # Measured: 32x32 -> 1.50 vs 4.00 (tile 16), 3.04 vs 8.03 (tile 64); 24x40 -> 1.73 vs 6.40, 3.55 vs 9.80.
    curve = locality(gilbert_order(height, width), height, width, tile)
    raster = locality(torch.arange(height * width), height, width, tile)
    assert curve < 0.6 * raster
    # A tile of k cells is at best a disc of radius sqrt(k/pi), mean distance 2/3 of that; stay within 2x of it.
    assert curve < 2 * (2 / 3) * (tile / torch.pi) ** 0.5


def test_locality_values() -> None:
    # One row of 4 cells: distances 1.5, 0.5, 0.5, 1.5 -> 1.0; a 2x2 block: all sqrt(0.5).
    assert locality(torch.arange(4), 1, 4, 4) == pytest.approx(1.0)
    assert locality(gilbert_order(2, 2), 2, 2, 4) == pytest.approx(0.5**0.5)
    assert locality(torch.arange(6), 2, 3, 1) == 0.0
    with pytest.raises(ValueError, match="height\\*width"):
        locality(torch.arange(5), 2, 3, 2)


def test_curve_order_video() -> None:
    frames, height, width = 3, 6, 10
    plane = height * width
    order = curve_order(frames, height, width)
    assert order.dtype == torch.int64 and order.shape == (frames * plane,)
    assert torch.equal(order.sort().values, torch.arange(frames * plane))
    base = gilbert_order(height, width)
    for f in range(frames):
        assert torch.equal(order[f * plane:(f + 1) * plane], base + f * plane)
    # Video locality: frames count as a third coordinate, so tiles within a frame keep the 2-D value.
    assert locality(order, height, width, 12) == pytest.approx(locality(base, height, width, 12))


@pytest.mark.parametrize("order", [gilbert_order(13, 17), curve_order(2, 6, 10), torch.randperm(50)])
def test_inverse_round_trip(order: torch.Tensor) -> None:
    inverse = inverse_order(order)
    assert torch.equal(inverse[order], torch.arange(order.numel()))
    assert torch.equal(order[inverse], torch.arange(order.numel()))
    tokens = torch.randn(2, order.numel(), 4)
    assert torch.equal(tokens[:, order][:, inverse], tokens)


def test_cached_result_is_a_copy() -> None:
    first = gilbert_order(8, 8)
    expected = first.clone()
    first.zero_()
    assert torch.equal(gilbert_order(8, 8), expected)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
@pytest.mark.parametrize("position,name", [(0, "frames"), (1, "height"), (2, "width")])
def test_bad_arguments(bad: object, position: int, name: str) -> None:
    args: list[object] = [2, 4, 4]
    args[position] = bad
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        curve_order(*args)  # type: ignore[arg-type]
    if position:
        with pytest.raises(ValueError, match=name):
            gilbert_order(*args[1:])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4"])
def test_bad_tile(bad: object) -> None:
    with pytest.raises(ValueError, match="tile"):
        locality(torch.arange(16), 4, 4, bad)  # type: ignore[arg-type]


def test_large_grid() -> None:
    """256x256 (recursion depth is logarithmic) is a permutation with neighbour steps only."""
    order = gilbert_order(256, 256)
    assert torch.equal(order.sort().values, torch.arange(256 * 256))
    dy, dx = steps(order, 256)
    assert bool((dy + dx == 1).all())
