"""A pytest plugin that runs flax's own attention tests with :func:`jdrop.dot_product_attention` as the default.

Loaded (``-p flax_suite_plugin``) by ``tests/test_flax_suites.py`` into a pytest subprocess that runs
test files of flax's source distribution. It makes ``jdrop.dot_product_attention`` the default
``attention_fn`` of ``flax.linen.MultiHeadDotProductAttention`` (and so of ``SelfAttention`` and
``MultiHeadAttention``, its subclasses) and of ``flax.nnx.MultiHeadAttention``, by patching
the defaults of their constructors, and counts the calls, so that a run cannot silently test flax's
own function: at the end of the session it writes the number of calls (per module class, and per test) to the
JSON file named by ``JDROP_FLAX_SUITE_REPORT``. A test that passes its own ``attention_fn``
keeps it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections import Counter
from typing import Any

import pytest

import jdrop

CALLS: Counter[str] = Counter()
PER_TEST: dict[str, int] = {}


def _counting(owner: str) -> Any:
    """``jdrop.dot_product_attention`` with flax's signature (flax filters keyword arguments by it), counted."""

    @functools.wraps(jdrop.dot_product_attention)
    def attention_fn(*args: Any, **kwargs: Any) -> Any:
        CALLS[owner] += 1
        return jdrop.dot_product_attention(*args, **kwargs)

    attention_fn.__signature__ = inspect.signature(jdrop.dot_product_attention)  # type: ignore[attr-defined]
    return attention_fn


def _patch_init_default(cls: type, fn: Any) -> None:
    """Makes ``fn`` the default of the ``attention_fn`` argument of ``cls.__init__`` (and of its dataclass field)."""
    init = inspect.unwrap(cls.__init__)  # linen wraps the dataclass constructor
    kwdefaults = dict(init.__kwdefaults__ or {})
    if "attention_fn" in kwdefaults:
        kwdefaults["attention_fn"] = fn
        init.__kwdefaults__ = kwdefaults
    else:
        names = [p.name for p in inspect.signature(init).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        defaults = list(init.__defaults__)
        defaults[names.index("attention_fn") - (len(names) - len(defaults))] = fn
        init.__defaults__ = tuple(defaults)
    fields = getattr(cls, "__dataclass_fields__", {})
    if "attention_fn" in fields:
        fields["attention_fn"].default = fn
        cls.attention_fn = fn  # type: ignore[attr-defined]
    wrapper_signature = getattr(cls.__init__, "__signature__", None)  # linen's wrapper caches one
    if wrapper_signature is not None:
        params = [p.replace(default=fn) if p.name == "attention_fn" else p
                  for p in wrapper_signature.parameters.values()]
        cls.__init__.__signature__ = wrapper_signature.replace(parameters=params)
    assert inspect.signature(init).parameters["attention_fn"].default is fn, cls


def _patch() -> None:
    from flax import linen, nnx

    # The linen subclasses have constructors of their own (dataclasses), each with the default baked in.
    for cls in {linen.MultiHeadDotProductAttention, linen.SelfAttention, linen.MultiHeadAttention}:
        _patch_init_default(cls, _counting(f"linen.{cls.__name__}"))
    _patch_init_default(nnx.MultiHeadAttention, _counting("nnx.MultiHeadAttention"))


def pytest_configure(config: Any) -> None:
    _patch()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: Any) -> Any:
    before = sum(CALLS.values())
    yield
    PER_TEST[item.nodeid] = sum(CALLS.values()) - before


def pytest_sessionfinish(session: Any, exitstatus: Any) -> None:
    report = os.environ.get("JDROP_FLAX_SUITE_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"calls": dict(CALLS), "per_test": PER_TEST}, f)
