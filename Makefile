# Every target does its own set-up on a fresh machine: it creates .venv and installs what it needs.
# NO_MKDOCS_2_WARNING=1: mkdocs-material's banner about its own end of life, printed on every build, silenced.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-integration test-accelerators bench lint docs wheel-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per set of extras, redone whenever pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-data
	$(PY) -m jdrop --out out

test: $(VENV)/.installed-dev
	$(PY) -m ruff check jdrop tests benchmarks
	$(PY) -m mypy
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site
	$(PY) -m pytest -q -n auto -m "not integration"

# The slow end-to-end checks (pytest marker "integration"): every notebook executed, flax's own attention test files
# with jdrop as their attention_fn, the transformer proofs against flax in float64, sequence-parallel rings on 8
# simulated devices, and two-process training.
test-integration: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n auto -m integration

# Deviceless compiles for H100 (sm_90a) and TPU v4/v5e/v6e (tests/accelerators/): two toolchain venvs pinned to
# the jax of $(VENV), each with jdrop installed from this checkout; the tests run from $(VENV) and start the
# toolchains' pythons in watched subprocesses. No accelerator needed.
ACCEL_DIR ?= build/accelerator-envs
TPU_VENV := $(ACCEL_DIR)/tpu
GPU_VENV := $(ACCEL_DIR)/gpu
JAX_VERSION = $(shell $(PY) -c 'import jax; print(jax.__version__)')
ACCEL_DEPS := optax flax

$(TPU_VENV)/.installed: pyproject.toml | $(VENV)/.installed-dev
	rm -rf $(TPU_VENV)
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TPU_VENV)/bin/python -m pip install --quiet "jax[tpu]==$(JAX_VERSION)" $(ACCEL_DEPS)
	$(TPU_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# jax-cuda12-plugin (XLA:GPU and Triton) and ptxas, not jax[cuda12]: compiling needs no CUDA runtime libraries.
$(GPU_VENV)/.installed: pyproject.toml | $(VENV)/.installed-dev
	rm -rf $(GPU_VENV)
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet "jax==$(JAX_VERSION)" "jaxlib==$(JAX_VERSION)" \
		"jax-cuda12-plugin==$(JAX_VERSION)" nvidia-cuda-nvcc-cu12 $(ACCEL_DEPS)
	$(GPU_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-accelerators: $(VENV)/.installed-dev $(TPU_VENV)/.installed $(GPU_VENV)/.installed
	JDROP_TPU_PYTHON=$(abspath $(TPU_VENV))/bin/python JDROP_GPU_PYTHON=$(abspath $(GPU_VENV))/bin/python \
	JDROP_REQUIRE_ACCELERATORS=1 $(PY) -m pytest -q -n auto --dist loadgroup tests/accelerators

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks

docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Build an sdist and a wheel, install the wheel into a clean venv with only the runtime dependencies,
# and run a one-step train_step there.
wheel-check: $(VENV)/.installed-dev
	rm -rf dist build/wheel-venv
	$(PY) -m build --outdir dist
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install --quiet dist/*.whl
	cd build && wheel-venv/bin/python -c "import functools, jax, jax.numpy as jnp, optax, jdrop; \
	p = jdrop.mlp.init(jax.random.key(0), [4, 8, 3]); \
	s = jdrop.TrainState.create(apply_fn=functools.partial(jdrop.mlp.apply, rates=0.5), params=p, tx=optax.sgd(0.1)); \
	s, m = jdrop.train_step(s, {'x': jnp.ones((2, 4)), 'y': jnp.zeros((2,), jnp.int32)}, jax.random.key(1)); \
	print('wheel OK: jdrop', jdrop.__version__, 'from', jdrop.__file__, 'loss', float(m['loss']))"

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check jdrop tests benchmarks

clean:
	rm -rf $(VENV) out build dist site .pytest_cache
