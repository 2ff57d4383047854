import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_masks as am


def _blocks_of(token_mask, block_q, block_k):
    """Reference: a block is kept when any token pair inside it is allowed."""
    sq, sk = token_mask.shape
    return token_mask.reshape(sq // block_q, block_q, sk // block_k, block_k).any(axis=(1, 3))[None]


def _tokens(seq_q, seq_k, allowed):
    """Token-level pattern from a per-pair predicate, by brute force."""
    return np.array([[allowed(i, j) for j in range(seq_k)] for i in range(seq_q)], bool)


SHAPES = [(64, 64, 16, 16), (48, 96, 16, 32), (96, 32, 32, 8)]  # square, wider keys, taller queries


@pytest.mark.compat
@pytest.mark.parametrize("seq_q,seq_k,bq,bk", SHAPES)
def test_static_builders_cover_their_token_patterns(seq_q, seq_k, bq, bk):
    blocks = dict(block_q=bq, block_k=bk)
    cases = [
        (am.full_mask(seq_q, seq_k, **blocks), lambda i, j: True),
        (am.causal_mask(seq_q, seq_k, **blocks), lambda i, j: j <= i),
        (am.sliding_window_mask(seq_q, seq_k, 5, **blocks), lambda i, j: abs(i - j) <= 5),
        (am.sliding_window_mask(seq_q, seq_k, 20, causal=True, **blocks), lambda i, j: i - 20 <= j <= i),
        (am.global_tokens_mask(seq_q, seq_k, 3, **blocks), lambda i, j: i < 3 or j < 3),
        (am.global_tokens_mask(seq_q, seq_k, 0, **blocks), lambda i, j: False),
    ]
    for got, allowed in cases:
        want = _blocks_of(_tokens(seq_q, seq_k, allowed), bq, bk)
        assert got.dtype == bool and got.shape == (1, seq_q // bq, seq_k // bk)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seq_q,seq_k,bq,bk", SHAPES)
@pytest.mark.parametrize("dilation,num_blocks,causal", [(2, None, False), (3, 1, False), (2, 2, True), (1, 1, True)])
def test_dilated_mask(seq_q, seq_k, bq, bk, dilation, num_blocks, causal):
    def allowed(i, j):
        dist = i // bk - j // bk
        ok = dist % dilation == 0
        if num_blocks is not None:
            ok &= abs(dist) <= num_blocks * dilation
        return ok and (dist >= 0 or not causal)

    got = am.dilated_mask(seq_q, seq_k, dilation, num_blocks=num_blocks, block_q=bq, block_k=bk, causal=causal)
    np.testing.assert_array_equal(got, _blocks_of(_tokens(seq_q, seq_k, allowed), bq, bk))


def test_combinators():
    blocks = dict(block_q=16, block_k=16)
    window = am.sliding_window_mask(64, 64, 10, **blocks)
    glob = am.global_tokens_mask(64, 64, 4, **blocks)
    causal = am.causal_mask(64, 64, **blocks)
    np.testing.assert_array_equal(am.union(window, glob), window | glob)
    np.testing.assert_array_equal(am.intersection(window, glob, causal), window & glob & causal)
    heads = am.stack_heads(window, glob[0], causal)
    assert heads.shape == (3, 4, 4)
    np.testing.assert_array_equal(heads[1], glob[0])
    assert am.block_density(am.full_mask(64, 64, **blocks)) == 1.0
    assert am.block_density(causal) == pytest.approx(10 / 16)


def test_builder_errors():
    with pytest.raises(ValueError, match="seq_q=60, block_q=16"):
        am.causal_mask(60, 64, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="window"):
        am.sliding_window_mask(64, 64, -1, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="num_global"):
        am.global_tokens_mask(64, 64, 65, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="dilation"):
        am.dilated_mask(64, 64, 0, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="broadcast"):
        am.union(np.ones((1, 4, 4), bool), np.ones((1, 3, 4), bool))
    with pytest.raises(ValueError, match="one shape"):
        am.stack_heads(np.ones((4, 4), bool), np.ones((3, 4), bool))


def _topk_reference(q, k, top_k, bq, bk, causal):
    """Numpy: pooled scores, causal restriction with the diagonal forced in, top_k per row."""
    heads, sq, d = q.shape
    kv_heads, sk, _ = k.shape
    pq = q.reshape(heads, sq // bq, bq, d).mean(2)
    pk = k.reshape(kv_heads, sk // bk, bk, d).mean(2)
    out = np.zeros((heads, sq // bq, sk // bk), bool)
    for h in range(heads):
        s = pq[h] @ pk[h // (heads // kv_heads)].T
        for i in range(s.shape[0]):
            cand = list(range(s.shape[1]))
            if causal:
                last = min((i * bq + bq - 1) // bk, s.shape[1] - 1)
                cand = [j for j in cand if j * bk <= i * bq + bq - 1]
                rest = sorted((j for j in cand if j != last), key=lambda j: -s[i, j])
                chosen = [last] + rest[: top_k - 1]
            else:
                chosen = sorted(cand, key=lambda j: -s[i, j])[:top_k]
            out[h, i, chosen] = True
    return out


@pytest.mark.compat
@pytest.mark.parametrize("causal", [False, True])
def test_topk_mask_matches_reference_and_jits(causal):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 4, 64, 8)).astype(np.float32)  # batch 2, 4 query heads
    k = rng.normal(size=(2, 2, 96, 8)).astype(np.float32)  # 2 kv heads (GQA)
    mask = jax.jit(lambda q, k: am.topk_mask(q, k, 3, block_q=16, block_k=16, causal=causal))(q, k)
    assert mask.dtype == jnp.bool_ and mask.shape == (2, 4, 4, 6)
    for b in range(2):
        np.testing.assert_array_equal(mask[b], _topk_reference(q[b], k[b], 3, 16, 16, causal))
    counts = np.asarray(mask).sum(-1)
    allowed = am.causal_mask(64, 96, block_q=16, block_k=16).sum(-1) if causal else 6
    np.testing.assert_array_equal(counts, np.broadcast_to(np.minimum(3, allowed), counts.shape))  # early rows: fewer


def test_topk_mask_errors():
    q, k = jnp.ones((2, 64, 8)), jnp.ones((2, 64, 8))
    with pytest.raises(ValueError, match="top_k"):
        am.topk_mask(q, k, 5, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="divisible by kv_heads"):
        am.topk_mask(jnp.ones((3, 64, 8)), k, 1, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="block_k=24"):
        am.topk_mask(q, k, 1, block_q=16, block_k=24)
