import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js


def tree():
    return {"w": jnp.array([[1.0, 0.0], [2.0, -3.0]]), "b": jnp.array([0.0, 1.0]), "n": jnp.array([[1, 0]], jnp.int32)}


@pytest.mark.compat
def test_build_apply_count():
    params = tree()
    masks = js.masks_from_params(params)
    assert masks["b"] is None and masks["n"] is None
    np.testing.assert_array_equal(masks["w"], [[True, False], [True, True]])
    assert {k: int(v) for k, v in js.count_nonzeros(masks).items()} == {"w": 3}
    assert float(js.mask_sparsity(masks)) == pytest.approx(0.25)
    dense = js.dense_masks(params)
    assert int(js.count_nonzeros(dense)["w"]) == 4
    masked = js.apply_masks(jax.tree.map(lambda x: x + 1, params), masks)
    np.testing.assert_array_equal(masked["w"], [[2.0, 0.0], [3.0, -2.0]])
    np.testing.assert_array_equal(masked["b"], [1.0, 2.0])  # not sparsified: untouched
    assert masked["w"].dtype == params["w"].dtype


def test_check_structure_names_the_leaf():
    masks = js.dense_masks(tree())
    with pytest.raises(ValueError, match=r"missing leaves \['w'\]"):
        js.masks.check_structure(masks, {"b": jnp.zeros(2), "n": jnp.zeros((1, 2)), "v": jnp.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"leaf 'w' has shape \(3, 2\).*\(2, 2\)"):
        js.masks.check_structure(masks, {**tree(), "w": jnp.zeros((3, 2))})
