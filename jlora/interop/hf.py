"""Writing a model back out in Hugging Face's layout: config.json + model.safetensors that transformers loads.

This is each loader read backwards. Tensor names come from the model file's own `hf_key_map`, inverted, so a
name cannot differ between loading and saving; config.json is the reverse of the config's `from_hf`.

    merged = jlora.merge(variables, adapters)
    save_hf("out/merged", merged, config, dtype="bfloat16", tokenizer=tokenizer)
    # AutoModelForCausalLM.from_pretrained("out/merged"), AutoTokenizer.from_pretrained("out/merged")

With a tokenizer the directory stands alone: tokenizer.json (the `tokenizers` pipeline jlora encodes with, as
it is), tokenizer_config.json (special tokens, chat template) and generation_config.json, so transformers'
`AutoTokenizer` and `pipeline("text-generation", model=...)` need nothing else. `jlora.interop.card` writes README.md.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import gpt2, llama
from jlora.core.errors import CheckpointError
from jlora.models.checkpoint import param_shapes, transpose


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


#: Weight dtypes an export can be written in, by the names the command line and config.json use.
SAVE_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "float32": "float32"}


def readable(path) -> Path:
    """Give a file the mode an ordinary write would (0666 less the umask, 0644 usually) and return its Path.

    safetensors writes through a private temporary file and keeps its 0600, so an export written for other
    people (or another account's inference server) would be unreadable to them.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def write_text(path, text) -> Path:
    Path(path).write_text(text)
    return Path(path)


def _write_json(path, value) -> Path:
    return write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def save_hf(directory, variables, config, *, dtype=None, tokenizer=None):
    """Write a Hugging Face model directory: config.json + model.safetensors, for transformers, vLLM, ... .

    Tied heads are not written (transformers ties them again on load). With a `tokenizer` the directory
    stands alone: its tokenizer files and generation_config.json are written too (:func:`save_tokenizer`,
    :func:`save_generation_config`). Files get the usual permissions (0644 under a 022 umask).

    Args:
      directory: created if needed; existing config.json / model.safetensors are replaced.
      variables: `{"params": ...}` (or the params) of a GPT-2 or Llama model, e.g. `jlora.merge(variables, adapters)`.
      config: the model's `GPT2Config` or `LlamaConfig`, as `jlora.models.load` returns it.
      dtype: "bfloat16" (or "bf16") or "float32": the floating weights are cast to it (half the bytes in
        bfloat16); None writes them in the dtype they have.
      tokenizer: a `jlora.models.Tokenizer` (as `jlora.models.load` returns it), or None for weights alone.

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

    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one an export is written in; choose one of {sorted(SAVE_DTYPES)}.")
    tensors = hf_tensors(variables, config)
    if dtype is not None:
        cast = jnp.dtype(SAVE_DTYPES[dtype])
        tensors = {name: array.astype(cast) if jnp.issubdtype(array.dtype, jnp.floating) else array
                   for name, array in tensors.items()}
    dtypes = {str(array.dtype) for array in tensors.values()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # transformers refuses safetensors without format metadata it knows.
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    readable(directory / "model.safetensors")
    text = json.dumps(hf_config(config, dtypes.pop() if len(dtypes) == 1 else None), indent=2, sort_keys=True)
    write_text(directory / "config.json", text + "\n")
    if tokenizer is not None:
        save_tokenizer(directory, tokenizer, model_max_length=context_length(config))
        save_generation_config(directory, tokenizer, config)
    return directory


def context_length(config):
    """The model's context in tokens (`max_position_embeddings`, GPT-2's `n_positions`), or None."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def special_ids(tokenizer) -> dict:
    """`{"bos": id, "eos": id, "pad": id}` of a jlora Tokenizer; pad is eos (jlora pads with what ends a text)."""
    return {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.eos_id}


def save_tokenizer(directory, tokenizer, *, model_max_length=None) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers' AutoTokenizer.

    tokenizer.json is jlora's own `tokenizers` pipeline (`tokenizer.backend`), so AutoTokenizer builds a fast
    tokenizer that encodes every text to the ids `tokenizer.encode` gives, special tokens written in the text
    included. A tokenizer that adds BOS (`add_bos`, as Llama 3 GGUFs ask) gets a post-processor that adds it
    (to every text: one that already starts with BOS gets a second there, where jlora adds none).
    tokenizer_config.json names the generic `PreTrainedTokenizerFast` (read by transformers 4 and 5 alike),
    the special tokens and the chat template, which renders as `tokenizer.apply_chat_template` does.

    Args:
      directory: created if needed; the three files are replaced.
      tokenizer: a `jlora.models.Tokenizer`.
      model_max_length: the model's context in tokens, recorded for truncation; None leaves transformers' default.

    Returns:
      The directory, as a Path.

    Example:
      >>> import tempfile, transformers
      >>> from tokenizers import Tokenizer as Backend, models
      >>> from jlora.models import Tokenizer
      >>> backend = Backend(models.BPE({"a": 0, "b": 1, "ab": 2, "<end>": 3}, [("a", "b")]))
      >>> backend.add_special_tokens(["<end>"])
      1
      >>> ours = Tokenizer(backend, eos_id=3)
      >>> theirs = transformers.AutoTokenizer.from_pretrained(save_tokenizer(tempfile.mkdtemp(), ours))
      >>> theirs("abba<end>").input_ids == ours.encode("abba<end>") == [2, 1, 0, 3]
      True
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend = tokenizer.backend
    token = lambda i: None if i is None else backend.id_to_token(i)
    ids = special_ids(tokenizer)
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        backend = Backend.from_str(backend.to_str())  # a copy: the caller's tokenizer keeps its own pipeline
        bos = token(tokenizer.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)])
    backend.save(str(directory / "tokenizer.json"))
    readable(directory / "tokenizer.json")
    special = {f"{name}_token": token(i) for name, i in ids.items() if i is not None}
    added = {str(i): {"content": t.content, "special": t.special, "normalized": t.normalized, "lstrip": t.lstrip,
                      "rstrip": t.rstrip, "single_word": t.single_word}
             for i, t in sorted(backend.get_added_tokens_decoder().items())}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": bool(tokenizer.add_bos),
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "added_tokens_decoder": added}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", special)
    return directory


def save_generation_config(directory, tokenizer, config=None) -> Path:
    """Write generation_config.json: BOS, pad and EOS ids, so transformers' generation stops where jlora's does.

    EOS is the tokenizer's, then any other end id the model's config names (Llama 3 Instruct's three).
    Decoding is left at transformers' defaults: greedy, as `jlora generate` without --temperature.

    Returns:
      The path of the file.
    """
    ids = special_ids(tokenizer)
    ends = [ids["eos"]] if ids["eos"] is not None else []
    configured = getattr(config, "eos_token_id", None)
    for end in configured if isinstance(configured, (list, tuple)) else [configured]:
        if end is not None and end not in ends:
            ends.append(end)
    fields = {"bos_token_id": ids["bos"], "pad_token_id": ids["pad"],
              "eos_token_id": ends[0] if len(ends) == 1 else ends or None}
    return _write_json(Path(directory) / "generation_config.json", {k: v for k, v in fields.items() if v is not None})
