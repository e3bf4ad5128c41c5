"""Re-ttention: the log-sum-exp read-out and r/R against masked-dense float64 references, the refresh schedule and
its state, and the wrapper on hilbert and gna (and every family at an exact setting)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.attention.base import ImageAttentionPlugin
from dit_accel.attention.gna import GNAConfig
from dit_accel.attention.rettention import (
    RettentionState,
    corrected_output,
    dense_attention_lse,
    dense_lse,
    drifted,
    extra_key_lse,
    kept_mass_and_residual,
)


def tensors(n=48, text=5, dim=16, scale=1.0, shift=0.0, dtype=torch.float64, seed=0):
    """q, k, v, text k, text v (B=2, H=3); ``shift`` adds a constant ``shift`` to every logit (an extra channel)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, dim, generator=g, dtype=torch.float64) for _ in range(3))
    tk, tv = (torch.randn(2, 3, text, dim, generator=g, dtype=torch.float64) for _ in range(2))
    q, k, tk = q * scale, k * scale, tk * scale
    if shift:
        column = math.sqrt(dim + 1) * shift  # SDPA's scale 1/sqrt(dim + 1) turns q.k into a +shift on every logit
        q = torch.cat([q, torch.full((2, 3, n, 1), column, dtype=torch.float64)], -1)
        k, tk = (torch.cat([t, torch.ones(*t.shape[:3], 1, dtype=torch.float64)], -1) for t in (k, tk))
    return tuple(t.to(dtype) for t in (q, k, v, tk, tv))


def band_mask(n, width):
    index = torch.arange(n)
    return (index[:, None] - index[None, :]).abs() <= width


def masked_attention(q, k, v, tk, tv, mask):
    """Image keys allowed by ``mask`` (N, N) plus every text key."""
    full = torch.cat([mask, torch.ones(mask.shape[0], tk.shape[2], dtype=torch.bool)], 1)
    return F.scaled_dot_product_attention(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2), attn_mask=full)


def reference(q, k, v, tk, tv, mask):
    """float64 (dense output, dense lse, sparse output, sparse lse, kept mass r)."""
    q, k, v, tk, tv = (t.double() for t in (q, k, v, tk, tv))
    logits = torch.cat([k, tk], 2).matmul(q.transpose(-1, -2)).transpose(-1, -2) / math.sqrt(q.shape[-1])
    full = torch.cat([mask, torch.ones(mask.shape[0], tk.shape[2], dtype=torch.bool)], 1)
    lse_dense = torch.logsumexp(logits, -1)
    lse_sparse = torch.logsumexp(logits.masked_fill(~full, float("-inf")), -1)
    dense = F.scaled_dot_product_attention(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2))
    ratio = (torch.softmax(logits, -1) * full).sum(-1)
    return dense, lse_dense, masked_attention(q, k, v, tk, tv, mask), lse_sparse, ratio


def attend_with(mask):
    return lambda q, k, v, tk, tv: (masked_attention(q, k, v, tk, tv, mask), float(mask.float().mean()))


# -- the math ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,shift,text", [(1.0, 0.0, 5), (1.0, 0.0, 0), (1.0, 150.0, 5), (2.5, 120.0, 0)])
def test_lse_read_out_equals_masked_reference(scale, shift, text):
    """Also with logits of 80-200, where exp overflows float32 and float64 alike (e^710)."""
    q, k, v, tk, tv = tensors(text=text, scale=scale, shift=shift)
    mask = torch.rand(48, 48, generator=torch.Generator().manual_seed(1)) < 0.05
    mask |= torch.eye(48, dtype=torch.bool)  # keep one key per row: a row of text-free queries is not empty
    out, lse, density = extra_key_lse(attend_with(mask), q, k, v, tk, tv)
    _, _, sparse, lse_sparse, _ = reference(q, k, v, tk, tv, mask)
    if shift:
        assert float(lse_sparse.min()) > 80 and float(lse_sparse.max()) > shift
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse, lse_sparse, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, sparse, atol=1e-12, rtol=0)
    assert density == pytest.approx(float(mask.float().mean()))


