"""Writing a model back out in Hugging Face's layout: config.json + model.safetensors that transformers loads.

This is each loader read backwards. Tensor names come from the model file's own `hf_key_map`, inverted, so a
name cannot differ between loading and saving; config.json is the reverse of the config's `from_hf`.

    merged = jlora.merge(variables, adapters)
    save_hf("out/merged", merged, config)          # AutoModelForCausalLM.from_pretrained("out/merged")
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import gpt2, llama
from jlora.models.checkpoint import CheckpointError, param_shapes, transpose


@dataclasses.dataclass(frozen=True)
class Family:
    """What Hugging Face calls one model family, and where its names differ from ours.

    Attributes:
      model_type: config.json's `model_type`.
      architecture: the transformers causal-LM class, config.json's `architectures`.
      model: the Flax module built from the config.
      key_map: `config -> {hf_name: (param_path, transform)}`, the loader's map.
      prefix: what the causal-LM class puts before the key map's names (GPT2LMHeadModel's `transformer.`).
      tied_embedding: `config -> param path` of an embedding that is also the output head, or None.
      hf_config: `config -> config.json fields` besides model_type and architectures.
    """
    model_type: str
    architecture: str
    model: type
    key_map: Callable
    prefix: str
    tied_embedding: Callable
    hf_config: Callable


def _gpt2_config(config):
    # GPT-2 is always tied (`gpt2.GPT2` has no lm_head); transformers' default is the same, said for readers.
    return {**dataclasses.asdict(config), "tie_word_embeddings": True}


def _llama_family(model_type):
    architecture, _ = llama.VARIANTS[model_type]
    return Family(model_type, architecture, llama.Llama, llama.hf_key_map, "",
                  lambda config: "embed_tokens/embedding" if config.tie_word_embeddings else None,
                  llama.LlamaConfig.to_hf)


FAMILIES = {
    gpt2.GPT2Config: {"gpt2": Family("gpt2", "GPT2LMHeadModel", gpt2.GPT2, gpt2.hf_key_map, "transformer.",
                                     lambda config: "wte/embedding", _gpt2_config)},
    # One Flax model, one Hugging Face family per model_type (Llama, Mistral, Qwen2, Qwen3, Gemma).
    llama.LlamaConfig: {model_type: _llama_family(model_type) for model_type in llama.VARIANTS},
}


def family(config) -> Family:
    """The :class:`Family` of a model config (`GPT2Config`, or `LlamaConfig` by its `model_type`)."""
    found = FAMILIES.get(type(config))
    if found is None:
        known = ", ".join(sorted(cls.__name__ for cls in FAMILIES))
        raise TypeError(f"{type(config).__name__} is not a model config jlora can export; known: {known}.")
    return found[getattr(config, "model_type", "gpt2")]


def hf_names(config) -> dict:
    """`{param_path: (hf_name, transform)}`: the inverse of the family's key map, names as transformers saves them.

    The loaders' transforms (`None`, `transpose`) are their own inverses, so the same transform maps back.
    """
    fam = family(config)
    names = {}
    for hf_name, (path, transform) in fam.key_map(config).items():
        if transform not in (None, transpose):
            raise NotImplementedError(f"{fam.model_type} key map transforms {hf_name!r} with {transform!r}, "
                                      "which has no known inverse.")
        names[path] = (fam.prefix + hf_name, transform)
    return names


def expected_shapes(config) -> dict:
    """`{param_path: shape}` of the params the config's model has."""
    return param_shapes(family(config).model(config), jnp.zeros((1, 1), jnp.int32))


def _flat(params):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def hf_tensors(variables, config) -> dict:
    """`{hf_name: np.ndarray}` of a variables dict (`{"params": ...}`) or its params, checked against the config.

    Raises:
      CheckpointError: a param the config implies is missing, one it does not is present, or a shape differs.
    """
    params = variables["params"] if "params" in variables else variables
    flat = _flat(params)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise CheckpointError(f"the params do not fit this {type(config).__name__}: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}. Pass merged variables (jlora.merge), not adapters.")
    wrong = [f"{path} {tuple(flat[path].shape)} (config: {tuple(shape)})" for path, shape in expected.items()
             if tuple(flat[path].shape) != tuple(shape)]
    if wrong:
        shown = ", ".join(wrong[:5])
        raise CheckpointError(f"{len(wrong)} param(s) have shapes this {type(config).__name__} does not imply: {shown}.")
    tensors = {}
    for path, (hf_name, transform) in hf_names(config).items():
        array = np.asarray(jax.device_get(flat[path]))
        tensors[hf_name] = np.ascontiguousarray(array if transform is None else transform(array))
    return tensors


def hf_config(config, dtype=None) -> dict:
    """The config.json dict transformers reads for this config; `dtype` (e.g. "bfloat16") names the weights'."""
    fam = family(config)
    out = {"model_type": fam.model_type, "architectures": [fam.architecture], **fam.hf_config(config)}
    if dtype is not None:
        out["dtype"] = str(dtype)
    return out


def save_hf(directory, variables, config):
    """Write a Hugging Face model directory: config.json + model.safetensors, for transformers, vLLM, ... .

    Tied heads are not written (transformers ties them again on load). Tokenizer files are not written:
    copy them from the base model's directory.

    Args:
      directory: created if needed; existing config.json / model.safetensors are replaced.
      variables: `{"params": ...}` (or the params) of a GPT-2 or Llama model, e.g. `jlora.merge(variables, adapters)`.
      config: the model's `GPT2Config` or `LlamaConfig`, as `jlora.models.load` returns it.

    Returns:
      The directory, as a Path.

    Example:
      >>> import tempfile, torch, transformers
      >>> config = gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
      >>> model, tokens = gpt2.GPT2(config), jnp.array([[1, 2, 3]])
      >>> variables = model.init(jax.random.key(0), tokens)
      >>> adapters = jax.tree.map(lambda x: x + 0.1, jlora.init(variables, rank=4))  # as if trained
      >>> merged = jlora.merge(variables, adapters)
      >>> directory = save_hf(tempfile.mkdtemp(), merged, config)
      >>> sorted(p.name for p in directory.iterdir())
      ['config.json', 'model.safetensors']
      >>> theirs = transformers.AutoModelForCausalLM.from_pretrained(directory)
      >>> logits = theirs(torch.tensor(tokens.tolist())).logits.detach().numpy()
      >>> np.allclose(logits, model.apply(merged, tokens), atol=1e-4)
      True
    """
    from safetensors.numpy import save_file

    tensors = hf_tensors(variables, config)
    dtypes = {str(array.dtype) for array in tensors.values()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # transformers refuses safetensors without format metadata it knows.
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    text = json.dumps(hf_config(config, dtypes.pop() if len(dtypes) == 1 else None), indent=2, sort_keys=True)
    (directory / "config.json").write_text(text + "\n")
    return directory
