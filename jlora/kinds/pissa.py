"""PiSSA (Meng et al., 2024): LoRA started on the principal singular directions of W0.

For a weight W0 = U·S·Vᵀ (in our ``(in, out)`` layout, flattened to ``fan_in × fan_out``):

    A = U_r · √(S_r / scaling)        B = √(S_r / scaling) · V_rᵀ        W_res = W0 − scaling·A·B

so the adapters hold the top-r part of W0 and the base becomes the residual; ``merge(residual,
adapters)`` gives back W0. This is PEFT's ``init_lora_weights="pissa"`` (full SVD, S_r divided by
the scaling), transposed to our layout: PEFT's ``lora_A.weight`` is our A.T, ``lora_B.weight`` our B.T.
The singular vectors are defined up to sign, so compare A·B, not A and B.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jlora.kinds import lora
from jlora.core import paths
from jlora.core.adapter import as_f32, table


def init(params, rank: int = 8, **options):
    """Splits ``params`` into a residual and PiSSA-initialised LoRA adapters.

    Args:
      params: any parameter pytree.
      rank: r, the number of principal directions moved into each adapter.
      **options: as ``jlora.init`` (``alpha``, ``targets``, ``use_rslora``, ``rank_pattern``,
        ``alpha_pattern``, ``in_axes``, ``stack_axes``, ``dtype``); ``key`` and ``init`` do not
        apply, as the factors come from the SVD.

    Returns:
      ``(residual, adapters)``: ``params`` with every targeted W0 replaced by W0 − scaling·A·B (in
      its dtype), and the :class:`jlora.LoRA` adapters, which train and merge as any LoRA.

    Example:
      >>> params = {'attn': {'query': {'kernel': jax.random.normal(jax.random.key(0), (16, 32))}}}
      >>> residual, adapters = init(params, rank=4)
      >>> merged = jlora.merge(residual, adapters)
      >>> bool(jnp.allclose(merged['attn']['query']['kernel'], params['attn']['query']['kernel'], atol=1e-5))
      True
    """
    for ignored in ("key", "init"):
        if ignored in options:
            raise TypeError(f"jlora.pissa.init takes no {ignored!r}: PiSSA's factors come from the SVD of W0")
    weights = dict(paths.leaves(params))
    adapters = {}
    for path, factors in table(lora.init(params, rank, **options)).items():
        adapters[path] = principal(weights[path], factors)
    residual = paths.map_with_path(lambda path, w: adapters[path].unmerge(w) if path in adapters else w, params)
    return residual, paths.nest(adapters)


def principal(w, factors: lora.LoRA) -> lora.LoRA:
    """``factors`` (its rank, scaling and layout) with A, B replaced by the top singular part of ``w``."""
    s, i, o = factors.stack_shape, factors.in_shape, factors.out_shape
    r, scaling = factors.rank, factors.scaling
    u, sigma, vt = jnp.linalg.svd(as_f32(w).reshape(s + (math.prod(i), math.prod(o))), full_matrices=False)
    root = jnp.sqrt(sigma[..., :r] / scaling)
    a = (u[..., :r] * root[..., None, :]).reshape(s + i + (r,))
    b = (root[..., :, None] * vt[..., :r, :]).reshape(s + (r,) + o)
    return dataclasses.replace(factors, a=a.astype(factors.a.dtype), b=b.astype(factors.b.dtype))