def test_read_out_refuses_outputs_that_are_no_softmax():
    """An attention that adds a cached residual of its own (window-residual's cheap steps) gives statistics that do
    not sum to 1: its normaliser is unknown (nan, so r = 1: plain residual caching), never a wrong one."""
    q, k, v, tk, tv = tensors()
    mask = band_mask(48, 2)
    shifted = lambda q, k, v, tk, tv: (masked_attention(q, k, v, tk, tv, mask) + 0.1, 0.1)  # noqa: E731
    out, lse, _ = extra_key_lse(shifted, q, k, v, tk, tv)
    assert torch.isnan(lse).all() and torch.equal(out, masked_attention(q, k, v, tk, tv, mask) + 0.1)
    r, _ = kept_mass_and_residual(out, out, lse.new_zeros(lse.shape), lse)
    assert torch.equal(r, torch.ones_like(r))


def test_kept_mass_and_residual_recover_dense_exactly():
    q, k, v, tk, tv = tensors(scale=1.5)
    mask = band_mask(48, 2)
    dense, lse_dense, sparse, _, ratio = reference(q, k, v, tk, tv, mask)
    out, lse, _ = extra_key_lse(attend_with(mask), q, k, v, tk, tv)
    r, residual = kept_mass_and_residual(dense, out, dense_lse(q, torch.cat([k, tk], 2), 1 / 4), lse)
    torch.testing.assert_close(r[..., 0], ratio, atol=1e-12, rtol=0)
    torch.testing.assert_close(residual, dense - ratio[..., None] * sparse, atol=1e-12, rtol=0)
    torch.testing.assert_close(corrected_output(out, r, residual), dense, atol=1e-12, rtol=0)
    assert float(ratio.max()) < 0.999  # the band loses mass: the plain sparse output is not dense
    # A dense pattern keeps everything: r = 1, R = 0.
    everything = torch.ones(48, 48, dtype=torch.bool)
    out, lse, _ = extra_key_lse(attend_with(everything), q, k, v, tk, tv)
    r, residual = kept_mass_and_residual(dense, out, lse_dense, lse)
    torch.testing.assert_close(r, torch.ones_like(r), atol=1e-12, rtol=0)
    assert float(residual.abs().max()) < 1e-12


def test_dense_lse_chunks_and_float32_range():
    q, k, v, tk, tv = tensors(scale=1.0, shift=150.0, dtype=torch.float32)
    keys = torch.cat([k, tk], 2)
    whole = torch.logsumexp(q.double() @ keys.double().transpose(-1, -2) / math.sqrt(17), -1)
    torch.testing.assert_close(dense_lse(q, keys, 1 / math.sqrt(17), chunk_elements=100).double(), whole,
                               atol=1e-4, rtol=0)  # e^150 overflows float32; the lse does not
    # The read-out used for half-precision CUDA tensors gives the same dense output and log-sum-exp.
    exact_out, exact_lse = dense_attention_lse(q, k, v, tk, tv, exact=True)
    read_out, read_lse = dense_attention_lse(q, k, v, tk, tv, exact=False)
    assert torch.equal(read_out, exact_out)
    torch.testing.assert_close(read_lse.double(), whole, atol=1e-4, rtol=0)


def test_drift_is_capped_at_one():
    ratio = torch.tensor([0.5, 0.98, 1.2])
    assert drifted(ratio, 0.0, 3) is ratio
    assert drifted(ratio, 0.04, 2).tolist() == pytest.approx([0.58, 1.0, 1.2])


# -- the state ------------------------------------------------------------------------------------------------------
class MaskedPlugin:
    """A stand-in plugin: masked attention over the image keys plus every text key; the base class's generic
    ``image_attention_lse``."""

    image_attention_lse = ImageAttentionPlugin.image_attention_lse

    def __init__(self, mask):
        self.mask, self.calls = mask, 0
        self.target = SimpleNamespace(stats=SimpleNamespace(set_cache_bytes=lambda nbytes: None))

    def image_attention(self, q, k, v, tk, tv, grid, layer, call):
        self.calls += 1
        return masked_attention(q, k, v, tk, tv, self.mask), float(self.mask.float().mean())


