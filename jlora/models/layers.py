"""How a model repeats its layers: unrolled or stacked with `nn.scan`, with or without rematerialisation.

    Block = repeat(DecoderLayer, remat="full", scan=True, length=32)

Unrolled, layer i's params sit at `{prefix}_{i}/...` (the names the loaders, PEFT export and the
merged Hugging Face export use). Scanned, all layers' params sit at `{prefix}/...` with a leading
layer axis, so XLA compiles one layer's body whatever the depth. `stack_layers` and `unstack_layers`
convert a params, adapter or cache tree between the two layouts; adapters follow their weights
(`jlora.core.stacking.stack`), so a scanned model trains the same adapters as an unrolled one, and a
quantised base (`jlora.quantize`) stacks each layer's codes and scales as they are, the same way.

Remat policies (`jax.checkpoint_policies`) choose what the backward pass keeps of each layer:
"none" keeps every activation, "dots" keeps the outputs of the weight matmuls and recomputes the
rest (attention scores, norms, activations), "full" keeps only each layer's input.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.core import stacking

REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def repeat(block, *, remat="none", scan=False, length=None):
    """The module class to build a model's layers from.

    Args:
      block: a Flax module class called as `block(...)(x, positions, layer_cache) -> (x, layer_cache)`.
      remat: "none", "dots" or "full" (see `REMAT_POLICIES`).
      scan: stack the layers with `nn.scan`: one instance, named e.g. "layers", runs all `length` layers,
        its params and its cache carry a leading layer axis.
      length: the number of layers (needed with scan).

    Returns:
      A module class with the same constructor as `block`.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if remat != "none":
        # Inside a scan the loop already stops XLA from merging the recomputation with the forward pass.
        block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        block = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, 0), length=length)
    return block


def token_blocks(fn, module, x, block):
    """`fn(module, x)`, x [..., C], applied to `block` tokens at a time, each block recomputed in the backward pass.

    For a position-wise layer such as the MLP, whose [tokens, ffn] intermediates (several, in float32
    where XLA computes bf16 dots in float32) dominate a long sequence's step: one block's exist at a
    time, forward and backward. The blocks run in a loop (`nn.scan` with the params broadcast), so
    XLA neither unrolls them nor keeps them live together; the module's param paths are unchanged.

    Args:
      fn: `fn(module, x) -> y`, position-wise: each token's output depends on that token only.
      module: the bound module `fn` calls submodules of.
      x: [..., C]; all leading axes together are the tokens.
      block: tokens per block, or None (or at least the number of tokens) for all at once.

    Returns:
      `fn(module, x)`, [..., C_out].
    """
    *lead, features = x.shape
    tokens = x.reshape(-1, features)
    count = tokens.shape[0]
    if block is None or count <= block:
        return fn(module, x)
    blocks = -(-count // block)
    pad = blocks * block - count  # padded tokens are zeros; their rows are dropped
    tokens = jnp.pad(tokens, ((0, pad), (0, 0))).reshape(blocks, block, features)
    body = nn.remat(lambda m, carry, xs: (carry, fn(m, xs)), prevent_cse=False)
    _, out = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})(module, None, tokens)
    return out.reshape(blocks * block, -1)[:count].reshape(*lead, -1)


def _layer_keys(tree, prefix):
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)")
    found = {int(m.group(1)): key for key in tree if (m := pattern.fullmatch(key))}
    if found and sorted(found) != list(range(len(found))):
        raise ValueError(f"layers {prefix}_{{i}} are not numbered 0..{len(found) - 1}: found {sorted(found)}")
    return [found[i] for i in range(len(found))]


def _stack_leaves(trees, path):
    first = trees[0]
    if isinstance(first, dict):
        if any(not isinstance(t, dict) or t.keys() != first.keys() for t in trees):
            raise ValueError(f"layers differ at {path!r}: keys {[sorted(t) for t in trees]}")
        return {k: _stack_leaves([t[k] for t in trees], f"{path}/{k}") for k in first}
    if stacking.is_stackable(first):  # an adapter, or a quantised weight that keeps each layer's codes and scales
        return stacking.stack(trees, path)
    shapes = {tuple(t.shape) for t in trees}
    if len(shapes) > 1:
        raise ValueError(f"layers differ in shape at {path!r}: {sorted(shapes)}")
    return jax.numpy.stack(trees)


def _unstack_leaves(tree, layers, path):
    if isinstance(tree, dict):
        per_key = {k: _unstack_leaves(v, layers, f"{path}/{k}") for k, v in tree.items()}
        return [{k: v[i] for k, v in per_key.items()} for i in range(layers)]
    if stacking.is_stackable(tree):
        return stacking.unstack(tree, path)
    if tree.shape[:1] != (layers,):
        raise ValueError(f"{path!r} has shape {tuple(tree.shape)}; a stacked layer axis of {layers} was expected")
    return [tree[i] for i in range(layers)]


def stack_layers(tree, prefix="layers"):
    """`{prefix}_{i}/...` subtrees -> one `{prefix}/...` subtree with a leading layer axis.

    Works on a `{"params": ...}` variables dict, a params tree, an adapter tree or a cache; keys
    other than the layers pass through.

    Example:
      >>> tree = {"layers_0": {"w": jnp.zeros(3)}, "layers_1": {"w": jnp.ones(3)}, "norm": jnp.ones(3)}
      >>> stacked = stack_layers(tree)
      >>> stacked["layers"]["w"].shape, sorted(stacked)
      ((2, 3), ['layers', 'norm'])
    """
    if "params" in tree and isinstance(tree["params"], dict) and len(tree) == 1:
        return {"params": stack_layers(tree["params"], prefix)}
    keys = _layer_keys(tree, prefix)
    if not keys:
        raise ValueError(f"no {prefix}_{{i}} layers to stack; top-level keys are {sorted(tree)}")
    out = {k: v for k, v in tree.items() if k not in keys}
    out[prefix] = _stack_leaves([tree[k] for k in keys], prefix)
    return out


def unstack_layers(tree, prefix="layers"):
    """One `{prefix}/...` subtree with a leading layer axis -> `{prefix}_{i}/...` subtrees (inverse of `stack_layers`).

    Example:
      >>> stacked = {"layers": {"w": jnp.zeros((2, 3))}, "norm": jnp.ones(3)}
      >>> sorted(unstack_layers(stacked))
      ['layers_0', 'layers_1', 'norm']
    """
    if "params" in tree and isinstance(tree["params"], dict) and len(tree) == 1:
        return {"params": unstack_layers(tree["params"], prefix)}
    if prefix not in tree:
        raise ValueError(f"no stacked {prefix!r} subtree to unstack; top-level keys are {sorted(tree)}")
    layers = stacking.layers(jax.tree.leaves(tree[prefix], is_leaf=stacking.is_stackable)[0])
    out = {k: v for k, v in tree.items() if k != prefix}
    for i, layer in enumerate(_unstack_leaves(tree[prefix], layers, prefix)):
        out[f"{prefix}_{i}"] = layer
    return out
