"""Tests for jdrop.masks: random bits, keep masks, thresholds, example keys and bit packing.

Every mask is checked against ``jax.random`` (``bits`` / ``bernoulli``), eagerly and under ``jit``.
"""

import math
import re
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdrop
from jdrop import masks

# JAX compiles its own threefry in ~0.3-1.3 s per distinct shape (more for higher rank), so the references are
# drawn at a few shapes that the tests share.
SHAPES = [(), (0,), (7,), (2, 0, 3), (13, 5), (3, 5, 7)]
RATES = [0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 0.99, 1.0]


def _keys():
    return {
        "typed": jax.random.key(42),
        "legacy": jax.random.PRNGKey(42),
        "rbg": jax.random.key(42, impl="rbg"),
    }


KEY_KINDS = list(_keys())


# --------------------------------------------------------------------------------------- bits


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_random_bits_equal_jax_random_bits(kind):
    key = _keys()[kind]
    shapes = SHAPES if kind != "rbg" else [(), (2, 0, 3), (3, 5, 7)]  # rbg: jax.random.bits itself
    jitted = jax.jit(lambda k: [masks.random_bits(k, shape) for shape in shapes])(key)
    for shape, from_jit in zip(shapes, jitted):
        expected = jax.random.bits(key, shape, jnp.uint32)
        assert from_jit.dtype == jnp.uint32
        assert from_jit.shape == shape
        np.testing.assert_array_equal(from_jit, expected, err_msg=str(shape))
    # Eager dispatch of the unrolled threefry compiles each op per shape (~1 s a shape): eager runs one shape.
    np.testing.assert_array_equal(masks.random_bits(key, (13, 5)), jax.random.bits(key, (13, 5), jnp.uint32))


def test_random_bits_several_keys():
    draw = jax.jit(masks.random_bits, static_argnums=1)
    for seed in (1, 2, 2**31 + 5):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(draw(key, (13, 5)), jax.random.bits(key, (13, 5), jnp.uint32))


def test_threefry2x32_matches_jax_primitive():
    from jax.extend.random import threefry_2x32

    k0, k1 = np.uint32(0x13198A2E), np.uint32(0x03707344)
    x0 = jnp.arange(11, dtype=jnp.uint32) * np.uint32(2654435761)
    x1 = jnp.arange(11, dtype=jnp.uint32) ^ np.uint32(0xDEADBEEF)
    ours = jax.jit(masks.threefry2x32)(k0, k1, x0, x1)
    theirs = threefry_2x32(jnp.asarray([k0, k1]), jnp.concatenate([x0, x1]))
    np.testing.assert_array_equal(jnp.concatenate(ours), theirs)


def test_random_bits_vmap_over_keys_equals_loop(key):
    keys = jdrop.example_keys(key, 4)
    batched = jax.jit(jax.vmap(lambda k: masks.random_bits(k, (13, 5))))(keys)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], jax.random.bits(keys[i], (13, 5), jnp.uint32))


def _has_while_loop(fn, *args) -> bool:
    return " while(" in jax.jit(fn).lower(*args).compile().as_text()


@pytest.fixture
def restore_bits_lowering():
    before = masks.bits_lowering()
    yield
    for platform, lowering in before.items():
        masks.set_bits_lowering(lowering, platforms=[platform])


@pytest.mark.parametrize("lowering", ["fused", "jax"])
def test_bits_lowering_switch_gives_the_same_bits(key, lowering, restore_bits_lowering):
    masks.set_bits_lowering(lowering)
    assert masks.bits_lowering()["cpu"] == lowering
    draw = partial(masks.random_bits, shape=(13, 5))
    expected = jax.random.bits(key, (13, 5), jnp.uint32)
    np.testing.assert_array_equal(jax.jit(draw)(key), expected)
    np.testing.assert_array_equal(jax.jit(jax.vmap(draw))(jax.random.split(key, 3))[1],
                                  jax.random.bits(jax.random.split(key, 3)[1], (13, 5), jnp.uint32))
    # The switch changes the program: JAX's CPU lowering of threefry is a rolled loop, the fused one is not.
    assert _has_while_loop(lambda k: jdrop.dropout(k, jnp.ones((13, 5)), 0.5), key) == (lowering == "jax")