def call_at(step, generation=1, slot=0):
    context = SimpleNamespace(generation=generation, step=step, slot=slot, rows=None)
    return SimpleNamespace(context=context, index=0, options={})


LAYER = SimpleNamespace(name="blocks.0.attn")


def run(state, plugin, inputs, step, **where):
    return state.attend(plugin, *inputs, None, LAYER, call_at(step, **where))


def test_unchanged_inputs_give_dense_attention():
    inputs = tensors(n=64, dtype=torch.float32, scale=1.5)
    plugin = MaskedPlugin(band_mask(64, 1))
    state = RettentionState(interval=4)
    dense = reference(*inputs, plugin.mask)[0].float()
    refreshed, density = run(state, plugin, inputs, 0)
    assert density == 1.0 and torch.allclose(refreshed, dense, atol=1e-5)
    corrected, density = run(state, plugin, inputs, 1)
    assert density < 0.05
    assert torch.allclose(corrected, dense, atol=1e-5)
    plain = masked_attention(*inputs, plugin.mask)
    assert float((plain - dense).abs().max()) > 1e-2


def test_slowly_changing_inputs_are_closer_to_dense_than_plain_sparse():
    n = 128
    mask = band_mask(n, 2)  # 5 of 128 keys: 3.9 %
    assert float(mask.float().mean()) <= 0.05
    base = tensors(n=n, text=4, dtype=torch.float32, scale=1.2, seed=3)
    g = torch.Generator().manual_seed(4)
    drift = [0.03 * torch.randn(t.shape, generator=g) for t in base]
    plugin, state = MaskedPlugin(mask), RettentionState(interval=3)
    cos_plain, cos_rettention = [], []
    for step in range(6):
        inputs = tuple(t + step * d for t, d in zip(base, drift))
        dense = reference(*inputs, mask)[0].float()
        out, density = run(state, plugin, inputs, step)
        if step % 3:  # sparse steps (1, 2, 4, 5); 0 and 3 refresh
            assert density < 1.0
            cos_rettention.append(float(F.cosine_similarity(out.flatten(), dense.flatten(), 0)))
            plain = masked_attention(*inputs, mask)
            cos_plain.append(float(F.cosine_similarity(plain.flatten(), dense.flatten(), 0)))
        else:
            assert density == 1.0
    assert min(cos_rettention) > max(cos_plain)
    assert sum(cos_rettention) / 4 > 0.99 > sum(cos_plain) / 4


def test_refresh_schedule_slots_shapes_and_generations():
    inputs = tensors(n=16, dtype=torch.float32)
    plugin = MaskedPlugin(band_mask(16, 1))
    state = RettentionState(interval=3)
    refreshes = []
    for step in (0, 1, 2, 3, 4, 6, 7):  # step 5 was skipped by a cache: the 6th active step is step 6
        before = state.refreshes
        run(state, plugin, inputs, step)
        run(state, plugin, inputs, step)  # a second call of the step reads the same state
        refreshes.append(state.refreshes - before)
    assert refreshes == [1, 0, 0, 1, 0, 0, 1]
    assert state.sparse_calls == 14 - 3 and state.nbytes() > 0
    before = state.refreshes
    run(state, plugin, inputs, 8, slot=1)  # another CFG branch has its own state
    small = tensors(n=9, dtype=torch.float32)
    run(state, MaskedPlugin(band_mask(9, 1)), small, 8)  # another resolution refreshes
    assert state.refreshes - before == 2
    run(state, plugin, inputs, 0, generation=2)  # a new generation starts over
    assert state.refreshes == 1 and state.sparse_calls == 0 and len(state.slots) == 1


