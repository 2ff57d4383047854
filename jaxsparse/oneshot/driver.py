"""Model-level one-shot pruning: calibration batches through a flax model, layer by layer.

:func:`prune_oneshot` finds the model's dense layers (``flax.linen.Dense`` and ``DenseGeneral``
through ``nn.intercept_methods``; ``flax.nnx.Linear`` and ``LinearGeneral`` through a patch of
their ``__call__`` while tracing, since nnx has no method interception), then prunes them one at a
time in call order. A general layer (e.g. the q/k/v ``(in, heads, head_dim)`` and output
``(heads, head_dim, out)`` projections of flax's attention) is pruned as the 2-D ``(in, out)``
matrix it multiplies by: its contracted input axes flattened into ``in``, the others into ``out``
(so N:M groups run along the flattened input axis). Layers with batch axes, convolutions and
einsums are left dense, with a warning naming them. Each
layer's input statistics are accumulated over all calibration batches with the params as
pruned so far, so every layer sees the inputs produced by the already-pruned layers before it:
the papers' sequential scheme (SparseGPT, Section 3.4 / reference ``--true-sequential``; Wanda,
Section 3), applied per layer rather than per transformer block since a generic model has no
block boundaries. Each statistics pass runs the whole model (the capture is one jit-compiled
function per input shape, shared by the layers of that shape), so the cost is ``layers x
calibration forward passes``: fine for the models one calibrates on a single host.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.distributions import as_distribution
from jaxsparse.leaves import path_to_str, select_leaves
from jaxsparse.oneshot.hessian import HessianState
from jaxsparse.oneshot.layer import check_layer, magnitude_layer, sparsegpt, wanda, wanda_scores
from jaxsparse.oneshot.owl import OWL

__all__ = ["prune_oneshot", "METHODS"]

METHODS = ("magnitude", "wanda", "sparsegpt")


class _Model:
    """A flax model as ``capture(params, rest, batch) -> {kernel name: [inputs of each call]}``
    (``rest``: an nnx model's other state, None for linen)."""

    def __init__(self, key, names: tuple, nnx: bool):
        self.key, self.names, self.nnx = key, names, nnx  # key: the linen model or apply fn, or the nnx graphdef

    @classmethod
    def wrap(cls, model, params):
        """``(_Model, params, rest)`` for a linen model, an apply function or an nnx model."""
        from flax import linen as nn

        rest = None
        if _is_nnx(model):
            from flax import nnx

            key, model_params, rest = nnx.split(model, nnx.Param, ...)
            params = model_params if params is None else params
        elif isinstance(model, nn.Module) or callable(model):
            key = model
        else:
            raise ValueError(f"prune_oneshot takes a flax linen Module, an apply function or an nnx Module; got {type(model)}")
        names = tuple(path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
        return cls(key, names, rest is not None), params, rest

    def _name_of(self, path: tuple) -> str:
        """The params leaf name of a dense layer's kernel from the module's path."""
        suffix = "/".join(str(p) for p in path) + "/kernel"
        found = [n for n in self.names if n == suffix or n.endswith("/" + suffix)]
        if len(found) != 1:
            raise ValueError(f"cannot find the kernel of dense layer {suffix!r} among the params' leaves {self.names}")
        return found[0]

    def capture(self, params, rest, batch) -> dict[str, list]:
        captured: dict[str, list] = {}
        if self.nnx:
            from flax import nnx

            module = nnx.merge(self.key, params, rest)
            paths = {id(mod): path for path, mod in nnx.iter_modules(module) if isinstance(mod, (nnx.Linear, nnx.LinearGeneral))}
            linear, general = nnx.Linear.__call__, nnx.LinearGeneral.__call__

            def capturing(original, contracted_axes):
                def call(self_, x, *args, **kwargs):
                    axes = contracted_axes(self_)
                    if id(self_) in paths and axes is not None:
                        captured.setdefault(self._name_of(paths[id(self_)]), []).append(_flatten_contracted(x, axes))
                    return original(self_, x, *args, **kwargs)

                return call

            general_axes = lambda mod: None if mod.batch_axis else mod.axis  # noqa: E731
            with _patched(nnx.Linear, "__call__", capturing(linear, lambda mod: -1)), \
                    _patched(nnx.LinearGeneral, "__call__", capturing(general, general_axes)):
                module(*_as_args(batch))
            return captured
        from flax import linen as nn

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.DenseGeneral)):
                axes = -1 if isinstance(mod, nn.Dense) else (None if mod.batch_dims else mod.axis)
                if axes is not None:
                    captured.setdefault(self._name_of(mod.path), []).append(_flatten_contracted(args[0], axes))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            if isinstance(self.key, nn.Module):
                variables = params if isinstance(params, dict) and "params" in params else {"params": params}
                self.key.apply(variables, *_as_args(batch))
            else:
                self.key(params, batch)
        return captured


