"""Writing a model back out in Hugging Face's layout: config.json + model.safetensors that transformers loads.

This is each loader read backwards. Tensor names come from the model file's own `hf_key_map`, inverted, so a
name cannot differ between loading and saving; config.json is the reverse of the config's `from_hf`.

    merged = jlora.merge(variables, adapters)
    save_hf("out/merged", merged, config, dtype="bfloat16", tokenizer=tokenizer)
    # AutoModelForCausalLM.from_pretrained("out/merged"), AutoTokenizer.from_pretrained("out/merged")

With a tokenizer the directory stands alone: tokenizer.json (the `tokenizers` pipeline jlora encodes with, as
it is), tokenizer_config.json (special tokens, chat template) and generation_config.json, so transformers'
`AutoTokenizer` and `pipeline("text-generation", model=...)` need nothing else. `model_card` writes README.md.
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


def _write_text(path, text) -> Path:
    Path(path).write_text(text)
    return Path(path)


def _write_json(path, value) -> Path:
    return _write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


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
    _write_text(directory / "config.json", text + "\n")
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


#: Hugging Face hub ids of the bases `jlora.models.KNOWN` names, for readers and PEFT's base_model_name_or_path.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclasses.dataclass(frozen=True)
class BaseSource:
    """Where a base model came from, as an export's readers need to know it.

    Attributes:
      name: the name or path jlora was given (`--base`).
      hub_id: its Hugging Face hub id when known, else None.
      directory: the absolute path of a Hugging Face directory base, else None.
      gguf_type: for a GGUF base, its weights' quantisation as llama.cpp names it (e.g. "Q4_1"), else None.
    """
    name: str
    hub_id: str | None = None
    directory: Path | None = None
    gguf_type: str | None = None

    @property
    def reference(self) -> str:
        """What transformers' `from_pretrained` is pointed at: the hub id, else the directory, else the name."""
        return self.hub_id or (str(self.directory) if self.directory else self.name)


def base_source(name) -> BaseSource:
    """The :class:`BaseSource` of a base `jlora.models.load` accepts (a known name, a .gguf file, a directory).

    Example:
      >>> base_source("smollm2-135m")
      BaseSource(name='smollm2-135m', hub_id='HuggingFaceTB/SmolLM2-135M-Instruct', directory=None, gguf_type='Q4_1')
    """
    from jlora.models import fetch

    text = str(name)
    if text.lower() in HUB_IDS:
        gguf_type = fetch.FILENAME.rsplit(".", 2)[-2] if text.lower() == "smollm2-135m" else None
        return BaseSource(text, HUB_IDS[text.lower()], None, gguf_type)
    path = Path(text).expanduser()
    if path.is_dir():
        return BaseSource(text, None, path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        return BaseSource(text, None, None, _gguf_type(path))
    return BaseSource(text)


def _gguf_type(path):
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    try:
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")
    except ValueError:
        return None


def describe_adapters(adapters, use_rslora=None) -> dict:
    """`{"method", "rank", "alpha", "targets", "weights"}` of an adapter tree, as a model card states them.

    rank and alpha are the kinds' own (``Adapter.card_facts``; None for kinds without them, (IA)³); several
    values are joined ("4, 8"). ``use_rslora`` given, alpha is stated for that scaling rule (as
    ``export_peft`` writes it). targets are the module names adapted (`q_proj, v_proj`), weights the number
    of weights adapted.
    """
    from jlora.core.adapter import table

    found = table(adapters)
    facts = [a.card_facts(use_rslora) for a in found.values()]
    ranks = {f["rank"] for f in facts if "rank" in f}
    alphas = {round(f["alpha"], 6) for f in facts if "alpha" in f}  # 8.000000001 reads as 8
    join = lambda values: ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(values)) or None
    targets = sorted({path.rsplit("/", 2)[-2] for path in found})
    return {"method": "+".join(sorted({a.name for a in found.values()})), "rank": join(ranks),
            "alpha": join(alphas), "targets": ", ".join(targets), "weights": len(found)}


