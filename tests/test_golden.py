"""Golden vectors: mask bits for fixed keys, shapes and rates never change silently.

The fixtures in tests/golden/masks.json hold, for integer and bool arrays (bits, masks, keys, packed
residuals), SHA-256 digests (and small arrays in full): these are pinned exactly, on every CPU and backend.
Floating outputs are stored as values and compared with a tolerance, since the last bits of a matrix product
differ between machines (AVX2, AVX-512, ARM); their zero pattern, which is the mask, is pinned exactly.
A change of mask bits is a breaking change for reproducibility: regenerate deliberately with
``JDROP_REGENERATE_GOLDEN=1 pytest tests/test_golden.py`` and say so in CHANGELOG.md.
"""

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdrop

GOLDEN = Path(__file__).parent / "golden" / "masks.json"


def _digest(array) -> str:
    array = np.asarray(array)
    return hashlib.sha256(str((array.dtype.str, array.shape)).encode() + array.tobytes()).hexdigest()


def _cases():
    key = jax.random.key(2024)
    legacy = jax.random.PRNGKey(7)
    x = jnp.arange(1.0, 1.0 + 6 * 10 * 4).reshape(6, 10, 4)
    cases = {
        "bits_threefry_(5,7)": jdrop.masks.random_bits(key, (5, 7)),
        "bits_legacy_(33,)": jdrop.masks.random_bits(legacy, (33,)),
        "keep_mask_(8,16)_0.5": jdrop.keep_mask(key, (8, 16), 0.5),
        "keep_mask_(1000,)_0.1": jdrop.keep_mask(key, (1000,), 0.1),
        "keep_mask_(64,64)_0.9": jdrop.keep_mask(jax.random.fold_in(key, 1), (64, 64), 0.9),
        "keep_mask_(6,10,4)_0.3_bdims(1,)": jdrop.keep_mask(key, (6, 10, 4), 0.3, broadcast_dims=(1,)),
        "keep_mask_(6,10,4)_0.5_bdims(0,2)": jdrop.keep_mask(key, (6, 10, 4), 0.5, broadcast_dims=(0, 2)),
        "example_keys_5_offset3": jax.random.key_data(jdrop.example_keys(key, 5, offset=3)),
        "fold_in_(3,4)": jax.random.key_data(jdrop.masks.fold_in(jdrop.example_keys(key, 3)[:, None], jnp.arange(4))),
        "dropout_inverted_0.25": jdrop.dropout(key, x, 0.25),
        "dropout_classic_0.25": jdrop.dropout(key, x, 0.25, scale="classic"),
        "dropout_bits_residual_packed": jdrop.dropout_fwd(key, x, 0.5, residual="bits")[1].saved,
    }
    params = jdrop.mlp.init(key, [4, 8, 3])
    cases["mlp_apply_train"] = jdrop.mlp.apply(params, jnp.ones((5, 4)), key=key, rates=(0.2, 0.5), deterministic=False)
    residuals = jdrop.mlp.forward(params, jnp.ones((5, 4)), key, (0.2, 0.5))[1]
    cases["mlp_residual_key_data"] = residuals.key_data
    return cases


# Floats: a few float32 ulps of relative error (matrix products re-associated by the CPU's vector width).
FLOAT_RTOL = 1e-5


def _fingerprints():
    out = {}
    for name, value in _cases().items():
        value = np.asarray(value)
        entry = {"shape": list(value.shape), "dtype": value.dtype.str}
        if np.issubdtype(value.dtype, np.floating):
            entry["zero_pattern_sha256"] = _digest(value == 0)
            entry["float_values"] = value.astype(np.float64).ravel().tolist()
        else:
            entry["sha256"] = _digest(value)
            if value.size <= 64:
                entry["values"] = value.astype(np.int64).ravel().tolist()
        out[name] = entry
    return out


def test_golden_masks_unchanged():
    current = _fingerprints()
    if os.environ.get("JDROP_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden vectors regenerated")
    stored = json.loads(GOLDEN.read_text())
    missing = sorted(set(current) - set(stored))
    assert not missing, f"cases without golden vectors (regenerate deliberately): {missing}"
    exact = {name: {k: v for k, v in entry.items() if k != "float_values"} for name, entry in current.items()}
    changed = sorted(
        name for name in stored if {k: v for k, v in stored[name].items() if k != "float_values"} != exact.get(name)
    )
    assert not changed, f"mask bits changed for {changed}"
    for name, entry in stored.items():
        if "float_values" in entry:
            np.testing.assert_allclose(
                current[name]["float_values"], entry["float_values"], rtol=FLOAT_RTOL, atol=0, err_msg=name
            )


def test_golden_bits_equal_jax_random_bits():
    """The stored bits are JAX's own: the golden file pins jdrop to jax.random.bits, not to itself."""
    key = jax.random.key(2024)
    np.testing.assert_array_equal(jdrop.masks.random_bits(key, (5, 7)), jax.random.bits(key, (5, 7), jnp.uint32))
