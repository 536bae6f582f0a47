"""Benchmarks of jdrop against the dropout of other frameworks.

Run them with ``python -m benchmarks`` (see ``python -m benchmarks --help`` and BENCHMARKS.md):

- :mod:`benchmarks.ops`: one dropout call, forward and ``value_and_grad``, per framework.
- :mod:`benchmarks.memory`: an MLP training step's compiled temporary memory, compile time and
  steps per second, per framework.
- :mod:`benchmarks.gpu`: a self-contained check-and-time script for a lent GPU.

Every framework runs in its own subprocess (a worker), so that thread pools, compilation caches
and allocators of one framework never slow another down.
"""