def test_bits_lowering_per_platform(key, restore_bits_lowering):
    masks.set_bits_lowering("jax", platforms=["cuda", "rocm"])
    assert masks.bits_lowering() == {"cpu": "fused", "cuda": "jax", "rocm": "jax", "tpu": "fused"}
    np.testing.assert_array_equal(jax.jit(partial(masks.random_bits, shape=(7,)))(key),
                                  jax.random.bits(key, (7,), jnp.uint32))
    assert not _has_while_loop(lambda k: masks.random_bits(k, (7,)), key)  # lowered for CPU: the fused branch
    masks.set_bits_lowering("jax", platforms=["cpu"])
    assert _has_while_loop(lambda k: masks.random_bits(k, (7,)), key)


def test_bits_lowering_rejects_unknown_values(restore_bits_lowering):
    with pytest.raises(ValueError, match="`lowering` must be one of"):
        masks.set_bits_lowering("unrolled")
    with pytest.raises(ValueError, match="`platforms` entries"):
        masks.set_bits_lowering("jax", platforms=["gpu"])


def test_bits_lowering_from_environment(monkeypatch):
    monkeypatch.setenv("JDROP_BITS_LOWERING", "jax")
    assert set(masks._lowering.from_environment().values()) == {"jax"}
    monkeypatch.setenv("JDROP_BITS_LOWERING", "nope")
    with pytest.raises(ValueError, match="JDROP_BITS_LOWERING"):
        masks._lowering.from_environment()


def test_broadcast_bits_are_materialised_not_fused(key):
    # Bits broadcast into a larger consumer are drawn by JAX's lowering (a rolled loop on CPU, materialised at the
    # mask's shape), so the unrolled chain never sits loop-invariant inside the consumer's loop (compile hazard).
    x = jnp.ones((100, 64))
    assert _has_while_loop(lambda k: jdrop.dropout(k, x, 0.5, broadcast_dims=(1,)), key)
    assert not _has_while_loop(lambda k: jdrop.dropout(k, x, 0.5), key)
    np.testing.assert_array_equal(masks.random_bits(key, (100, 1), broadcast_to=(100, 64)),
                                  jax.random.bits(key, (100, 1), jnp.uint32))


@pytest.mark.parametrize("bad", [0, 1.5, "key", None, np.zeros((2,), np.float32), np.zeros((3,), np.uint32)], ids=repr)
def test_random_bits_rejects_non_keys(bad):
    with pytest.raises(TypeError, match="`key`"):
        masks.random_bits(bad, (3,))


@pytest.mark.parametrize("n_cols", [3, 2**12 + 3, 2**32 - 1])
def test_index_words_equal_uint64_arithmetic(n_cols):
    # row * n_cols + col in 64 bits from uint32 words, against numpy's uint64, across the 2**32 boundary.
    rows = np.asarray([[0], [1], [2**20 + 7], [2**32 - 1]], np.uint64)
    cols = np.asarray([[0, 1, n_cols - 1]], np.uint64)
    expected = rows * np.uint64(n_cols) + cols
    words = jax.jit(masks.index_words, static_argnums=2)
    high, low = words(jnp.asarray(rows, jnp.uint32), jnp.asarray(cols, jnp.uint32), n_cols)
    np.testing.assert_array_equal(np.asarray(high, np.uint64), expected >> np.uint64(32))
    np.testing.assert_array_equal(np.asarray(low, np.uint64), expected & np.uint64(0xFFFFFFFF))


def test_index_words_with_bits_at_draw_any_tile_of_jax_random_bits(key):
    # The one-word form (n_rows known: every index below 2**32) and the two-word form give the same tile.
    rows, cols = jnp.arange(2, 5, dtype=jnp.uint32)[:, None], jnp.arange(3, 7, dtype=jnp.uint32)[None, :]
    expected = jax.random.bits(key, (6, 7), jnp.uint32)[2:5, 3:7]
    for n_rows in (6, None):
        high, low = masks.index_words(rows, cols, 7, n_rows=n_rows)
        assert (n_rows is None) != (jnp.shape(high) == ())
        np.testing.assert_array_equal(jax.jit(masks.bits_at)(jax.random.key_data(key), high, low), expected)


# --------------------------------------------------------------------------------------- keep_mask


@pytest.mark.parametrize(
    "kind, shape", [("typed", (13, 5)), ("legacy", (13, 5)), ("rbg", (13, 5)), ("typed", ())], ids=str
)
def test_keep_mask_equals_bernoulli(shape, kind):
    key = _keys()[kind]
    # One compilation for all static rates (each is a constant of the jitted function).
    jitted = jax.jit(lambda k: [jdrop.keep_mask(k, shape, rate) for rate in RATES])(key)
    for rate, from_jit in zip(RATES, jitted):
        expected = jax.random.bernoulli(key, 1 - rate, shape)
        eager = [jdrop.keep_mask(key, shape, rate)] if shape else []  # eager: see test_random_bits_...
        for mask in [from_jit, *eager]:
            assert mask.dtype == jnp.bool_
            assert mask.shape == shape
            np.testing.assert_array_equal(mask, expected, err_msg=f"rate={rate}")


