"""ClusCa: the clustering math, one fresh token per cluster in every image MLP, and its reference cases."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.clusca import (ClusCaConfig, ClusCaPlugin, kmeans, propagate, representatives,
                                      spaced_indices)

FAMILIES = ["dit", "flux", "cogvideox"]  # batched CFG + image MLPs; true CFG + merged single blocks; joint MLP
SCHEDULE = {"interval": 3, "first_steps": 1, "last_steps": 1}  # 5 steps: full 0, 1, 4; cheap 2, 3
CHEAP = {2, 3}


def generate(pipe, name, steps=5):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, steps=steps)))


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            pipe = pipes.build(name)
            cache[name] = (pipe, generate(pipe, name))
        remove_acceleration(cache[name][0])
        return cache[name]

    return get


def plugin_of(handle) -> ClusCaPlugin:
    return next(p for p in handle.transformers[0].plugins if isinstance(p, ClusCaPlugin))


# ------------------------------------------------------------------------------------------------- pure math
def blobs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 9 points in 2-D: three tight blobs each, laid out differently per row."""
    centres = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], [[5.0, 5.0], [-8.0, 3.0], [2.0, -9.0]]])
    offsets = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.2]])
    order = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2], [2, 2, 2, 0, 0, 1, 1, 1, 0]])
    points = torch.stack([centres[r][order[r]] + offsets.repeat(3, 1) for r in range(2)])
    return points, order


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(bool(((a[i] == a[j]) == (b[i] == b[j]))) for i in range(len(a)) for j in range(len(a)))


def test_kmeans_finds_the_blobs_per_row_and_never_mixes_rows():
    points, truth = blobs()
    labels, centroids = kmeans(points, 3)
    for row in range(2):
        assert same_partition(labels[row], truth[row])
        for c in range(3):
            torch.testing.assert_close(centroids[row, c], points[row][labels[row] == c].mean(0))
    # Batched rows cluster exactly as each row alone.
    for row in range(2):
        alone = kmeans(points[row:row + 1], 3)
        assert torch.equal(alone[0][0], labels[row]) and torch.equal(alone[1][0], centroids[row])
    assert spaced_indices(9, 3).tolist() == [0, 3, 6] and spaced_indices(10, 4).tolist() == [0, 2, 5, 7]
    assert torch.equal(kmeans(points, 3)[0], labels)  # deterministic
    # A centroid that attracts no point is moved onto the point farthest from its own centroid, so no cluster
    # stays empty: from (blob 0, blob 0, far away) the three blobs are found again.
    stuck = torch.stack([points[0, 0], points[0, 3], torch.tensor([100.0, 100.0])])[None]
    assert same_partition(kmeans(points[:1], 3, init=stuck)[0][0], truth[0])
    assert kmeans(points, 50)[1].shape == (2, 9, 2)  # capped at the token count


def test_warm_start_keeps_labels_and_l1_assignment():
    points, _ = blobs()
    labels, centroids = kmeans(points, 3)
    moved = points + 0.01 * torch.randn(points.shape, generator=torch.Generator().manual_seed(0))
    warm_labels, warm_centroids = kmeans(moved, 3, init=centroids, iterations=1)
    assert torch.equal(warm_labels, labels)  # same cluster indices, not just the same partition
    torch.testing.assert_close(warm_centroids, centroids, atol=0.05, rtol=0)
    # L1, not L2: (4, 0) is L1 4 / L2 4 from (0, 0) and L1 4.4 / L2 3.12 from (6, 2.4); ten copies of each
    # centre keep the centroids (nearly) in place.
    x = torch.tensor([[[4.0, 0.0]] + [[0.0, 0.0]] * 10 + [[6.0, 2.4]] * 10])
    labels, centroids = kmeans(x, 2, init=torch.tensor([[[0.0, 0.0], [6.0, 2.4]]]))
    assert labels[0, 0] == 0 and labels[0, 1:11].eq(0).all() and labels[0, 11:].eq(1).all()
    assert float(torch.cdist(x[:, :1], centroids)[0, 0].argmin()) == 1  # what an L2 k-means would say


def test_representative_is_the_member_nearest_its_centroid():
    x = torch.tensor([[[0.0], [1.0], [3.0], [10.0], [11.0]]])
    labels = torch.tensor([[0, 0, 0, 1, 1]])
    centroids = torch.tensor([[[1.2], [10.5], [100.0]]])  # cluster 2 is empty
    reps = representatives(x, labels, centroids)
    assert reps.tolist() == [[1, 3, 4]]  # 1.0 nearest 1.2; 10 and 11 tie -> lower index; empty -> nearest overall


def test_propagation_formula_is_exact():
    generator = torch.Generator().manual_seed(1)
    c0 = torch.randn(2, 5, 3, generator=generator)
    fresh = torch.randn(2, 2, 3, generator=generator)
    labels = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1]])
    reps = torch.tensor([[1, 4], [3, 0]])
    gamma = 0.25
    out = propagate(c0, labels, reps, fresh, gamma)
    for b in range(2):
        for i in range(5):
            c = int(labels[b, i])
            expected = fresh[b, c] if i == int(reps[b, c]) else gamma * fresh[b, c] + (1 - gamma) * c0[b, i]
            torch.testing.assert_close(out[b, i], expected)
    zero = propagate(c0, labels, reps, fresh, 0.0)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, [1, 4]] = False
    keep[1, [3, 0]] = False
    assert torch.equal(zero[keep], c0[keep]) and torch.equal(zero[0, 4], fresh[0, 1])
    assert torch.equal(c0, c0.clone())  # the input is untouched (propagate returns a new tensor)


