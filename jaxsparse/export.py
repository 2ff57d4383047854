"""Compressed formats for sparse params: export, exact round trip, safetensors and orbax files.

``compress(params, masks, format=...)`` returns a tree of the params' structure in which every
sparsified leaf is a compressed record and every other leaf stays a dense array;
``decompress`` gives the dense params back, bit for bit. Three formats:

- ``"bitmask"`` (:class:`BitmaskTensor`): the sparse-bitmask layout of Neural Magic's
  compressed-tensors (the format vLLM loads): the kept values in row-major order, a packed bitmask
  of shape ``(rows, ceil(cols / 8))`` (``uint8``, little bit order: bit ``j % 8`` of byte
  ``j // 8`` is column ``j``), and ``row_offsets`` (``int64``, where each row's values start).
  A leaf of rank other than 2 is viewed as ``(prod(shape[:-1]), shape[-1])``.
- ``"nm"`` (:class:`NMTensor`): N:M semi-structured sparsity as sparse tensor cores take it
  (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378): along the
  reduction axis, every group of ``m`` entries keeps ``n`` values, stored densely
  (``(rows, K // m * n)``), plus each value's position within its group as a
  ``ceil(log2 m)``-bit index packed into bytes, lowest bits first (for 2:4, 2-bit indices, four
  to a byte: the metadata layout of cuSPARSELt before its hardware reordering). Rows are the
  other axes, in order; a group with fewer than ``n`` kept entries is padded with zeros at
  its first unused positions, as the hardware needs exactly ``n`` indices per group.
- ``"bcsr"``: ``pallas_kernels``' :class:`~pallas_kernels.bsr_format.BlockSparseMatrix` (padded
  block CSR of ``(K, N)`` kernels, ``block_shape`` blocks), which ``bsr_matmul`` multiplies
  directly.

Files: :func:`save_compressed` / :func:`load_compressed` write and read a safetensors file
(tensors named ``"<leaf path>.<field>"``, as compressed-tensors names them, and a metadata header
``"jaxsparse"`` holding JSON with the formats used and every leaf's kind, shape, dtype and tensors) or an orbax
checkpoint directory (the same tensors with the same header as a JSON item). Loading checks every
tensor against the header and raises a ValueError naming the leaf and what differs; saving writes
to a temporary name and renames, so a failed save leaves an existing file as it was.

Compression runs on the host with numpy: its output sizes depend on the data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.leaves import path_to_str
from jaxsparse.masks import is_none, masks_from_params

__all__ = [
    "FORMATS",
    "BitmaskTensor",
    "NMTensor",
    "compress",
    "decompress",
    "compressed_nbytes",
    "bitmask_nbytes",
    "save_compressed",
    "load_compressed",
]

FORMATS = ("bitmask", "nm", "bcsr")
_HEADER_KEY = "jaxsparse"
_VERSION = 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BitmaskTensor:
    """A leaf in compressed-tensors' sparse-bitmask layout (see the module docstring).

    Attributes:
      compressed: 1-D kept values, row-major.
      bitmask: ``uint8 (rows, ceil(cols / 8))``, little bit order.
      row_offsets: ``int64 (rows,)``, index in ``compressed`` of each row's first value.
      shape: the dense leaf's shape (static).
    """

    compressed: Any
    bitmask: Any
    row_offsets: Any
    shape: tuple = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMTensor:
    """A leaf in N:M layout (see the module docstring).

    Attributes:
      values: ``(rows, K // m * n)``: the kept values of each group of ``m`` along ``axis``.
      indices: ``uint8 (rows, ceil(K // m * n * bits / 8))``: each value's position in its
        group, ``bits = ceil(log2 m)`` bits each, lowest bits first.
      shape, n, m, axis: the dense shape, the pattern and the (normalised) reduction axis
        (static).
    """

    values: Any
    indices: Any
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))


def _bsr():
    from pallas_kernels.bsr_format import BlockSparseMatrix  # the kernels package stands alone: import on use

    return BlockSparseMatrix


def _is_record(x) -> bool:
    return isinstance(x, (BitmaskTensor, NMTensor)) or type(x).__name__ == "BlockSparseMatrix"


def _rows_view(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _pack_fields(fields: np.ndarray, bits: int) -> np.ndarray:
    """``(rows, count)`` small unsigned ints packed ``bits`` each into bytes along the last
    axis, lowest bits first."""
    as_bits = (fields[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (rows, count, bits)
    return np.packbits(as_bits.reshape(fields.shape[0], -1).astype(bool), axis=-1, bitorder="little")


def _unpack_fields(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    as_bits = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    as_bits = as_bits.reshape(packed.shape[0], count, bits).astype(np.uint8)
    return np.sum(as_bits << np.arange(bits, dtype=np.uint8), axis=-1, dtype=np.uint8)


def _check_off_mask(name, w, mask):
    stray = (w != 0) & ~mask
    if stray.any():
        where = tuple(int(i) for i in np.argwhere(stray)[0])
        raise ValueError(
            f"leaf {name!r} of shape {w.shape} has {int(stray.sum())} nonzero entries outside its mask "
            f"(first at index {where}, value {w[where]!r}): compressing would lose them; apply the masks first "
            "(js.apply_masks) or pass the masks the params were trained with"
        )


def _bitmask(name, w, mask) -> BitmaskTensor:
    _check_off_mask(name, w, mask)
    rows, cols = _rows_view(w.shape)
    keep = mask.reshape(rows, cols)
    per_row = keep.sum(axis=1, dtype=np.int64)
    return BitmaskTensor(
        compressed=w.reshape(rows, cols)[keep],
        bitmask=np.packbits(keep, axis=-1, bitorder="little"),
        row_offsets=np.cumsum(per_row) - per_row,
        shape=tuple(w.shape),
    )


def _from_bitmask(x: BitmaskTensor) -> np.ndarray:
    rows, cols = _rows_view(x.shape)
    keep = np.unpackbits(np.asarray(x.bitmask), axis=-1, count=cols, bitorder="little").astype(bool)
    values = np.asarray(x.compressed)
    out = np.zeros((rows, cols), values.dtype)
    out[keep] = values
    return out.reshape(x.shape)


def _groups_last(w, axis):
    """``w`` with ``axis`` moved last and flattened to ``(rows, K)``."""
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def _nm(name, w, mask, n, m, axis) -> NMTensor:
    _check_off_mask(name, w, mask)
    if w.ndim < 1:
        raise ValueError(f"leaf {name!r} is a scalar: N:M export needs an axis of groups")
    axis = axis % w.ndim
    k = w.shape[axis]
    if k % m:
        raise ValueError(
            f"leaf {name!r} of shape {w.shape}: axis {axis} has {k} entries, not a multiple of m={m} for {n}:{m} export"
        )
    values, _ = _groups_last(w, axis)
    keep, _ = _groups_last(mask, axis)
    rows = values.shape[0]
    keep = keep.reshape(rows, k // m, m)
    per_group = keep.sum(axis=-1)
    if (per_group > n).any():
        r, g = (int(i) for i in np.argwhere(per_group > n)[0])
        at = list(np.unravel_index(r, tuple(d for i, d in enumerate(w.shape) if i != axis)))
        at.insert(axis, slice(g * m, g * m + m))
        where = ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(int(s)) for s in at)
        raise ValueError(
            f"leaf {name!r} of shape {w.shape} is not {n}:{m} along axis {axis}: {int((per_group > n).sum())} groups "
            f"keep more than {n} of {m} entries (first: [{where}] keeps {int(per_group[r, g])})"
        )
    # Exactly n positions per group, increasing: the kept ones and, where fewer, the first
    # unused ones (they hold zeros). A stable sort of "not kept" lists kept positions first.
    order = np.argsort(~keep, axis=-1, kind="stable")
    slots = np.sort(order[..., :n], axis=-1)
    taken = np.take_along_axis(values.reshape(rows, k // m, m), slots, axis=-1)
    return NMTensor(
        values=taken.reshape(rows, -1),
        indices=_pack_fields(slots.reshape(rows, -1).astype(np.uint8), _index_bits(m)),
        shape=tuple(w.shape),
        n=n,
        m=m,
        axis=axis,
    )


def _from_nm(x: NMTensor) -> np.ndarray:
    values = np.asarray(x.values)
    rows, count = values.shape
    slots = _unpack_fields(np.asarray(x.indices), count, _index_bits(x.m)).astype(np.int64)
    groups = count // x.n
    out = np.zeros((rows, groups, x.m), values.dtype)
    np.put_along_axis(out, slots.reshape(rows, groups, x.n), values.reshape(rows, groups, x.n), axis=-1)
    moved = list(x.shape)
    moved.append(moved.pop(x.axis))
    return np.moveaxis(out.reshape(moved), -1, x.axis)


def _bcsr(name, w, mask, block_shape):
    _check_off_mask(name, w, mask)
    if w.ndim != 2:
        raise ValueError(f"leaf {name!r} of shape {w.shape}: bcsr export takes 2-D (K, N) kernels")
    try:
        return _bsr().from_dense(jnp.asarray(w), block_shape, mask=jnp.asarray(mask))
    except ValueError as e:
        raise ValueError(f"leaf {name!r}: {e}") from None


def compress(params, masks=None, *, format: str = "bitmask", n: int = 2, m: int = 4, axis: int = -2,
             block_shape=(32, 32)):
    """Compress the sparsified leaves of ``params``; other leaves stay dense arrays.

    Args:
      params: the sparse params (a pytree of arrays).
      masks: a mask tree (``js.get_masks(opt_state)``): a leaf with a mask is compressed with the
        mask as its pattern (so a kept weight that happens to be 0.0 stays kept), a leaf with
        ``None`` stays dense. Default: the nonzeros of the leaves sparsified by default
        (:func:`jaxsparse.masks_from_params`).
      format: ``"bitmask"``, ``"nm"`` or ``"bcsr"`` (see the module docstring).
      n, m, axis: the N:M pattern and its reduction axis (default ``-2``: the input axis of a
        flax ``(in, out)`` or ``(h, w, in, out)`` kernel), for ``"nm"``.
      block_shape: ``(bk, bn)`` blocks, for ``"bcsr"``.

    Returns:
      A tree of the params' structure with records (:class:`BitmaskTensor`, :class:`NMTensor`,
      ``BlockSparseMatrix``) at the compressed leaves; :func:`decompress` inverts it exactly.

    Raises:
      ValueError: an unknown format; a leaf with nonzeros outside its mask; for ``"nm"``, a
        leaf that is not N:M (naming the leaf and its first group with more than ``n``); for
        ``"bcsr"``, a leaf that is not a 2-D kernel divisible into blocks.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
    if format == "nm" and not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m <= 256):
        raise ValueError(f"n:m must be ints with 0 < n <= m <= 256; got {n}:{m}")
    if masks is None:
        masks = masks_from_params(params)

    def one(path, mask, w):
        if mask is None:
            return w
        name = path_to_str(path)
        w, mask = np.asarray(jax.device_get(w)), np.asarray(jax.device_get(mask))
        if mask.shape != w.shape or mask.dtype != bool:
            raise ValueError(f"mask of leaf {name!r} is {mask.dtype}{list(mask.shape)}; expected bool{list(w.shape)}")
        if format == "bitmask":
            return _bitmask(name, w, mask)
        if format == "nm":
            return _nm(name, w, mask, n, m, axis)
        return _bcsr(name, w, mask, block_shape)

    return jax.tree_util.tree_map_with_path(one, masks, params, is_leaf=is_none)


def _dense(x):
    if isinstance(x, BitmaskTensor):
        return jnp.asarray(_from_bitmask(x))
    if isinstance(x, NMTensor):
        return jnp.asarray(_from_nm(x))
    if _is_record(x):
        return x.to_dense()
    return x


def decompress(compressed):
    """The dense params of a tree from :func:`compress` (or :func:`load_compressed`), exactly:
    the kept values where they were, 0.0 elsewhere, in the original dtypes."""
    return jax.tree.map(_dense, compressed, is_leaf=_is_record)


def bitmask_nbytes(shape, nonzeros: int, dtype) -> int:
    """Bytes of a leaf of ``shape`` with ``nonzeros`` kept values in the bitmask format: values,
    packed bits, row offsets and the shape tensor (what :func:`save_compressed` stores)."""
    rows, cols = _rows_view(shape)
    return nonzeros * np.dtype(dtype).itemsize + rows * math.ceil(cols / 8) + rows * 8 + len(shape) * 8


def compressed_nbytes(tree) -> int:
    """Bytes of the tensors :func:`save_compressed` stores for a (compressed) tree, header aside."""
    return sum(int(x.nbytes) for x in _flatten(tree)[0].values())


# -- files ---------------------------------------------------------------------------------------


def _record_fields(x) -> tuple[str, dict, dict]:
    """``(kind, {field: array}, static info)`` of a leaf of a compressed tree."""
    if isinstance(x, BitmaskTensor):
        arrays = {"compressed": x.compressed, "bitmask": x.bitmask, "row_offsets": x.row_offsets,
                  "shape": np.asarray(x.shape, np.int64)}
        return "bitmask", arrays, {}
    if isinstance(x, NMTensor):
        return "nm", {"values": x.values, "indices": x.indices}, {"n": x.n, "m": x.m, "axis": x.axis}
    if _is_record(x):
        p = x.pattern
        arrays = {"data": x.data, "col_rows": p.col_rows, "col_counts": p.col_counts, "row_cols": p.row_cols,
                  "row_slots": p.row_slots, "row_counts": p.row_counts}
        return "bcsr", arrays, {"block_shape": list(x.block_shape)}
    return "dense", {"dense": x}, {}


def _leaf_dtype(kind, arrays):
    return str(np.dtype(arrays[{"bitmask": "compressed", "nm": "values", "bcsr": "data"}.get(kind, "dense")].dtype))


def _flatten(compressed) -> tuple[dict, dict]:
    tensors, leaves = {}, {}
    for path, x in jax.tree_util.tree_flatten_with_path(compressed, is_leaf=_is_record)[0]:
        name = path_to_str(path)
        kind, arrays, static = _record_fields(x)
        shape = list(x.shape) if kind != "dense" else list(np.shape(x))
        arrays = {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()}
        leaves[name] = {"kind": kind, "shape": shape, "dtype": _leaf_dtype(kind, arrays),
                        "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}, **static}
        for field, v in arrays.items():
            tensors[f"{name}.{field}"] = v
    formats = sorted({info["kind"] for info in leaves.values()} - {"dense"})
    return tensors, {"version": _VERSION, "formats": formats, "leaves": leaves}


def _unflatten(tensors: dict, header: dict, source: str):
    """The compressed tree (nested dicts by leaf path) from flat tensors, every tensor checked
    against the header first."""
    leaves = header.get("leaves")
    if not isinstance(leaves, dict):
        raise ValueError(f"{source}: the jaxsparse header has no leaf table; not a file written by save_compressed")
    for name, info in leaves.items():
        for field, (shape, dtype) in info["tensors"].items():
            key = f"{name}.{field}"
            if key not in tensors:
                raise ValueError(f"{source}: leaf {name!r} ({info['kind']}) is missing its tensor {key!r}")
            got = tensors[key]
            if list(got.shape) != list(shape) or str(got.dtype) != dtype:
                raise ValueError(
                    f"{source}: leaf {name!r}: tensor {key!r} is {got.dtype}{list(got.shape)}, the header says "
                    f"{dtype}{list(shape)}"
                )
    out: dict = {}
    for name, info in leaves.items():
        arrays = {f: tensors[f"{name}.{f}"] for f in info["tensors"]}
        shape, kind = tuple(info["shape"]), info["kind"]
        if kind == "bitmask":
            leaf = BitmaskTensor(arrays["compressed"], arrays["bitmask"], arrays["row_offsets"], shape)
        elif kind == "nm":
            leaf = NMTensor(arrays["values"], arrays["indices"], shape, info["n"], info["m"], info["axis"])
        elif kind == "bcsr":
            from pallas_kernels.bsr_format import BlockSparsePattern

            pattern = BlockSparsePattern(
                *(jnp.asarray(arrays[f]) for f in ("col_rows", "col_counts", "row_cols", "row_slots", "row_counts")),
                shape=shape, block_shape=tuple(info["block_shape"]),
            )
            leaf = _bsr()(jnp.asarray(arrays["data"]), pattern)
        else:
            leaf = jnp.asarray(arrays["dense"])
        node = out
        parts = name.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return out


def _restructure(loaded, like, source):
    """``loaded`` (nested dicts) in the tree structure of ``like`` (params or a compressed tree),
    checking leaf names and dense shapes."""
    flat = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded, is_leaf=_is_record)[0]}
    want = jax.tree_util.tree_flatten_with_path(like, is_leaf=_is_record)[0]
    names = [path_to_str(p) for p, _ in want]
    missing, extra = [n for n in names if n not in flat], [n for n in flat if n not in names]
    if missing or extra:
        raise ValueError(f"{source}: its leaves differ from the target's: missing {missing}, unexpected {extra}")
    for (path, x), name in zip(want, names):
        if tuple(flat[name].shape) != tuple(x.shape):
            raise ValueError(f"{source}: leaf {name!r} has shape {tuple(flat[name].shape)}, the target {tuple(x.shape)}")
    return jax.tree_util.tree_unflatten(jax.tree.structure(like, is_leaf=_is_record), [flat[n] for n in names])


