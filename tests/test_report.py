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