def test_config_ranges_and_recipe():
    with pytest.raises(ValueError, match=r"ClusCaConfig\.gamma = 1\.5"):
        ClusCaConfig(gamma=1.5)
    with pytest.raises(ValueError, match=r"ClusCaConfig\.clusters = 0"):
        ClusCaConfig(clusters=0)
    with pytest.raises(ValueError, match=r"ClusCaConfig\.distance"):
        ClusCaConfig(distance="sigma")
    config = load_recipe("clusca").plugins[0]
    assert isinstance(config, ClusCaConfig) and (config.clusters, config.gamma, config.interval) == (16, 0.005, 4)


# ------------------------------------------------------------------------------------------------ on pipelines
def linear_rows(pipe, plugin, paused):
    """A forward hook on the first Linear inside each clustered MLP: the rows (tokens) each call really computed
    (not while ``paused[0]``: the test's own dense computation)."""
    rows, hooks = defaultdict(list), []
    tracker = plugin.target.tracker
    for name in plugin.clustered:
        list_attr, index, attribute = name.split(".")
        module = getattr(getattr(pipe.transformer, list_attr)[int(index)], attribute)
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)] or [module]
        text = plugin.clustered[name] == "joint"

        def record(module, args, output, name=name, text=text):
            if not paused[0]:
                context = tracker.current
                rows[name].append((context.step, args[0].shape[-2], context.num_text_tokens if text else 0))

        hooks.append(linears[0].register_forward_hook(record))
    return rows, hooks


@pytest.mark.parametrize("name", FAMILIES)
def test_cheap_steps_compute_one_token_per_cluster_and_removal_restores(built, name):
    pipe, reference = built(name)
    handle = accelerate_dit(pipe, "clusca", clusters=3, order=0, gamma=0.0, **SCHEDULE)
    plugin = plugin_of(handle)
    paused = [False]
    rows, hooks = linear_rows(pipe, plugin, paused)
    tracker = plugin.target.tracker
    seen, full = [], {}
    for mlp in plugin.clustered:  # the MLP's served output against its dense output on the same input
        list_attr, index, attribute = mlp.split(".")
        module = getattr(getattr(pipe.transformer, list_attr)[int(index)], attribute)

        def record(module, args, output, mlp=mlp):
            c = tracker.current
            if c.step not in CHEAP:
                full[(mlp, c.slot)] = output
                return
            paused[0] = True
            with torch.no_grad():
                dense = type(module).forward(module, args[0])
            paused[0] = False
            seen.append((mlp, c, output, dense, full[(mlp, c.slot)]))

        hooks.append(module.register_forward_hook(record))
    out = generate(pipe, name)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert set(rows) == set(plugin.clustered)
    for mlp, calls in rows.items():  # cheap steps: 3 representatives (+ the text tokens of a joint MLP)
        cheap = [(n, text) for step, n, text in calls if step in CHEAP]
        assert cheap and all(n == 3 + text for n, text in cheap), f"{mlp}: {calls}"
        assert all(n > 3 + text for step, n, text in calls if step not in CHEAP)
    assert seen
    for mlp, context, output, dense, previous in seen:
        span = plugin._image_span(context, mlp, output.shape[1])
        image = slice(*span)
        fresh = torch.isclose(output, dense, atol=1e-5, rtol=1e-4).all(-1)[:, image]
        kept = (output == previous).all(-1)[:, image]  # order 0, gamma 0: every other token is the full step's
        assert bool((fresh | kept).all())
        assert int(fresh.sum(-1).min()) >= 3
        if plugin.clustered[mlp] == "joint":  # the text tokens of a joint MLP are always computed
            text = torch.ones(output.shape[1], dtype=torch.bool)
            text[image] = False
            torch.testing.assert_close(output[:, text], dense[:, text], atol=1e-5, rtol=1e-4)
    totals = handle.stats.totals()
    assert totals["partial"] > 0 and totals["forecast"] + totals["reused"] > 0 and handle.stats.flops_fraction < 1
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, name), reference)


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_a_cluster_per_token_is_taylorseer_on_everything_but_the_image_mlps(built, name):
    """With every token its own cluster, the image MLPs come out exact on cheap steps (reanchored fresh values)):
    the same as TaylorSeer forecasting only the other sub-layers, with its trust scaling off."""
    pipe, reference = built(name)
    others = ("*.attn", "*.attn1", "*.attn2", "*.ff_context", "*.txt_mlp", "single_transformer_blocks")
    accelerate_dit(pipe, "taylorseer", verify=False, order=1, layers=others, **SCHEDULE)
    expected = generate(pipe, name)
    handle = accelerate_dit(pipe, "clusca", clusters=4096, gamma=0.3, order=1, **SCHEDULE)
    out = generate(pipe, name)
    assert handle.stats.totals()["partial"] > 0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_a_crashed_generation_leaves_no_state(built):
    pipe, _ = built("dit")
    handle = accelerate_dit(pipe, "clusca", clusters=3, **SCHEDULE)
    plugin = plugin_of(handle)
    clean = generate(pipe, "dit")

    def explode(module, args):
        if plugin.target.tracker.current.step == 3:
            raise RuntimeError("boom")

    hook = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        generate(pipe, "dit")
    hook.remove()
    assert not plugin.clusters and not plugin.store.entries and plugin.store.nbytes() == 0
    assert torch.equal(generate(pipe, "dit"), clean)


def test_models_without_a_clusterable_mlp_are_refused(built):
    pipe, reference = built("dit")
    with pytest.raises(ValueError, match="clusca needs an image or joint MLP.*'dit'"):
        accelerate_dit(pipe, "clusca", layers=("*.attn1",))
    with pytest.raises(ValueError, match="cluster_layer = 5 is outside the 2 clustered"):
        accelerate_dit(pipe, "clusca", cluster_layer=5)
    assert torch.equal(generate(pipe, "dit"), reference)  # nothing left installed