def test_keep_mask_traced_rate_equals_bernoulli_of_traced_rate(key):
    # With a traced (float32) rate, ``1 - rate`` is computed in float32 on both sides.
    @jax.jit
    @chex.assert_max_traces(n=1)
    def both(rate):
        return jdrop.keep_mask(key, (13, 5), rate), jax.random.bernoulli(key, 1 - rate, (13, 5))

    for rate in RATES + [0.37]:
        ours, theirs = both(jnp.float32(rate))
        np.testing.assert_array_equal(ours, theirs, err_msg=f"rate={rate}")


@pytest.mark.parametrize(
    "shape, broadcast_dims, reduced",
    [
        ((6, 5), (0,), (1, 5)),
        ((6, 5), (0, -1), (1, 1)),
        ((4, 5, 6), (1,), (4, 1, 6)),
        ((4, 5, 6), (-2,), (4, 1, 6)),
    ],
    ids=str,
)
def test_keep_mask_broadcast_dims(key, shape, broadcast_dims, reduced):
    mask = jax.jit(lambda k: jdrop.keep_mask(k, shape, 0.5, broadcast_dims=broadcast_dims))(key)
    assert mask.shape == shape
    np.testing.assert_array_equal(mask, jnp.broadcast_to(jax.random.bernoulli(key, 0.5, reduced), shape))
    for dim in broadcast_dims:  # constant along every broadcast dim
        np.testing.assert_array_equal(mask, jnp.broadcast_to(jnp.take(mask, jnp.array([0]), axis=dim), shape))


@pytest.mark.parametrize(
    "broadcast_dims, message",
    [((3,), "out of range"), ((-4,), "out of range"), ((1, 1), "twice"), ((1, -2), "twice"), ((0, 2, -1), "twice")],
    ids=str,
)
def test_keep_mask_bad_broadcast_dims(key, broadcast_dims, message):
    with pytest.raises(ValueError, match=f"`broadcast_dims`.*{message}"):
        jdrop.keep_mask(key, (4, 5, 6), 0.5, broadcast_dims=broadcast_dims)


def test_keep_mask_broadcast_dims_on_scalar_shape(key):
    with pytest.raises(ValueError, match="`broadcast_dims`"):
        jdrop.keep_mask(key, (), 0.5, broadcast_dims=(0,))


def test_keep_mask_broadcast_dims_must_be_ints(key):
    with pytest.raises(TypeError, match="`broadcast_dims`"):
        jdrop.keep_mask(key, (4, 5), 0.5, broadcast_dims=(1.0,))


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), float("inf")], ids=repr)
def test_keep_mask_rejects_bad_static_rate(key, rate):
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
        jdrop.keep_mask(key, (3,), rate)


def test_keep_mask_same_inside_outside_jit_and_vmap(key):
    shape, rate = (13, 5), 0.3
    keys = jdrop.example_keys(key, 4)
    draw = jax.jit(lambda k: jdrop.keep_mask(k, shape, rate))
    vmapped = jax.jit(jax.vmap(lambda k: jdrop.keep_mask(k, shape, rate)))(keys)
    for i in range(4):
        reference = jax.random.bernoulli(keys[i], 1 - rate, shape)
        for got in (jdrop.keep_mask(keys[i], shape, rate), draw(keys[i]), vmapped[i]):
            np.testing.assert_array_equal(got, reference)


# --------------------------------------------------------------------------------------- thresholds


def test_realised_keep_is_within_2_pow_minus_23_of_keep():
    rng = np.random.default_rng(0)
    rates = np.concatenate([np.linspace(0.0, 1.0, 1001), rng.random(4000), [1e-9, 1e-7, 1 - 1e-7, 1 - 1e-9]])
    keep = 1.0 - rates  # float64: the exact keep probability asked for
    threshold = jax.jit(masks.keep_threshold)(jnp.asarray(keep, jnp.float32))
    realised = np.asarray(masks.realised_keep(threshold), np.float64)
    assert threshold.dtype == jnp.uint32
    # The contract allows 2**-16; the bernoulli rule achieves 2**-23.
    assert np.max(np.abs(realised - keep)) <= 2.0**-23
    # Rounded up to the grid: never below the float32 keep, and exactly on the 2**-23 grid.
    assert np.all(realised >= np.asarray(keep, np.float32))
    np.testing.assert_array_equal(realised * 2.0**23, np.asarray(threshold, np.float64))
    # The end points are exact.
    assert float(masks.realised_keep(masks.keep_threshold(1.0))) == 1.0
    assert float(masks.realised_keep(masks.keep_threshold(0.0))) == 0.0


