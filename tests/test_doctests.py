"""Every ``>>>`` example in jlora's docstrings runs, with the output it shows.

One test per docstring (named by its function, e.g. ``jlora.merge.merge``), found by ``doctest`` itself in
every module of the package. Each example sees its module's globals plus ``jax``, ``jnp``, ``np``, ``optax``
and ``jlora``, and nothing else: what it uses, it defines.
"""

import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

# Counted when the examples were made to run: deleting examples must not make this file pass.
EXPECTED_DOCSTRINGS = 25
EXPECTED_EXAMPLES = 130

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
INTEROP = re.compile(r"^\s*(import|from)\s.*\b(torch|transformers|peft)\b", re.M)


def modules():
    names = [jlora.__name__] + [m.name for m in pkgutil.walk_packages(jlora.__path__, prefix="jlora.")]
    return [importlib.import_module(name) for name in sorted(names)]


def docstrings():
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for module in modules():
        globs = {"jax": jax, "jnp": jnp, "np": np, "optax": optax, "jlora": jlora, **vars(module)}
        # A module's docstrings only (not those of names it imports), each once, in a stable order.
        found += [test for test in finder.find(module, module.__name__, globs=globs) if test.examples]
    return sorted(found, key=lambda test: test.name)


DOCSTRINGS = docstrings()


def marks(test):
    """``slow`` for the examples that load the real base model; ``interop`` (skipped without the
    interop extra) for those that build a PyTorch model; ``devices(8)`` for those that use 8 devices."""
    source = "".join(example.source for example in test.examples)
    out = [pytest.mark.devices(8)] if "jax.devices()[:8]" in source else []
    if "smollm2-135m" in source:
        out.append(pytest.mark.slow)
    if INTEROP.search(source):
        missing = [name for name in ("torch", "transformers", "peft") if importlib.util.find_spec(name) is None]
        out += [pytest.mark.interop, pytest.mark.skipif(bool(missing), reason=f"needs {missing} (interop extra)")]
    return out


@pytest.mark.parametrize("test", [pytest.param(t, id=t.name, marks=marks(t)) for t in DOCSTRINGS])
def test_docstring_examples_run(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that wrote to the working directory would not litter the repository
    report = []
    failed, attempted = doctest.DocTestRunner(optionflags=OPTIONS).run(test, out=report.append)
    assert attempted == len(test.examples)
    assert failed == 0, "".join(report)


def test_every_example_is_collected():
    examples = sum(len(test.examples) for test in DOCSTRINGS)
    assert len(DOCSTRINGS) >= EXPECTED_DOCSTRINGS
    assert examples >= EXPECTED_EXAMPLES
    # and none is out of doctest's reach (a docstring of a nested function, of a name imported from elsewhere):
    # every ``>>>`` prompt in the package's source is one of the examples run above.
    source = Path(jlora.__file__).parent
    prompts = sum(len(re.findall(r"^\s*>>> ", f.read_text(), re.M)) for f in source.rglob("*.py"))
    assert examples == prompts