def _flatten_contracted(x, axes) -> jax.Array:
    """``x`` with the axes a dense layer contracts moved last (in the layer's order, which is the
    order of its kernel's input axes) and flattened into one: ``(..., in)``."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    axes = tuple(a % x.ndim for a in axes)
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    return x.reshape(*x.shape[: x.ndim - len(axes)], math.prod(x.shape[x.ndim - len(axes):]))


def _is_nnx(model) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, nnx.Module)


def _as_args(batch) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


@contextlib.contextmanager
def _patched(cls, attr, value):
    original = getattr(cls, attr)
    setattr(cls, attr, value)
    try:
        yield
    finally:
        setattr(cls, attr, original)


def _stack(inputs: list, n_in: int) -> jax.Array:
    return jnp.concatenate([jnp.reshape(x, (-1, n_in)) for x in inputs]).astype(jnp.float32)


_STATISTICS: dict = {}  # compiled statistics functions, reused by later calls on the same model


def _statistics_fn(model: _Model, names: tuple[str, ...], n_in: int, diagonal: bool):
    """``(params, rest, batch, index) -> (sum, count)`` for ``names[index]``: one compiled
    function for the layers of one input width, the layer chosen by ``lax.switch``."""
    try:
        hash(model.key)
        identity = model.key
    except TypeError:  # a linen module with unhashable fields (nn.Sequential's list): the cached
        identity = id(model.key)  # function holds the module, so its id cannot be reused
    key = (identity, model.names, names, diagonal)
    if key in _STATISTICS:
        return _STATISTICS[key]

    @jax.jit
    def stats(params, rest, batch, index):
        captured = model.capture(params, rest, batch)
        xs = [_stack(captured[name], n_in) for name in names]
        if len({x.shape for x in xs}) > 1:  # token counts differ: one branch per layer still works
            return lax.switch(index, [functools.partial(_moments, x, diagonal) for x in xs])
        return _moments(lax.switch(index, [lambda x=x: x for x in xs]), diagonal)

    if len(_STATISTICS) > 32:
        _STATISTICS.clear()
    _STATISTICS[key] = stats
    return stats


def _moments(x, diagonal):
    s = jnp.sum(x * x, axis=0) if diagonal else jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST)
    return s, jnp.asarray(x.shape[0], jnp.int32)


def prune_oneshot(
    model,
    params,
    calibration_batches: Iterable,
    *,
    method: str = "sparsegpt",
    sparsity=None,
    n: int | None = None,
    m: int | None = None,
    include=None,
    exclude=None,
    block_size: int = 128,
    damp: float = 0.01,
    progress: bool = True,
):
    """Prune a trained flax model in one shot from calibration data, layer by layer.

    Args:
      model: a flax linen ``Module`` (called as ``model.apply({"params": params}, *batch)``), an
        apply function ``(params, batch) -> outputs`` of linen modules, or a flax nnx ``Module``
        (put it in eval mode first, ``model.eval()``, if it has dropout or batch norm).
      params: the params tree to prune (linen: the ``params`` collection, or variables holding
        it); for nnx, ``None`` (the model's ``nnx.Param`` state) or an ``nnx.State`` of them.
      calibration_batches: the model's inputs (a tuple is passed as several positional
        arguments); iterated once per pruned layer, so give a list, not a one-shot iterator.
      method: ``"sparsegpt"`` (:func:`jaxsparse.sparsegpt`), ``"wanda"``
        (:func:`jaxsparse.wanda`) or ``"magnitude"`` (the baseline: largest ``|W|`` per layer).
      sparsity: a float, a :class:`jaxsparse.Distribution` (``js.erk(0.5)``: solved over the
        pruned layers' shapes) or :func:`jaxsparse.owl` (targets from the dense model's outlier
        ratios); or give ``n`` and ``m`` for N:M instead (every layer).
      include, exclude: regexes on kernel names choosing the pruned dense layers (default: every
        ``nn.Dense`` / ``nn.DenseGeneral`` / ``nnx.Linear`` / ``nnx.LinearGeneral`` kernel, the
        general ones as their flattened ``(in, out)`` matrix; language models usually exclude the
        output head). Other kernels the selection picks (convolutions, einsums, layers with batch
        axes) stay dense, with a warning naming them.
      block_size, damp: SparseGPT's.
      progress: show a tqdm progress bar over the layers (if tqdm is installed).

    Returns:
      ``(params, masks)``: the pruned params (same structure; an ``nnx.State`` for nnx: apply it
      with ``nnx.update(model, params)``) and a params-shaped tree of bool keep masks (``None``
      for leaves not pruned), ready for a sparse fine-tune that keeps them::

          params, masks = js.prune_oneshot(model, params, batches, method="wanda", n=2, m=4)
          tx = js.static_sparse(optax.adam(1e-4), masks=masks)
          params, opt_state = js.init(tx, params)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if sparsity is None and n is None and m is None:
        raise ValueError("give a sparsity (a float, a Distribution or js.owl(...)), or n and m for N:M")
    if sparsity is not None and (n is not None or m is not None):
        raise ValueError("give either sparsity or n and m, not both")
    batches = list(calibration_batches)
    wrapped, params, rest = _Model.wrap(model, params)
    # Which dense layers exist, in call order, and their input widths (one trace, no compute).
    if not batches:
        raise ValueError("prune_oneshot needs at least one calibration batch (to find the dense layers)")
    order: dict[str, int] = {}

    def find(p, b):
        captured = wrapped.capture(p, rest, b)
        for name, xs in captured.items():
            order.setdefault(name, xs[0].shape[-1])
        return 0

    jax.eval_shape(find, params, batches[0])
    chosen = select_leaves(params, include, exclude)
    layers = [name for name in order if chosen.get(name, False)]
    leaves = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    left_dense = [
        f"{name} {tuple(leaves[name].shape)}" for name, keep in chosen.items()
        if keep and name not in order and name.rsplit("/", 1)[-1] == "kernel"
    ]
    if left_dense:
        warnings.warn(
            "prune_oneshot prunes dense layers (linen Dense / DenseGeneral, nnx Linear / LinearGeneral, without "
            f"batch axes); these kernels are not such layers and stay dense: {left_dense}",
            stacklevel=2,
        )
    if not layers:
        raise ValueError(f"no dense layer to prune: dense kernels are {list(order)}")
    # every layer as the 2-D (in, out) matrix it multiplies by (general layers flattened)
    matrices = {name: leaves[name] if leaves[name].ndim == 2 else jnp.reshape(leaves[name], (order[name], -1))
                for name in layers}
    for name in layers:
        check_layer(name, matrices[name], order[name], n=n, m=m, sparsity=None if n is not None else 0.0)

    def statistics(current, name, diagonal):
        same = tuple(x for x in layers if order[x] == order[name])
        fn = _statistics_fn(wrapped, same, order[name], diagonal)
        total, count = None, 0
        for batch in batches:
            s, c = fn(current, rest, batch, same.index(name))
            total, count = (s if total is None else total + s), count + c
        return HessianState(total, jnp.asarray(count, jnp.int32))

    # Per-layer targets.
    targets: dict[str, Any] = {name: None for name in layers}
    if n is None:
        dist = as_distribution(sparsity)
        if isinstance(dist, OWL):
            scores = {name: wanda_scores(matrices[name], statistics(params, name, True)) for name in layers}
            targets = dist.solve_scores(scores)
        else:
            targets = dist.solve({name: tuple(leaves[name].shape) for name in layers})

    bar = _progress(layers, progress, method)
    masks: dict[str, jax.Array] = {}
    for name in bar:
        weight = matrices[name]
        kwargs = dict(sparsity=targets[name], n=n, m=m, return_mask=True, name=name)
        if method == "magnitude":
            pruned, keep = magnitude_layer(weight, **kwargs)
        elif method == "wanda":
            pruned, keep = wanda(weight, statistics(params, name, True), **kwargs)
        else:
            pruned, keep = sparsegpt(weight, statistics(params, name, False), block_size=block_size, damp=damp, **kwargs)
        shape = leaves[name].shape
        leaves[name], masks[name] = pruned.reshape(shape), keep.reshape(shape)
        params = jax.tree_util.tree_map_with_path(lambda p, x: leaves.get(path_to_str(p), x), params)
    masks_tree = jax.tree_util.tree_map_with_path(lambda p, _: masks.get(path_to_str(p)), params)
    return params, masks_tree


def _progress(layers, enabled, method):
    if not enabled:
        return layers
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return layers
    return tqdm(layers, desc=f"{method} one-shot", unit="layer")
