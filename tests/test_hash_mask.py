"""``dropout_mask="hash8"``: its definition, its rates, and its quality as a random mask.

The definition is checked against an independent numpy implementation of the documented formula (threefry from
``jax.extend.random``); that the kernels and the xla path draw exactly this mask for every tiling is checked in
tests/test_attention_pallas.py. Every statistical check uses fixed keys and a 5-sigma tolerance derived next to
its assertion: a binomial standard error for rates and joint keep rates of disjoint pairs, and for the battery
(NIST SP 800-22's frequency, runs and serial tests on the mask bits of many keys, and a chi-squared test of 2- and
3-bit blocks at other rates) a p-value above 2.9e-7, the one-sided 5-sigma tail of a normal.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import qkv_input, value_and_grads
from jax.extend.random import threefry_2x32
from scipy import special, stats

import jdrop
from jdrop.attention import _dropout_mask, _hash_mask, _pallas

RNG = jax.random.key(7)
ALPHA = 2.9e-7
"""Least p-value a test of the battery may give: the one-sided 5-sigma tail of a normal, 1 - Phi(5)."""


@partial(jax.jit, static_argnums=(2, 3))
def _mask(key_data, rate, n_rows, n_cols):
    """The hash8 keep mask of a ``(n_rows, n_cols)`` dropout array (``n_rows`` a multiple of 32), as one tile."""
    _, threshold, _ = _dropout_mask.operands(jax.random.wrap_key_data(key_data), rate, jnp.float32, "hash8")
    rows = _dropout_mask.first_rows(n_rows, "hash8").astype(jnp.uint32)
    cols = jnp.arange(n_cols, dtype=jnp.uint32)[None, :]
    return _dropout_mask.tile_keep_at(key_data, rows, cols, n_cols, n_rows, threshold, "hash8")


def _keep_mask(key, rate, n_rows, n_cols):
    return np.asarray(_mask(jax.random.key_data(key), jnp.float32(rate), n_rows, n_cols))


def _realised(rate):
    """The documented realised keep probability, ``ceil((1 - rate) * 256) / 256``."""
    return float(np.ceil(np.float32(1 - rate) * np.float32(256)) / 256)


def _reference(key, rate, n_rows, n_cols):
    """The documented formula in numpy, with threefry from ``jax.extend.random``."""
    row = np.arange(n_rows)
    member = (row % 32) // 8
    counter_row = (row // 32) * 32 + row % 8
    unique = np.unique(counter_row)
    words = np.asarray(threefry_2x32(jax.random.key_data(key), np.concatenate(
        [np.full(unique.size, _hash_mask.COUNTER_HIGH, np.uint32), unique.astype(np.uint32)])))
    a = dict(zip(unique, words[:unique.size]))
    b = dict(zip(unique, words[unique.size:] | np.uint32(1)))
    with np.errstate(over="ignore"):
        y = np.arange(n_cols, dtype=np.uint32) * np.uint32(_hash_mask.COLUMN_MULTIPLIER)
        x = (np.array([a[r] for r in counter_row])[:, None] ^ y) * np.array([b[r] for r in counter_row])[:, None]
        x ^= x >> np.uint32(16)
        byte = (x * np.asarray(_hash_mask.MULTIPLIERS, np.uint32)[member][:, None]) >> np.uint32(24)
    return byte < np.ceil(np.float32(1 - rate) * np.float32(256))


# ------------------------------------------------------------------------------------- definition and rates


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.97])
def test_mask_is_the_documented_formula(rate):
    key = jax.random.key(3)
    np.testing.assert_array_equal(_keep_mask(key, rate, 96, 300), _reference(key, rate, 96, 300))


def test_realised_keep_rate_per_rate():
    n_rows, n_cols = 1024, 1024
    for i, rate in enumerate((0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)):
        keep = _keep_mask(jax.random.key(i), rate, n_rows, n_cols)
        p = _realised(rate)
        _, _, factor = _dropout_mask.operands(RNG, rate, jnp.float32, "hash8")
        assert float(factor) == pytest.approx(1 / p, rel=1e-7)  # kept weights scaled by the realised keep
        # Keep rate: N = 2**20 weights, mean within 5 binomial standard errors, 5 sqrt(p (1 - p) / N) (<= 2.5e-3,
        # below 1/256: the test tells the quantised probability from its neighbours).
        assert abs(keep.mean() - p) <= 5 * np.sqrt(p * (1 - p) / keep.size), rate


@pytest.mark.parametrize("implementation", ["xla", "tpu", "gpu"])
def test_rate_zero_is_identity_rate_one_gives_zeros_traced_rate_is_static(implementation):
    q, k, v = qkv_input(q_length=40, k_length=33, heads=2)

    def attend(rate, *args):
        options = {"dropout_rng": RNG, "dropout_rate": rate, "dropout_mask": "hash8", "broadcast_dropout": False}
        if implementation == "xla":
            return jdrop.dot_product_attention(*args, **options, block_q=32, block_k=16)
        with _pallas.kernels_for(implementation):
            return jdrop.dot_product_attention(*args, **options, implementation="pallas")

    traced = jax.jit(lambda rate: value_and_grads(partial(attend, rate), q, k, v))
    plain = jax.jit(partial(attend, 0.0))(q, k, v)
    np.testing.assert_allclose(traced(0.0)[0], plain, rtol=0, atol=1e-6)
    np.testing.assert_allclose(traced(0.3)[0], jax.jit(partial(attend, 0.3))(q, k, v), rtol=0, atol=1e-6)
    out, grads = traced(1.0)
    np.testing.assert_array_equal(out, 0.0)
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)
    assert np.all(np.isnan(traced(1.5)[0]))


# ------------------------------------------------------------------------------------- independence


def _disjoint_pairs(mask, axis, distance, phase):
    """Pairs ``(i, i + distance)`` along ``axis`` with ``(i // distance) % 2 == phase``: no weight in two pairs."""
    n = mask.shape[axis]
    first = np.asarray([i for i in range(n - distance) if (i // distance) % 2 == phase], int)
    return np.take(mask, first, axis=axis), np.take(mask, first + distance, axis=axis)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_neighbours_are_kept_independently(rate):
    # Per-head dropout of (B=2, H=4, Tq=256, Tk=1024): the dropout array's rows are (batch, head, query).
    batch, heads, q_length, k_length = 2, 4, 256, 1024
    keep = _keep_mask(jax.random.key(11), rate, batch * heads * q_length, k_length)
    keep = keep.reshape(batch, heads, q_length, k_length)
    p = _realised(rate)
    cases = {
        "along a row (next column)": (3, 1), "across a 64-column tile edge": (3, 64),
        "down a column (next row, another group)": (2, 1), "rows 8 apart (one word, two members)": (2, 8),
        "rows 16 apart (one word)": (2, 16), "rows 24 apart (one word)": (2, 24), "rows 32 apart (next block)": (2, 32),
        "next head": (1, 1), "next batch row": (0, 1),
    }
    for name, (axis, distance) in cases.items():
        for phase in (0, 1) if keep.shape[axis] > 2 * distance or distance == 1 and keep.shape[axis] > 2 else (0,):
            a, b = _disjoint_pairs(keep, axis, distance, phase)
            both = (a & b).mean()
            # Disjoint pairs of independent Bernoulli(p) weights: each pair kept with probability p**2, the count a
            # binomial: within 5 sqrt(p**2 (1 - p**2) / pairs).
            assert abs(both - p**2) <= 5 * np.sqrt(p**2 * (1 - p**2) / a.size), (name, phase, both, p**2)
    # Tile boundaries that are not a fixed distance: rows 31|32 and 127|128, columns 127|128 and 511|512.
    for axis, edge in ((2, 32), (2, 128), (3, 128), (3, 512)):
        both = (np.take(keep, edge - 1, axis=axis) & np.take(keep, edge, axis=axis)).mean()
        size = keep.size // keep.shape[axis]
        assert abs(both - p**2) <= 5 * np.sqrt(p**2 * (1 - p**2) / size), (axis, edge)
    # Four weights of two words: two members of a word (rows r, r + 8) in two neighbouring columns, all kept with
    # probability p**4; disjoint blocks (rows with (r // 8) even, even columns), a binomial count.
    rows = np.asarray([r for r in range(q_length - 8) if (r // 8) % 2 == 0])
    top, bottom = keep[:, :, rows], keep[:, :, rows + 8]
    block = top[..., 0::2] & top[..., 1::2] & bottom[..., 0::2] & bottom[..., 1::2]
    assert abs(block.mean() - p**4) <= 5 * np.sqrt(p**4 * (1 - p**4) / block.size)


# ------------------------------------------------------------------------------------- a test battery


def _bits_of_many_keys(rate, keys=16, n_rows=256, n_cols=1024):
    """The masks of ``keys`` keys, ``(keys, n_rows, n_cols)``."""
    return np.stack([_keep_mask(jax.random.key(100 + i), rate, n_rows, n_cols) for i in range(keys)])


def _psi2(bits, m):
    """NIST's psi-squared statistic of overlapping m-bit patterns (the sequence wrapped around)."""
    if m <= 0:
        return 0.0
    n = bits.size
    extended = np.concatenate([bits, bits[: m - 1]]).astype(np.int64)
    code = np.zeros(n, np.int64)
    for j in range(m):
        code = 2 * code + extended[j: j + n]
    counts = np.bincount(code, minlength=2**m).astype(np.float64)
    return 2**m / n * float(np.sum(counts**2)) - n


@pytest.mark.parametrize("order", ["along rows", "down columns"])
def test_frequency_runs_and_serial_tests_on_concatenated_bits(order):
    # Rate 0.5: every weight a fair bit. 16 keys x 256 x 1024 = 4.2M bits, concatenated along the rows (column
    # after column) or down the columns (row after row: members of one word, rows 8 apart, then other groups).
    masks = _bits_of_many_keys(0.5)
    bits = (masks if order == "along rows" else masks.transpose(0, 2, 1)).reshape(-1).astype(np.int64)
    n = bits.size
    # Frequency (monobit): S = sum(2 b - 1), p = erfc(|S| / sqrt(2 n)).
    assert special.erfc(abs(np.sum(2 * bits - 1)) / np.sqrt(2 * n)) > ALPHA
    # Runs: V = 1 + number of changes; p = erfc(|V - 2 n pi (1 - pi)| / (2 sqrt(2 n) pi (1 - pi))).
    pi = bits.mean()
    runs = 1 + np.count_nonzero(bits[1:] != bits[:-1])
    assert special.erfc(abs(runs - 2 * n * pi * (1 - pi)) / (2 * np.sqrt(2 * n) * pi * (1 - pi))) > ALPHA
    # Serial, m = 2 and 3: the first and second differences of psi-squared are chi-squared with 2**(m-1) and
    # 2**(m-2) degrees of freedom (NIST SP 800-22 section 2.11).
    for m in (2, 3):
        psi = [_psi2(bits, m - j) for j in range(3)]
        first, second = psi[0] - psi[1], psi[0] - 2 * psi[1] + psi[2]
        assert stats.chi2.sf(first, 2 ** (m - 1)) > ALPHA, (m, first)
        assert stats.chi2.sf(second, 2 ** (m - 2)) > ALPHA, (m, second)


def _psi2_rows(bits, m):
    """NIST's psi-squared of overlapping m-bit patterns of every row of ``bits`` (each row wrapped around)."""
    if m <= 0:
        return np.zeros(bits.shape[0])
    rows, n = bits.shape
    extended = np.concatenate([bits, bits[:, : m - 1]], axis=1).astype(np.int64)
    code = np.zeros((rows, n), np.int64)
    for j in range(m):
        code = 2 * code + extended[:, j: j + n]
    counts = np.bincount((code + (np.arange(rows) * 2**m)[:, None]).reshape(-1), minlength=rows * 2**m)
    return 2**m / n * np.sum(counts.reshape(rows, 2**m).astype(np.float64) ** 2, axis=1) - n


def test_serial_test_of_every_row_sequence():
    # A structure that differs from row to row (a pattern one row's words follow, not the next row's) averages out
    # of the pooled counts above. Here each row of 8192 fair bits (rate 0.5; 512 rows of 2 keys) is a sequence of
    # its own: its first difference of psi-squared, m = 2 and 3, is chi-squared with 2**(m-1) degrees of freedom,
    # and the rows' sum, with 512 * 2**(m-1) (independent rows).
    bits = _bits_of_many_keys(0.5, keys=2, n_rows=256, n_cols=8192).reshape(-1, 8192)
    for m in (2, 3):
        first = _psi2_rows(bits, m) - _psi2_rows(bits, m - 1)
        assert stats.chi2.sf(first.sum(), bits.shape[0] * 2 ** (m - 1)) > ALPHA, (m, first.sum())


@pytest.mark.parametrize("rate", [0.1, 0.75])
def test_block_patterns_at_other_rates(rate):
    # At rate 0.5 the keep bit is each byte's top bit; other rates test the bytes' other bits. Non-overlapping
    # m-bit blocks of the concatenated bits (along rows and down columns) are multinomial with cell probabilities
    # p**ones (1 - p)**zeros: Pearson's statistic is chi-squared with 2**m - 1 degrees of freedom.
    p = _realised(rate)
    masks = _bits_of_many_keys(rate, keys=8)
    for bits in (masks.reshape(-1), masks.transpose(0, 2, 1).reshape(-1)):
        for m in (2, 3):
            blocks = bits[: bits.size // m * m].reshape(-1, m).astype(np.int64)
            code = blocks @ (2 ** np.arange(m - 1, -1, -1))
            observed = np.bincount(code, minlength=2**m)
            ones = np.asarray([bin(c).count("1") for c in range(2**m)])
            expected = len(code) * p**ones * (1 - p) ** (m - ones)
            statistic = float(np.sum((observed - expected) ** 2 / expected))
            assert stats.chi2.sf(statistic, 2**m - 1) > ALPHA, (m, statistic)
