"""flax.serialization support for the block-sparse types, so ``flax.serialization.to_bytes`` /
``from_bytes`` and ``to_state_dict`` work on variables holding them (imported by the layers)."""

from flax import serialization

from pallas_kernels import BlockSparseMatrix, BlockSparsePattern


def _pattern_to_state(pattern):
    return {field: getattr(pattern, field) for field in BlockSparsePattern.INDEX_FIELDS}


def _pattern_from_state(target, state):
    arrays = [serialization.from_state_dict(getattr(target, f), state[f]) for f in BlockSparsePattern.INDEX_FIELDS]
    return BlockSparsePattern(*arrays, shape=target.shape, block_shape=target.block_shape)


def _matrix_to_state(matrix):
    return {"data": matrix.data, "pattern": serialization.to_state_dict(matrix.pattern)}


def _matrix_from_state(target, state):
    return BlockSparseMatrix(
        serialization.from_state_dict(target.data, state["data"]),
        serialization.from_state_dict(target.pattern, state["pattern"]),
    )


serialization.register_serialization_state(BlockSparsePattern, _pattern_to_state, _pattern_from_state, override=True)
serialization.register_serialization_state(BlockSparseMatrix, _matrix_to_state, _matrix_from_state, override=True)
