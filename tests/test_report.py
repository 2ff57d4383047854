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
