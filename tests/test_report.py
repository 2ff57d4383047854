import jax.numpy as jnp
import pytest

import jaxsparse as js


@pytest.mark.compat
def test_report_rows_total_and_text():
    params = {"dense": {"kernel": jnp.array([[1.0, 0.0], [0.0, 0.0]]), "bias": jnp.array([1.0, 2.0])}}
    report = js.sparsity_report(params)
    assert [r.path for r in report.rows] == ["dense/bias", "dense/kernel"]
    kernel = report.rows[1]
    assert (kernel.shape, kernel.nonzeros, kernel.size, kernel.sparsity) == ((2, 2), 1, 4, 0.75)
    assert (report.total.nonzeros, report.total.size) == (3, 6)
    assert report.total.sparsity == pytest.approx(0.5)
    text = str(report)
    assert "dense/kernel" in text and "75.00%" in text and "total" in text
    assert report.as_dict() == {"sparsity/dense/bias": 0.0, "sparsity/dense/kernel": 0.75, "sparsity/total": 0.5}
    assert [r.path for r in js.sparsity_report(params, only_sparse=True).rows] == ["dense/kernel"]


def test_preview_matches_what_the_sparsifier_keeps():
    import math

    import jax
    import optax

    params = {
        "Dense_0": {"kernel": jnp.ones((784, 300)), "bias": jnp.ones(300)},
        "Dense_1": {"kernel": jnp.ones((300, 100))},
        "head": {"kernel": jnp.ones((100, 10))},
    }
    abstract = jax.eval_shape(lambda: params)
    preview = js.preview_sparsity(abstract, js.erk(0.9), overrides={"head": None})
    rows = {r.path: r for r in preview.rows}
    assert rows["Dense_0/bias"].sparsity is None and rows["head/kernel"].sparsity is None
    assert rows["head/kernel"].keep == 1000
    targets = js.erk(0.9)({k: v for k, v in params.items() if k != "head"})
    for name in ("Dense_0", "Dense_1"):
        row = rows[f"{name}/kernel"]
        assert row.sparsity == pytest.approx(targets[name]["kernel"])
        assert row.keep == row.size - math.floor(row.sparsity * row.size)
    counts = js.count_nonzeros(js.get_masks(js.static_sparse(optax.sgd(0.1), sparsity=js.erk(0.9), overrides={"head": None}).init(params)))
    assert {k: int(v) for k, v in counts.items()} == {n: rows[n].keep for n in ("Dense_0/kernel", "Dense_1/kernel")}
    assert preview.total.keep == sum(r.keep for r in preview.rows)
    text = str(preview)
    assert "Dense_0/kernel" in text and "dense" in text and "total" in text
    assert preview.as_dict()["target_sparsity/Dense_1/kernel"] == pytest.approx(targets["Dense_1"]["kernel"])


def _rows(report):
    return {r.path: r for r in report.rows}


def test_complies_means_nonzeros_fit_the_structure_not_equal_a_mask():
    """A kept block, N:M slot or channel holding an exact 0.0 (a weight grown at zero, as RigL
    grows them) complies; nonzeros spread over more groups than the budget do not."""
    import numpy as np

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8, 8)) + 3.0, jnp.float32)
    tiles = jnp.zeros((8, 8), bool).at[:4, 4:].set(True).at[4:, :4].set(True)  # 2 of 4 (4, 4) tiles
    blocky = jnp.where(tiles, w, 0.0).at[0, 4].set(0.0).at[5, 1].set(0.0)  # zeros inside kept tiles
    nm = jnp.where(js.n_of_m(2, 4).select(w), w, 0.0)
    nm_zero = nm.at[jnp.argmax(nm[:4, 0] != 0), 0].set(0.0)  # one kept slot of a group holds 0.0
    chans = jnp.where(jnp.arange(8) < 3, w, 0.0).at[2, 1].set(0.0)  # 3 whole output channels, one 0.0
    params = {"a": {"kernel": blocky}, "b": {"kernel": nm_zero}, "c": {"kernel": chans}}
    structure = {"^a/": js.blocks(4, 4), "^b/": js.n_of_m(2, 4), "^c/": js.channels()}
    rows = _rows(js.sparsity_report(params, structure=structure))
    assert [rows[k].complies for k in ("a/kernel", "b/kernel", "c/kernel")] == [True, True, True]
    # nonzeros in a third tile (64 - 2 * 16 = 32 zeros would fit two tiles), 3 of 4 in a group, a fourth channel
    bad = {"a": {"kernel": blocky.at[0, 0].set(1.0)}, "b": {"kernel": nm.at[:4, 0].set(1.0)},
           "c": {"kernel": chans.at[0, 5].set(1.0)}}
    rows = _rows(js.sparsity_report(bad, structure=structure))
    assert [rows[k].complies for k in ("a/kernel", "b/kernel", "c/kernel")] == [False, False, False]


@pytest.mark.compat
def test_report_reads_structures_and_budgets_from_the_state():
    import optax

    params = {"Dense_0": {"kernel": jnp.arange(1.0, 65.0).reshape(8, 8), "bias": jnp.ones(8)},
              "Dense_1": {"kernel": jnp.arange(1.0, 33.0).reshape(8, 4)}}
    tx = js.rigl(optax.sgd(0.1), sparsity=js.uniform(0.5), update_every=2, end_step=8, seed=0,
                 structure={"Dense_0": js.blocks(4, 4), "Dense_1": js.n_of_m(2, 4)})
    params, state = js.init(tx, params)
    plan = js.get_plan(state)
    assert plan["Dense_0/kernel"].keep_units == 2 and plan["Dense_0/kernel"].layout == js.blocks(4, 4)
    rows = _rows(js.sparsity_report(params, state=state))  # no structure passed by hand
    assert rows["Dense_0/kernel"].structure == "blocks(4, 4)" and rows["Dense_1/kernel"].structure.startswith("n_of_m(2, 4")
    assert rows["Dense_0/kernel"].complies and rows["Dense_1/kernel"].complies and rows["Dense_0/bias"].structure == ""
    mask = js.get_masks(state)["Dense_0"]["kernel"]
    kept = jnp.argwhere(mask)[0]
    grown_at_zero = jax_set(params, "Dense_0", params["Dense_0"]["kernel"].at[tuple(kept)].set(0.0))
    assert _rows(js.sparsity_report(grown_at_zero, state=state))["Dense_0/kernel"].complies
    # one whole tile of nonzeros off the mask: 3 tiles for a budget of 2 (without the state it
    # would fit the fewest tiles holding the nonzeros only if they were whole)
    off = jnp.argwhere(~mask)[0]
    broken = jax_set(params, "Dense_0", params["Dense_0"]["kernel"].at[tuple(off)].set(1.0))
    assert _rows(js.sparsity_report(broken, state=state))["Dense_0/kernel"].complies is False
    with pytest.raises(ValueError, match="no jaxsparse sparsifier"):
        js.sparsity_report(params, state=optax.sgd(0.1).init(params))


def jax_set(params, layer, kernel):
    return {**params, layer: {**params[layer], "kernel": kernel}}
