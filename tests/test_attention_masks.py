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


# --- Token-level rules and their block classification.

RULES = {
    "causal": (lambda: am.causal_fn(), lambda b, i, j: j <= i),
    "causal_offset": (lambda: am.causal_fn(offset=32), lambda b, i, j: j <= i + 32),
    "window_left": (lambda: am.sliding_window_fn(9), lambda b, i, j: i - 9 <= j <= i),
    "window_both": (lambda: am.sliding_window_fn(9, right=4), lambda b, i, j: i - 9 <= j <= i + 4),
    "global": (lambda: am.global_tokens_fn(3), lambda b, i, j: i < 3 or j < 3),
    "documents": (lambda: am.document_fn(np.repeat([0, 1, 2], [20, 7, 69])[:96]), lambda b, i, j: (i < 20) == (j < 20) and (20 <= i < 27) == (20 <= j < 27)),
    "prefix_lm": (lambda: am.prefix_lm_fn(11), lambda b, i, j: j < 11 or j <= i),
    "prefix_per_example": (lambda: am.prefix_lm_fn(np.array([5, 30])), lambda b, i, j: j < (5, 30)[b] or j <= i),
    "window_or_global_and_causal": (
        lambda: am.and_fn(am.or_fn(am.sliding_window_fn(6, 6), am.global_tokens_fn(2)), am.causal_fn()),
        lambda b, i, j: (abs(i - j) <= 6 or i < 2 or j < 2) and j <= i,
    ),
}


@pytest.mark.compat
@pytest.mark.parametrize("name", list(RULES))
def test_rules_and_block_kinds_match_brute_force(name):
    make, allowed = RULES[name]
    seq_q, seq_k, bq, bk = 64, 96, 16, 32
    rule = make()
    per_example = name == "prefix_per_example"
    tokens = np.stack([_tokens(seq_q, seq_k, lambda i, j, b=b: allowed(b, i, j)) for b in range(2 if per_example else 1)])
    got = np.broadcast_to(np.asarray(rule(np.arange(tokens.shape[0])[:, None, None], 0, np.arange(seq_q)[:, None], np.arange(seq_k)[None])), tokens.shape)
    np.testing.assert_array_equal(got, tokens)
    blocks = tokens.reshape(-1, seq_q // bq, bq, seq_k // bk, bk)
    want_kinds = np.where(blocks.all((2, 4)), am.FULL, np.where(blocks.any((2, 4)), am.PARTIAL, am.EMPTY))
    kinds = am.block_kinds(rule, seq_q, seq_k, block_q=bq, block_k=bk, heads=3, batch=2)
    assert isinstance(kinds, np.ndarray) and kinds.shape == (2 if per_example else 1, 1, 4, 3)  # dims the rule ignores are 1
    np.testing.assert_array_equal(kinds[:, 0], want_kinds)
    mask = am.block_mask_from_fn(rule, seq_q, seq_k, block_q=bq, block_k=bk, heads=3, batch=2 if per_example else None)
    assert mask.shape == ((2, 3, 4, 3) if per_example else (3, 4, 3)) and mask.dtype == bool
    np.testing.assert_array_equal(mask[..., 0, :, :] if per_example else mask[0], blocks.any((2, 4)) if per_example else blocks.any((2, 4))[0])


def test_block_mask_from_fn_per_head_and_traced():
    rule = lambda b, h, q, k: k <= q - 16 * h  # head h looks h blocks back at least
    mask = am.block_mask_from_fn(rule, 64, 64, block_q=16, block_k=16, heads=2)
    np.testing.assert_array_equal(mask[0], np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(mask[1], np.tril(np.ones((4, 4), bool), -1))
    seg = np.repeat([0, 1], 32)
    traced = jax.jit(lambda s: am.block_mask_from_fn(am.document_fn(s), 64, 64, block_q=16, block_k=16))(seg)
    np.testing.assert_array_equal(traced, am.block_mask_from_fn(am.document_fn(seg), 64, 64, block_q=16, block_k=16))
    with pytest.raises(ValueError, match="broadcast"):
        am.block_mask_from_fn(lambda b, h, q, k: jnp.ones((3, 5), bool), 64, 64, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="window"):
        am.sliding_window_fn(-1)
    with pytest.raises(ValueError, match="segment_ids"):
        am.document_fn(np.zeros((1, 2, 3)))


def test_topk_mask_traced_k_matches_static_k():
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(4, 64, 8)).astype(np.float32), rng.normal(size=(2, 96, 8)).astype(np.float32)
    traced = jax.jit(lambda q, k, n: am.topk_mask(q, k, n, block_q=16, block_k=16, causal=True))
    for top_k in (1, 2, 5):
        np.testing.assert_array_equal(traced(q, k, top_k), _topk_reference(q, k, top_k, 16, 16, True))