def test_keep_from_bits_is_the_bernoulli_rule(key):
    bits = jax.random.bits(key, (13, 5), jnp.uint32)
    threshold = masks.keep_threshold(0.3)
    expected = (np.asarray(bits) >> 9) < int(threshold)
    np.testing.assert_array_equal(masks.keep_from_bits(bits, threshold), expected)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_of_large_mask(rate):
    n = 1 << 20
    fraction = float(jax.jit(lambda k: jnp.mean(jdrop.keep_mask(k, (n,), rate)))(jax.random.key(7)))
    keep = float(masks.realised_keep(masks.keep_threshold(1 - rate)))
    standard_error = math.sqrt(keep * (1 - keep) / n)  # binomial standard error of the mean of n Bernoulli(keep)
    assert abs(fraction - keep) <= 5 * standard_error  # 5 sigma


@pytest.mark.parametrize("broadcast_dims", [(0,), (1,)])
def test_keep_fraction_with_broadcast_dims(broadcast_dims):
    # The drawn mask has 4096 independent entries; the fraction is over those (each repeated 16 times).
    shape, rate = (4096, 16) if broadcast_dims == (1,) else (16, 4096), 0.3
    mask = jax.jit(lambda k: jdrop.keep_mask(k, shape, rate, broadcast_dims=broadcast_dims))(jax.random.key(3))
    keep, n = 0.7, 4096
    standard_error = math.sqrt(keep * (1 - keep) / n)  # binomial standard error over the 4096 independent draws
    assert abs(float(jnp.mean(mask)) - keep) <= 5 * standard_error  # 5 sigma


# --------------------------------------------------------------------------------------- example_keys


def _data(keys):
    return np.asarray(jax.random.key_data(keys))


@pytest.mark.parametrize("legacy", [False, True], ids=["typed", "legacy"])
def test_example_keys_are_fold_in_of_global_index(legacy):
    key = jax.random.PRNGKey(5) if legacy else jax.random.key(5)
    keys = jdrop.example_keys(key, 6, offset=10)
    assert keys.shape == (6,)
    assert jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    typed = masks.canonical_key(key)
    expected = np.stack([_data(jax.random.fold_in(typed, 10 + j)) for j in range(6)])
    np.testing.assert_array_equal(_data(keys), expected)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_fold_in_equals_jax_random_fold_in_elementwise_and_broadcast(impl):
    keys = jax.random.split(jax.random.key(11, impl=impl), 4)
    data = jnp.array([0, 1, 2**31, 2**32 - 1], jnp.uint32)
    expected = np.stack([_data(jax.random.fold_in(keys[i], data[i])) for i in range(4)])
    np.testing.assert_array_equal(_data(masks.fold_in(keys, data)), expected)
    # Broadcast (keys along one axis, data along the other), inside jit: a (4, 4) key array.
    table = jax.jit(masks.fold_in)(keys[:, None], data[None, :])
    assert table.shape == (4, 4) and str(jax.random.key_impl(table)) == impl
    for i in range(4):
        for j in range(4):
            np.testing.assert_array_equal(_data(table[i, j]), _data(jax.random.fold_in(keys[i], data[j])))
    # Python ints and a legacy raw key, as jax.random.fold_in takes them.
    if impl == "threefry2x32":
        legacy = jax.random.PRNGKey(5)
        np.testing.assert_array_equal(_data(masks.fold_in(legacy, 9)), np.asarray(jax.random.fold_in(legacy, 9)))


def test_fold_in_is_computed_once_not_fused_into_its_consumers(key):
    # Derived keys are materialised: a consumer of many elements must not recompute threefry per element.
    def bits(k):
        return masks.random_bits(masks.fold_in(k, 3), (64, 64))

    hlo = jax.jit(bits).lower(key).compile().as_text()
    computations = re.split(r"\n(?=\S)", hlo)
    big = [c for c in computations if c.startswith("%fused") and "-> u32[64,64]" in c.split("\n", 1)[0]]
    assert len(big) == 1, "the bits are one fusion"
    # One threefry in the fusion that draws the bits (20 rounds: 20 xors, 2 for the key schedule, 1 for
    # t0 ^ t1 = 23), not two (the derivation of the key fused in would add another 22).
    assert big[0].count(" xor(") < 40, big[0].count(" xor(")
    np.testing.assert_array_equal(jax.jit(bits)(key), jax.random.bits(jax.random.fold_in(key, 3), (64, 64)))