# -- the plugins --------------------------------------------------------------------------------------------------
def generate(pipe, family, steps=3):
    with torch.no_grad():
        return pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=steps)))


def test_config_validation_and_refusal():
    with pytest.raises(ValueError, match="rettention_interval"):
        GNAConfig(rettention=True, rettention_interval=0)
    with pytest.raises(ValueError, match="rettention_drift"):
        GNAConfig(rettention_drift=1.5)
    with pytest.raises(ValueError, match="rettention = 'yes'"):
        GNAConfig(rettention="yes")
    pipe = pipes.build("zoo:dit")
    with pytest.raises(ValueError, match="rettention=True is not allowed"):
        accelerate_dit(pipe, "int8", rettention=True)  # dense attention: nothing to correct


@pytest.mark.parametrize("recipe,family,overrides", [
    ("hilbert", "flux", {"neighbours": 0, "pooled": False}),
    ("hilbert", "zoo:dit", {"neighbours": 0, "pooled": False}),
    ("gna", "wan", {"coverage": 0.25, "stride": 2}),
])
def test_sparse_plugins_with_rettention_run_and_remove_cleanly(recipe, family, overrides):
    pipe = pipes.build(family)
    reference_out = generate(pipe, family, steps=2)
    handle = accelerate_dit(pipe, recipe, start=0.0, rettention=True, rettention_interval=2, **overrides)
    first, second = generate(pipe, family, steps=2), generate(pipe, family, steps=2)  # refresh, then corrected
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert not torch.equal(first, reference_out)
    assert handle.stats.flops_fraction < 1.0
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=2), reference_out)


def test_gna_with_rettention_counts_refreshes_as_dense_helps_and_removes_cleanly():
    family, settings = "zoo:dit", {"coverage": 0.25, "stride": 2, "start": 0.0}
    pipe = pipes.build(family)
    reference_out = generate(pipe, family)
    handle = accelerate_dit(pipe, "gna", **settings)
    plain = generate(pipe, family)
    saved = 1.0 - handle.stats.flops_fraction
    remove_acceleration(pipe)
    handle = accelerate_dit(pipe, "gna", rettention=True, rettention_interval=3, **settings)
    corrected, again = generate(pipe, family), generate(pipe, family)
    assert torch.isfinite(corrected).all() and torch.equal(corrected, again)
    # Steps 0 (refresh), 1 and 2 (sparse): two thirds of the plain savings, refresh work reported as dense.
    assert 1.0 - handle.stats.flops_fraction == pytest.approx(saved * 2 / 3, rel=1e-6)
    cos = [float(F.cosine_similarity(out.flatten(), reference_out.flatten(), 0)) for out in (plain, corrected)]
    assert cos[1] > cos[0]
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family), reference_out)


def test_todo_with_rettention_is_a_residual_correction():
    """ToDo's pooled keys are no kept set, but the same correction applies (r is then close to 1): allowed."""
    pipe = pipes.build("zoo:dit")
    handle = accelerate_dit(pipe, "todo", factor=2, rettention=True)
    assert torch.isfinite(generate(pipe, "zoo:dit", steps=2)).all()
    assert handle.stats.flops_fraction < 1.0  # step 0 refreshed, step 1 corrected
    remove_acceleration(pipe)


def test_every_step_refreshing_on_every_family_equals_dense(family):
    """rettention_interval=1 (every step refreshes: an exact setting) over a sparse gna window: the read-out runs on
    every family's layout (text first or last, padded prompts in key-padding groups, video) and the output is dense
    attention's."""
    pipe = pipes.build(family)
    reference_out = generate(pipe, family, steps=1)
    handle = accelerate_dit(pipe, "gna", coverage=0.5, stride=2, start=0.0, rettention=True, rettention_interval=1)
    with pytest.warns(UserWarning, match="dense refresh|every query kept every key"):
        out = generate(pipe, family, steps=1)
    torch.testing.assert_close(out, reference_out, atol=2e-4, rtol=0)
    assert handle.stats.flops_fraction == 1.0
    remove_acceleration(pipe)
