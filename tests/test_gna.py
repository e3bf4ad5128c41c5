"""GNA: neighbourhood windows per axis, the plan against its masked-dense reference, the plugin on every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.attention.gna import (
    GNAConfig,
    axis_windows,
    neighbourhood_attention,
    neighbourhood_mask,
    neighbourhood_plan,
)
from dit_accel.core.blocks import TokenGrid


def test_axis_windows_sliding_blocked_dilated():
    group, windows = axis_windows(7, 3)  # sliding, shifted inward at both borders
    assert windows[group].tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]]
    group, windows = axis_windows(8, 4, stride=4)  # blocked: each block attends to itself
    assert windows[group].tolist() == [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4
    group, windows = axis_windows(6, 2)  # even kernel: one further back
    assert windows[group][2].tolist() == [1, 2]
    group, windows = axis_windows(9, 3, dilation=2)  # residue classes 0,2,4,6,8 and 1,3,5,7
    assert windows[group][4].tolist() == [2, 4, 6] and windows[group][1].tolist() == [1, 3, 5]
    group, windows = axis_windows(10, 3, stride=2)  # pairs share the window of their centre (second member)
    assert windows[group][0].tolist() == windows[group][1].tolist() == [0, 1, 2]
    assert windows[group][2].tolist() == windows[group][3].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="does not fit"):
        axis_windows(5, 4, dilation=2)


@pytest.mark.parametrize("grid,kernel,stride,dilation", [
    (TokenGrid(1, 5, 7), (1, 3, 3), (1, 1, 1), (1, 1, 1)),  # odd, rectangular
    (TokenGrid(1, 6, 9), (1, 4, 5), (1, 2, 3), (1, 1, 1)),  # strided tiles with a partial last tile
    (TokenGrid(1, 8, 8), (1, 3, 3), (1, 1, 1), (1, 2, 2)),  # dilated
    (TokenGrid(3, 4, 5), (2, 3, 3), (1, 2, 2), (1, 1, 1)),  # video
])
def test_plan_equals_masked_dense_reference(grid, kernel, stride, dilation):
    torch.manual_seed(0)
    n = grid.num_tokens
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for _ in range(3))
    tk, tv = torch.randn(2, 3, 4, 8, dtype=torch.float64), torch.randn(2, 3, 4, 8, dtype=torch.float64)
    plan = neighbourhood_plan(grid, kernel, stride, dilation)
    assert sorted(plan.queries[plan.valid].tolist()) == list(range(n))  # every query once
    out = neighbourhood_attention(q, k, v, plan, text_key=tk, text_value=tv)
    mask = torch.cat([neighbourhood_mask(grid, kernel, stride, dilation), torch.ones(n, 4, dtype=torch.bool)], 1)
    reference = F.scaled_dot_product_attention(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2), attn_mask=mask)
    assert torch.allclose(out, reference, atol=1e-10)
    assert plan.key_density() == pytest.approx(kernel[0] * kernel[1] * kernel[2] / n)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("stride", [1, 4])
def test_value_head_size_may_differ_from_the_query_head_size(dtype, atol, stride):
    """Values of another head size than queries and keys (SDPA allows it; torch's CPU flash kernel does not): the
    plan still equals the masked dense reference, in both dtypes."""
    grid, kernel = TokenGrid(1, 16, 16), (1, 7, 7)
    torch.manual_seed(2)
    q, k = torch.randn(2, 3, 256, 16, dtype=dtype), torch.randn(2, 3, 256, 16, dtype=dtype)
    v, tk, tv = (torch.randn(2, 3, 256, 8, dtype=dtype), torch.randn(2, 3, 5, 16, dtype=dtype),
                 torch.randn(2, 3, 5, 8, dtype=dtype))
    plan = neighbourhood_plan(grid, kernel, (1, stride, stride), (1, 1, 1))
    out = neighbourhood_attention(q, k, v, plan, text_key=tk, text_value=tv)
    mask = torch.cat([neighbourhood_mask(grid, kernel, (1, stride, stride), (1, 1, 1)),
                      torch.ones(256, 5, dtype=torch.bool)], 1)
    reference = F.scaled_dot_product_attention(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2), attn_mask=mask)
    assert out.shape == (2, 3, 256, 8)
    assert torch.allclose(out, reference, atol=atol)


def test_full_neighbourhood_is_dense_attention():
    grid = TokenGrid(1, 6, 5)
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 16) for _ in range(3))
    plan = neighbourhood_plan(grid, (1, 6, 5), (1, 1, 1), (1, 1, 1))
    assert torch.allclose(neighbourhood_attention(q, k, v, plan), F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="coverage"):
        GNAConfig(coverage=0.0)
    with pytest.raises(ValueError, match="stride"):
        GNAConfig(stride=0)


def test_full_window_on_every_family_equals_dense(family):
    """coverage 1 (the window is the whole grid): the plugin routes every call and equals dense exactly."""
    pipe = pipes.build(family)
    reference = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=2)))
    accelerate_dit(pipe, "gna", coverage=1.0, start=0.0)
    out = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=2)))
    assert torch.allclose(out, reference, atol=1e-5)
    remove_acceleration(pipe)


@pytest.mark.parametrize("family", ["zoo:dit", "flux", "wan"])
def test_sparse_windows_run_and_remove_cleanly(family):
    pipe = pipes.build(family)
    reference = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=3)))
    handle = accelerate_dit(pipe, "gna", coverage=0.5, stride=2, start=0.0)
    out = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=3)))
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert handle.stats.flops_fraction < 1.0
    remove_acceleration(pipe)
    assert torch.equal(pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=3))), reference)


def test_window_too_large_for_grid_runs_dense_with_a_warning():
    pipe = pipes.build("zoo:dit")
    reference = pipe(**pipes.call_kwargs("zoo:dit", steps=2)).images
    accelerate_dit(pipe, "gna", kernel=64, start=0.0)
    with pytest.warns(UserWarning, match="does not fit"):
        out = pipe(**pipes.call_kwargs("zoo:dit", steps=2)).images
    assert torch.equal(out, reference)
    remove_acceleration(pipe)


@pytest.mark.parametrize("grid,kernel,stride,dilation,merge", [
    (TokenGrid(1, 9, 10), (1, 5, 4), (1, 1, 2), (1, 1, 1), (1, 3, 2)),  # runs of tiles sharing a union, odd edges
    (TokenGrid(1, 8, 8), (1, 3, 3), (1, 1, 1), (1, 2, 2), (1, 2, 2)),  # dilated: runs stay in one residue class
    (TokenGrid(3, 4, 5), (2, 3, 3), (1, 1, 2), (1, 1, 1), (2, 2, 2)),  # video
])
def test_merged_runs_equal_masked_dense_reference(grid, kernel, stride, dilation, merge):
    """Tiles grouped into runs that gather one union of windows, each query masked to its own window."""
    torch.manual_seed(2)
    n = grid.num_tokens
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for _ in range(3))
    tk, tv = torch.randn(2, 3, 4, 8, dtype=torch.float64), torch.randn(2, 3, 4, 8, dtype=torch.float64)
    plan = neighbourhood_plan(grid, kernel, stride, dilation, merge=merge)
    assert plan.grouped is not None and plan.grouped.queries.shape[0] < plan.queries.shape[0]
    assert sorted(plan.grouped.queries[plan.grouped.valid].tolist()) == list(range(n))
    mask = torch.cat([neighbourhood_mask(grid, kernel, stride, dilation), torch.ones(n, 4, dtype=torch.bool)], 1)
    reference = F.scaled_dot_product_attention(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2), attn_mask=mask)
    for text in (True, False):
        out = neighbourhood_attention(q, k, v, plan, text_key=tk if text else None, text_value=tv if text else None)
        expected = reference if text else F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :n])
        assert torch.allclose(out, expected, atol=1e-10)


def test_automatic_merge_groups_overlapping_windows_only():
    big = neighbourhood_plan(TokenGrid(1, 64, 64), (1, 32, 32), (1, 4, 4), (1, 1, 1))
    assert big.grouped is not None and big.grouped.queries.shape[1] > 16  # small tiles share gathered unions
    blocked = neighbourhood_plan(TokenGrid(1, 16, 16), (1, 8, 8), (1, 8, 8), (1, 1, 1))
    assert blocked.grouped is None  # windows that do not overlap: nothing to share
