"""proxy's CPU path: window attention over strided views equals the gather reference with the same window plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit_accel.attention.plans import window_plan
from dit_accel.attention.tiled import tiled_attention
from dit_accel.attention.windows import window_attention, window_density, window_layout
from dit_accel.core.blocks import TokenGrid

CASES = [  # frames, height, width, window, radius, offset, pooled, text tokens
    (1, 8, 8, (2, 2), 1, (0, 0), True, 0),
    (1, 8, 8, (2, 2), 1, (1, 1), True, 5),  # shifted: partial windows on every edge
    (1, 9, 7, (3, 2), 1, (1, 1), True, 3),  # odd grid, rectangular windows
    (1, 9, 7, (3, 2), 0, (2, 0), True, 3),
    (1, 4, 16, (4, 4), 1, (2, 2), True, 2),  # a single row of windows: the other rows' offsets are all masked
    (1, 12, 12, (2, 3), 2, (1, 2), False, 0),  # radius 2, local only
    (3, 6, 6, (2, 2), 1, (1, 1), True, 2),  # video: the 3x3x3 neighbourhood over frames
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_equals_the_gather_reference(case) -> None:
    frames, height, width, window, radius, offset, pooled, text = case
    grid = TokenGrid(frames, height, width)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, grid.num_tokens, 16, generator=generator) for _ in range(3))
    tk = torch.randn(2, 3, text, 16, generator=generator) if text else None
    tv = torch.randn(2, 3, text, 16, generator=generator) if text else None
    plan = window_plan(grid, window, radius, offset, pooled)
    expected = tiled_attention(q, k, v, plan, shared_key=tk, shared_value=tv)
    got = window_attention(q, k, v, grid, window=window, radius=radius, offset=offset, pooled=pooled, shared_key=tk,
                           shared_value=tv)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
    layout = window_layout(grid, window, radius, offset)
    assert window_density(layout, grid.num_tokens, pooled) == pytest.approx(plan.key_density())


def test_neighbourhood_covering_everything_is_dense_attention() -> None:
    grid = TokenGrid(1, 6, 6)
    q, k, v = (torch.randn(1, 2, 36, 8, generator=torch.Generator().manual_seed(1)) for _ in range(3))
    got = window_attention(q, k, v, grid, window=(3, 3), radius=1)  # 2x2 windows, all neighbours
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)


def test_inputs_are_not_modified_and_bad_grids_are_refused() -> None:
    grid = TokenGrid(1, 8, 8)
    q, k, v = (torch.randn(1, 1, 64, 8) for _ in range(3))
    copies = [t.clone() for t in (q, k, v)]
    window_attention(q, k, v, grid, window=(2, 2), radius=1, offset=(1, 1))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))
    with pytest.raises(ValueError, match="do not match"):
        window_attention(q[:, :, :60], k[:, :, :60], v[:, :, :60], grid, window=(2, 2), radius=1)
    with pytest.raises(ValueError, match="must fit"):
        window_layout(grid, (9, 2), 1, (0, 0))
    with pytest.raises(ValueError, match="offset"):
        window_layout(grid, (2, 2), 1, (2, 0))


def test_proxy_plugin_uses_the_strided_path_on_cpu(monkeypatch) -> None:
    """The CPU path must not fall back to the gather reference (which would be correct, but slow)."""
    import dit_accel.attention.base as base
    from dit_accel import accelerate_dit, remove_acceleration
    from dit_accel.pipelines import zoo

    def gather(*args, **kwargs):
        raise AssertionError("proxy took the gather path on CPU")

    monkeypatch.setattr(base, "tiled_attention", gather)
    pipe = zoo.load("mmdit")
    accelerate_dit(pipe, "proxy", window=2, start=0.0)
    try:
        images = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
    finally:
        remove_acceleration(pipe)
    assert torch.isfinite(images).all()
