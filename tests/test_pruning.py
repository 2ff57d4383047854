"""Pruning presets: exact budgets on schedule, scores, global scope, LAMP, static sparsity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from conformance import assert_params_sparse, batch, mlp_params, train


def counts(state):
    return {k: int(v) for k, v in js.count_nonzeros(js.get_masks(state)).items()}


def expected_keep(n, s, fraction):
    return n - math.floor(fraction * s * n)


SCHEDULES = {
    # name: (schedule, update_every, its update steps, the fraction written out independently)
    "cubic": (js.polynomial_schedule(begin_step=2, end_step=12, power=3), 4, (2, 6, 10, 12),
              lambda t: 1 - (1 - (t - 2) / 10) ** 3),
    "optax linear": (js.SparsitySchedule(optax.linear_schedule(0.0, 1.0, transition_steps=8, transition_begin=2),
                                         begin_step=2, end_step=10), 3, (2, 5, 8, 10),
                     lambda t: (t - 2) / 8),
}


@pytest.mark.compat
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_gradual_magnitude_pruning_follows_its_schedule(name):
    sched, update_every, update_steps, fraction = SCHEDULES[name]
    tx = js.magnitude_pruning(optax.sgd(0.05), sparsity=0.9, schedule=sched, update_every=update_every)
    params = mlp_params()
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    sizes = {"Dense_0/kernel": 12 * 16, "Dense_1/kernel": 16 * 3}
    last = dict(sizes)
    for t in range(16):
        grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.01, params)
        updates, state = step(params, state, grads)
        params = optax.apply_updates(params, updates)
        got = counts(state)
        if t in update_steps:  # begin + k * update_every, and end_step
            assert got == {k: expected_keep(n, 0.9, fraction(t)) for k, n in sizes.items()}, t
        else:
            assert got == last, t  # no change between update steps, nor after end_step
        last = got
        assert_params_sparse(params, js.get_masks(state))
    assert got == {k: n - math.floor(0.9 * n) for k, n in sizes.items()}


def test_schedule_errors_name_the_fix():
    # A bare function has no window: a clear error naming the fix.
    with pytest.raises(ValueError, match=r"js.SparsitySchedule\(fn, begin_step=..., end_step=...\)"):
        js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, schedule=optax.linear_schedule(0.0, 1.0, 10))
    # Fractions outside [0, 1] are refused at construction, naming the step.
    with pytest.raises(ValueError, match="fraction 2.0 at step 0"):
        js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, schedule=js.SparsitySchedule(lambda t: 2.0, 0, 4))


def test_one_shot_magnitude_keeps_the_largest_weights():
    params = mlp_params()
    _, state, _ = train(js.magnitude_pruning(optax.sgd(0.0), sparsity=0.8), steps=1, params=params)
    masks = js.get_masks(state)
    for layer in ("Dense_0", "Dense_1"):
        w, m = np.abs(np.asarray(params[layer]["kernel"])), np.asarray(masks[layer]["kernel"])
        assert m.sum() == w.size - math.floor(0.8 * w.size)
        assert w[m].min() >= w[~m].max()


def test_global_magnitude_one_threshold_over_layers():
    params = mlp_params()
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"] * 10  # larger weights survive more
    _, state, _ = train(js.global_magnitude_pruning(optax.sgd(0.0), sparsity=0.8), steps=1, params=params)
    masks = js.get_masks(state)
    w = [np.abs(np.asarray(params[l]["kernel"])) for l in ("Dense_0", "Dense_1")]
    m = [np.asarray(masks[l]["kernel"]) for l in ("Dense_0", "Dense_1")]
    total = sum(x.size for x in w)
    assert sum(x.sum() for x in m) == total - math.floor(0.8 * total)
    assert min(x[k].min() for x, k in zip(w, m)) >= max(x[~k].max() for x, k in zip(w, m))
    assert m[1].mean() > m[0].mean()
    with pytest.raises(ValueError, match="global pruning takes a float sparsity"):
        js.global_magnitude_pruning(optax.sgd(0.1), sparsity=js.erk(0.8))


def lamp_reference(w):
    flat = np.asarray(w, np.float64).ravel() ** 2
    order = np.argsort(flat, kind="stable")
    scores = np.empty_like(flat)
    for rank, i in enumerate(order):
        scores[i] = flat[i] / flat[order[rank:]].sum()
    return scores.reshape(np.shape(w))


def test_lamp_scores_and_pruning():
    w = jax.random.normal(jax.random.PRNGKey(3), (7, 5))
    np.testing.assert_allclose(js.scores.lamp(w, None, None), lamp_reference(w), rtol=1e-5)
    params = mlp_params()
    _, state, _ = train(js.lamp_pruning(optax.sgd(0.0), sparsity=0.95), steps=1, params=params)
    masks = js.get_masks(state)
    total = 12 * 16 + 16 * 3
    assert sum(counts(state).values()) == total - math.floor(0.95 * total)
    scores = [lamp_reference(params[l]["kernel"]) for l in ("Dense_0", "Dense_1")]
    kept = [np.asarray(masks[l]["kernel"]) for l in ("Dense_0", "Dense_1")]
    assert min(s[k].min() for s, k in zip(scores, kept)) >= max(s[~k].max() for s, k in zip(scores, kept)) - 1e-6
    assert all(k.sum() >= 1 for k in kept)  # the largest weight of each layer scores 1


def test_random_pruning_never_revives_and_is_seeded():
    sched = js.polynomial_schedule(0, 6)
    run = lambda: train(js.random_pruning(optax.sgd(0.05), sparsity=0.9, schedule=sched, update_every=2), steps=7)
    _, state_a, _ = run()
    _, state_b, _ = run()
    for a, b in zip(jax.tree.leaves(js.get_masks(state_a)), jax.tree.leaves(js.get_masks(state_b))):
        np.testing.assert_array_equal(a, b)
    tx = js.random_pruning(optax.sgd(0.05), sparsity=0.9, schedule=sched, update_every=2)
    params = mlp_params()
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    previous = js.get_masks(state)
    for t in range(7):
        _, state = step(params, state, jax.tree.map(jnp.ones_like, params))
        current = js.get_masks(state)
        for old, new in zip(jax.tree.leaves(previous), jax.tree.leaves(current)):
            assert not np.any(np.asarray(new) & ~np.asarray(old)), "a pruned entry came back"
        previous = current


def test_saliency_uses_the_gradient():
    params = {"w": jnp.ones((4, 4))}
    grads = {"w": jnp.arange(16.0).reshape(4, 4)}
    tx = js.saliency_pruning(optax.sgd(0.0), sparsity=0.75)
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(js.get_masks(state)["w"].ravel(), np.arange(16) >= 12)


def test_static_sparse_is_fixed_exact_and_seeded():
    params = mlp_params()
    _, state, _ = train(js.static_sparse(optax.adam(1e-2), sparsity=js.erk(0.8), seed=5), steps=4, params=params)
    init_masks = js.get_masks(js.static_sparse(optax.adam(1e-2), sparsity=js.erk(0.8), seed=5).init(params))
    for a, b in zip(jax.tree.leaves(init_masks), jax.tree.leaves(js.get_masks(state))):
        np.testing.assert_array_equal(a, b)
    targets = js.erk(0.8)(params)
    for layer, n in (("Dense_0", 192), ("Dense_1", 48)):
        assert counts(state)[f"{layer}/kernel"] == n - math.floor(targets[layer]["kernel"] * n)
    other = js.get_masks(js.static_sparse(optax.adam(1e-2), sparsity=js.erk(0.8), seed=6).init(params))
    assert not np.array_equal(other["Dense_0"]["kernel"], init_masks["Dense_0"]["kernel"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="schedule must be a jaxsparse SparsitySchedule"):
        js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, schedule=lambda t: 1.0)
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global'; got 'model'"):
        js.pruning(optax.sgd(0.1), score=js.scores.magnitude, sparsity=0.5, scope="model")
    with pytest.raises(ValueError, match="update_every must be a positive int; got -2"):
        js.magnitude_pruning(optax.sgd(0.1), sparsity=0.5, update_every=-2)


def test_nan_scores_on_active_weights_never_revive_pruned_ones():
    # A score that is NaN at random positions (new ones at every update) on active weights: NaN
    # ranks lowest among the active entries, never below the pruned ones, so a pruned entry never
    # comes back and every leaf keeps exactly its scheduled budget.
    def nan_magnitude(param, grad, key):
        return jnp.where(jax.random.uniform(key, param.shape) < 0.5, jnp.nan, jnp.abs(param))

    sched = js.polynomial_schedule(begin_step=0, end_step=12, power=1)
    tx = js.pruning(optax.sgd(0.0), score=nan_magnitude, sparsity=0.9, schedule=sched, update_every=3)
    params = mlp_params()
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    sizes = {"Dense_0/kernel": 12 * 16, "Dense_1/kernel": 16 * 3}
    previous = js.get_masks(state)
    for t in range(14):
        _, state = step(params, state, jax.tree.map(jnp.zeros_like, params))
        current = js.get_masks(state)
        revived = [bool(np.any(np.asarray(new) & ~np.asarray(old))) for old, new in zip(jax.tree.leaves(previous), jax.tree.leaves(current))]
        assert not any(revived), f"a pruned entry came back at step {t}"
        fraction = min(t // 3 * 3, 12) / 12
        assert counts(state) == {k: expected_keep(n, 0.9, fraction) for k, n in sizes.items()}, t
        previous = current


def test_pooled_budget_is_exact_at_2_40_weights():
    from jaxsparse.pruning import keep_table

    size = 2**40 + 12345
    final = size - math.floor(0.9 * size)
    assert keep_table(size, 0.9, [0.0, 1.0]) == [size, final]
    # Intermediate schedule points: exact host arithmetic, never beyond the final budget.
    assert keep_table(size, 0.9, [0.5]) == [size - math.floor(0.5 * 0.9 * size)]
    assert keep_table(size, 0.9, [0.99999999])[0] >= final


def lamp_counts_reference(ws, ms, k):
    """Per layer, (weights scoring above the k-th largest LAMP score, weights scoring equal to it),
    equal weights of a layer sharing their group's score, in float64."""
    scores = []
    for w, m in zip(ws, ms):
        x = np.asarray(w, np.float64).ravel() ** 2
        x = x[np.asarray(m).ravel()]
        tail = np.array([x[x >= v].sum() for v in x])
        scores.append(np.where(tail > 0, x / np.where(tail > 0, tail, 1), 0))
    threshold = np.sort(np.concatenate(scores))[::-1][k - 1] if k > 0 else np.inf
    return [int((s > threshold).sum()) for s in scores], [int((s == threshold).sum()) for s in scores]


@pytest.mark.parametrize("ties", [False, True])
def test_lamp_budgets_without_sorting_match_the_scores(ties):
    from jaxsparse.pruning import lamp_budgets

    rng = np.random.default_rng(ties)
    ws = [rng.standard_normal(shape).astype(np.float32) * scale for shape, scale in [((30, 20), 1.0), ((20, 10), 0.3), ((50,), 2.0)]]
    if ties:  # repeated values, zeros, and a layer of equal weights
        ws[0], ws[2] = np.round(ws[0] * 4) / 4, np.full((50,), 0.5, np.float32)
    ms = [rng.random(w.shape) < 0.8 for w in ws]
    active = sum(int(m.sum()) for m in ms)
    budgets = jax.jit(lamp_budgets)
    for k in [0, 1, 7, active // 3, active - 1, active, active + 5]:
        got = np.asarray(budgets([jnp.asarray(w) for w in ws], [jnp.asarray(m) for m in ms], k))
        above, tied = lamp_counts_reference(ws, ms, min(k, active))
        assert got.sum() == min(k, active), k
        assert all(a <= g <= a + t for g, a, t in zip(got, above, tied)), (k, got, above, tied)
