"""``jlora.adapt``: run any function of params with adapters applied."""

from __future__ import annotations

import functools

from jlora.merge import merge


def adapt(fn):
    """Turns ``fn(params, *args, **kw)`` into ``g(params, adapters, *args, **kw)``.

    ``g`` equals ``fn(jlora.merge(params, adapters), *args, **kw)``.
    """

    @functools.wraps(fn)
    def adapted(params, adapters, *args, **kwargs):
        return fn(merge(params, adapters), *args, **kwargs)

    return adapted