def model_card(*, kind, base, where, adapters=None, use_rslora=None, quantize=None, data=None, steps=None,
               perplexity=None, dtype=None, command=None, base_copy=None) -> str:
    """README.md text for an export: what it was made from and how, and how transformers or PEFT loads it.

    Args:
      kind: "merged" (a whole model, base + adapters) or "peft" (a PEFT adapter directory).
      base: the :class:`BaseSource` trained on.
      where: the export's directory, as the loading example names it.
      adapters: the adapter tree, described by :func:`describe_adapters`; use_rslora: as trained.
      quantize: the run's `--quantize` format, if its frozen base was quantised.
      data: what it trained on (e.g. `["play.txt"]` or "default corpus"); steps: the steps trained.
      perplexity: `(before, after)` validation perplexity (either may be None), or None when not measured.
      dtype: the weights' dtype (merged); command: the jlora command line that made the run.
      base_copy: the directory a PEFT export's exact base weights were written to, if they were.

    Returns:
      Markdown with a YAML header (`base_model`, `library_name`, `tags`) as the hub's model cards have.
    """
    if kind not in ("merged", "peft"):
        raise ValueError(f"kind {kind!r} is not an export jlora writes; choose 'merged' or 'peft'.")
    facts = describe_adapters(adapters, use_rslora) if adapters is not None else {}
    method = facts.get("method") or "adapter"
    library = "transformers" if kind == "merged" else "peft"
    header = ["---", f"library_name: {library}"]
    if base.hub_id:
        header.append(f"base_model: {base.hub_id}")
    header += ["tags:", "- jlora", f"- {method}", "---", ""]
    trained_on = f"`{base.name}`" + (f" ({base.hub_id})" if base.hub_id and base.hub_id != base.name else "")
    if base.gguf_type:
        trained_on += f", the GGUF file's {base.gguf_type} weights dequantised to float"
    if quantize:
        trained_on += f", kept quantised as {quantize} while training (the adapters saw its dequantised weights)"
    title = "merged into its base" if kind == "merged" else "as a PEFT adapter"
    lines = header + [f"# {method.upper()} fine-tune of {base.hub_id or base.name}, {title}", "",
                      "Made with jlora (LoRA fine-tuning in JAX).", "", "| | |", "| --- | --- |",
                      f"| base | {trained_on} |"]
    rows = [("method", method), ("rank", facts.get("rank")), ("alpha", facts.get("alpha")),
            ("targets", f"{facts['targets']} ({facts['weights']} weights)" if facts else None),
            ("data", ", ".join(map(str, data)) if isinstance(data, (list, tuple)) else data), ("steps", steps)]
    if perplexity is not None:
        before, after = perplexity
        shown = " → ".join(f"{p:.3f}" for p in (before, after) if p is not None)
        rows.append(("validation perplexity", shown + (" (before → after)" if before is not None and after is not None
                                                       else "")))
    rows += [("weights", dtype), ("command", f"`{command}`" if command else None)]
    lines += [f"| {name} | {value} |" for name, value in rows if value not in (None, "")]
    lines.append("")
    if kind == "merged":
        lines += ["A plain transformers model with its tokenizer: nothing else is needed, offline included.", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
                  f'generate = pipeline("text-generation", model="{where}")',
                  'print(generate("ROMEO:", max_new_tokens=40)[0]["generated_text"])',
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", ""]
        return "\n".join(lines)
    lines += ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
              f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")  # loads the base it names, then the adapter',
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", ""]
    if base_copy is not None:
        lines += [f"adapter_config.json's `base_model_name_or_path` is `{base_copy}`: the exact weights jlora trained "
                  "on, dequantised, written next to the adapter. Keep it there, or edit that path after moving it.", ""]
    elif base.gguf_type or quantize:
        lines += [f"**Base weights.** jlora trained this adapter on {trained_on}. These differ from the float weights "
                  f"that `base_model_name_or_path` (`{base.reference}`) names, so on those the adapter computes close "
                  "to, not exactly, what it was trained for. For the exact base, export again with "
                  "`jlora export-peft RUN OUT --with-base`: it writes those weights to OUT/base in Hugging Face's "
                  "layout and points `base_model_name_or_path` at them.", ""]
    return "\n".join(lines)


def save_model_card(directory, text) -> Path:
    """Write `text` (from :func:`model_card`) as the directory's README.md; returns its path."""
    return _write_text(Path(directory) / "README.md", text)