def test_example_keys_microbatches_equal_slices_of_whole_batch(key):
    whole = _data(jdrop.example_keys(key, 12))
    for size in (1, 3, 4, 6):
        parts = [_data(jdrop.example_keys(key, size, offset=start)) for start in range(0, 12, size)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_example_keys_traced_offset_one_compilation(key):
    whole = _data(jdrop.example_keys(key, 12))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def microbatch(offset):
        return jax.random.key_data(jdrop.example_keys(key, 4, offset=offset))

    for start in (0, 4, 8):
        np.testing.assert_array_equal(microbatch(jnp.int32(start)), whole[start : start + 4])


def test_example_keys_give_per_example_masks_independent_of_batching(key):
    # Example i's mask depends only on (key, i): a vmapped microbatch equals the slice of the whole batch.
    @partial(jax.jit, static_argnums=0)
    def masks_for(n, offset):
        return jax.vmap(lambda k: jdrop.keep_mask(k, (13, 5), 0.4))(jdrop.example_keys(key, n, offset=offset))

    whole = masks_for(8, 0)
    np.testing.assert_array_equal(jnp.concatenate([masks_for(4, 0), masks_for(4, 4)]), whole)
    for i in range(8):
        np.testing.assert_array_equal(whole[i], jdrop.keep_mask(jax.random.fold_in(key, i), (13, 5), 0.4))


def test_example_keys_zero_examples(key):
    assert jdrop.example_keys(key, 0).shape == (0,)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n": -1}, ValueError, "`n`"),
        ({"n": 2.0}, TypeError, "`n`"),
        ({"n": True}, TypeError, "`n`"),
        ({"n": 3, "offset": -1}, ValueError, "`offset`"),
        ({"n": 3, "offset": 1.5}, TypeError, "`offset`"),
        ({"n": 3, "offset": jnp.float32(2.0)}, TypeError, "`offset`"),
    ],
    ids=str,
)
def test_example_keys_errors(key, kwargs, error, match):
    with pytest.raises(error, match=match):
        jdrop.example_keys(key, **kwargs)


def test_example_keys_rejects_key_arrays_and_ints(key):
    with pytest.raises(ValueError, match="single key"):
        jdrop.example_keys(jax.random.split(key, 2), 3)
    with pytest.raises(TypeError, match="`key`"):
        jdrop.example_keys(0, 3)


# --------------------------------------------------------------------------------------- packing


PACK_SHAPES = [(), (0,), (1,), (7,), (8,), (9,), (13,), (3, 5), (2, 3, 7), (64,)]


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    bools = [rng.random(shape) < 0.5 for shape in PACK_SHAPES]

    @jax.jit
    def round_trip(arrays):
        packed = [masks.pack_bits(a) for a in arrays]
        return packed, [masks.unpack_bits(p, a.shape) for p, a in zip(packed, arrays)]

    for shape, mask, packed, unpacked in zip(PACK_SHAPES, bools, *round_trip(bools)):
        size = math.prod(shape)
        assert packed.dtype == jnp.uint8
        assert packed.shape == (math.ceil(size / 8),)
        assert packed.nbytes == math.ceil(size / 8)
        # Element i is bit i % 8 of byte i // 8, padding bits are zero: numpy's little-endian packbits.
        np.testing.assert_array_equal(packed, np.packbits(mask.ravel(), bitorder="little"), err_msg=str(shape))
        assert unpacked.dtype == jnp.bool_
        assert unpacked.shape == shape
        np.testing.assert_array_equal(unpacked, mask, err_msg=str(shape))


def test_pack_unpack_eager():
    mask = np.random.default_rng(1).random((3, 5, 7)) < 0.3
    packed = masks.pack_bits(jnp.asarray(mask))
    np.testing.assert_array_equal(packed, np.packbits(mask.ravel(), bitorder="little"))
    np.testing.assert_array_equal(masks.unpack_bits(packed, (3, 5, 7)), mask)


def test_pack_unpack_keep_mask_round_trip(key):
    mask = jdrop.keep_mask(key, (13, 5), 0.3)
    np.testing.assert_array_equal(masks.unpack_bits(masks.pack_bits(mask), (13, 5)), mask)