def _atomic_target(path: str):
    """A temporary sibling of ``path``: written first, then renamed over it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path), dir=directory)


def save_compressed(path, compressed, *, backend: str = "safetensors") -> None:
    """Save a tree from :func:`compress` (dense trees work too) to ``path``.

    ``backend="safetensors"``: one file; tensors ``"<leaf path>.<field>"`` (``.compressed``,
    ``.bitmask``, ``.row_offsets``, ``.shape`` for bitmask leaves, as compressed-tensors names
    them), metadata ``{"format": "jaxsparse", "jaxsparse": <JSON: every leaf's kind, shape,
    dtype and tensors>}``. ``backend="orbax"``: a checkpoint directory holding the same tensors
    and header. Written under a temporary name and renamed, so an error leaves ``path`` as it was.
    """
    if backend not in ("safetensors", "orbax"):
        raise ValueError(f"backend must be 'safetensors' or 'orbax'; got {backend!r}")
    path = os.fspath(path)
    tensors, header = _flatten(compressed)
    tmp = _atomic_target(path)
    try:
        if backend == "safetensors":
            from safetensors.numpy import save_file

            staged = os.path.join(tmp, "file.safetensors")
            save_file(tensors, staged, metadata={"format": "jaxsparse", _HEADER_KEY: json.dumps(header)})
            os.replace(staged, path)
        else:
            import orbax.checkpoint as ocp

            staged = os.path.join(tmp, "ckpt")
            names = sorted(tensors)  # orbax keys are path parts: the tensors go as a list, named in the header
            header = {**header, "order": names}
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
                ckptr.save(staged, ocp.args.Composite(tensors=ocp.args.StandardSave([tensors[k] for k in names]),
                                                      header=ocp.args.JsonSave(header)))
            if os.path.isdir(path):
                os.rename(path, tmp + "-old")
            os.replace(staged, path)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp + "-old", ignore_errors=True)


def load_compressed(path, *, like=None, backend: str | None = None):
    """Load what :func:`save_compressed` wrote; pass it to :func:`decompress` for dense params.

    Args:
      path: a ``.safetensors`` file or an orbax directory (``backend`` None: chosen by which
        ``path`` is).
      like: optional params (or ``jax.eval_shape`` of them, or a compressed tree) whose tree
        structure the result takes; leaf names and shapes are checked against it. Without it the
        result is nested dicts keyed by the parts of each leaf path.

    Raises:
      ValueError: a file without the jaxsparse header, a tensor missing or of another shape or
        dtype than the header says, or leaves that differ from ``like`` (naming the leaf).
    """
    path = os.fspath(path)
    backend = backend or ("orbax" if os.path.isdir(path) else "safetensors")
    if backend == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                header = (f.metadata() or {}).get(_HEADER_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        import orbax.checkpoint as ocp

        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(path, ocp.args.Composite(tensors=ocp.args.StandardRestore(),
                                                              header=ocp.args.JsonRestore()))
        header, arrays = restored["header"], restored["tensors"]
        if isinstance(arrays, dict):  # restored without a target, a list may come back keyed "0", "1", ...
            arrays = [arrays[k] for k in sorted(arrays, key=int)]
        tensors = dict(zip(header.get("order", []), (np.asarray(a) for a in arrays)))
    if header is None:
        raise ValueError(f"{path}: no '{_HEADER_KEY}' metadata header; not a file written by save_compressed")
    loaded = _unflatten(tensors, json.loads(header) if isinstance(header, str) else header, path)
    return loaded if like is None else _restructure(loaded, like, path)
