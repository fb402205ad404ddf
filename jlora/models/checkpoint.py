"""Reading checkpoint files and placing their tensors into a Flax param tree.

Each model file describes its checkpoint with an explicit key map,

    {checkpoint_name: (param_path, transform)}      e.g.
    {"model.layers.0.self_attn.q_proj.weight": ("layers_0/self_attn/q_proj/kernel", transpose)}

and `assign` walks that map once: every tensor must be used, every param filled, and every shape
must match what the model's config implies. Errors name the tensor, the path and both shapes.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import files
from jlora.core.errors import CheckpointError


def transpose(array):
    """A torch `nn.Linear` weight (out, in) as a Flax `Dense` kernel (in, out)."""
    return array.T


def read_config(directory):
    """The `config.json` of a Hugging Face model directory, as a dict."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; expected a Hugging Face model directory "
                              "(as written by save_pretrained).")
    return files.read_json(path)


def read_safetensors(directory):
    """All tensors of a Hugging Face directory: `model.safetensors`, or the shards its index lists.

    Returns:
      `{name: np.ndarray}` with the dtypes stored in the file (bfloat16 via ml_dtypes).
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = files.checked(files.read_json(index), {"weight_map": dict[str, str]}, index,
                                   required=["weight_map"])["weight_map"]
        if not all(isinstance(name, str) and Path(name).name == name for name in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map each tensor to a file name in {directory}")
        shards = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        present = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(f"{directory} has neither model.safetensors nor model.safetensors.index.json "
                              f"(it holds {present}). Only safetensors checkpoints are read; convert a "
                              "pytorch_model.bin with save_pretrained(..., safe_serialization=True).")
    tensors = {}
    for name in shards:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in model.safetensors.index.json but does not exist.")
        try:
            # The numpy backend cannot hold bfloat16; the flax one can, and np.asarray keeps it via ml_dtypes.
            with safe_open(str(path), framework="flax") as file:
                for key in file.keys():
                    tensors[key] = np.asarray(file.get_tensor(key))
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error}); "
                                  "it may be truncated: download or save it again.") from error
    return tensors


def check_tied(tensors, head, embedding, source):
    """Refuse a checkpoint that stores an output head different from the embedding it is said to be tied to."""
    if head in tensors and not np.array_equal(tensors[head], tensors.get(embedding)):
        raise CheckpointError(f"{source}: the config ties the output head to {embedding!r}, but the file stores a "
                              f"different {head!r}; set tie_word_embeddings=false in config.json.")


def param_shapes(model, *inputs):
    """`{'a/b/kernel': shape}` for the params `model.init` would make, without allocating them."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    return {"/".join(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def assign(tensors, key_map, expected, *, source, param_dtype, ignore=lambda name: False):
    """Place checkpoint tensors into a param tree through an explicit key map.

    Args:
      tensors: `{checkpoint_name: array}` read from the file.
      key_map: `{checkpoint_name: (param_path, transform or None)}`; paths are '/'-joined.
      expected: `{param_path: shape}` from `param_shapes`.
      source: the file or directory, for error messages.
      param_dtype: the dtype every param is stored in.
      ignore: names of tensors that may be present but are not params (buffers, tied copies).

    Returns:
      The variables dict `{"params": nested dict}` that `model.apply` takes.
    """
    missing = [name for name in key_map if name not in tensors]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}. "
                              "The file may be truncated or belong to a different architecture.")
    unexpected = [name for name in tensors if name not in key_map and not ignore(name)]
    if unexpected:
        raise CheckpointError(f"{source} has {len(unexpected)} tensor(s) the config does not account for, e.g. "
                              f"{unexpected[:5]}. Check num_hidden_layers / n_layer and the bias flags in the config.")
    unfilled = sorted(set(expected) - {path for path, _ in key_map.values()})
    if unfilled:
        raise CheckpointError(f"the key map for {source} leaves params {unfilled[:5]} unfilled.")
    params = {}
    for name, (path, transform) in key_map.items():
        array = tensors[name] if transform is None else transform(tensors[name])
        if tuple(array.shape) != tuple(expected[path]):
            raise CheckpointError(f"{source}: tensor {name!r} gives shape {tuple(array.shape)} for {path}, but the "
                                  f"config implies {tuple(expected[path])}. The config does not match the weights.")
        node = params
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(array, dtype=param_dtype)
    return {"params": params}
