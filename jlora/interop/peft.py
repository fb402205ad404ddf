"""PEFT's LoRA adapter format, in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

A jlora adapter trained in JAX loads with ``peft.PeftModel.from_pretrained`` on the matching transformers
model, and a PEFT adapter trained in PyTorch becomes a jlora adapter tree for the same base. LoRA and DoRA
(``use_dora``, a ``lora_magnitude_vector`` per weight) and (IA)³ (``peft_type`` ``'IA3'``) are read and
written; other PEFT types are refused. Module names come from the model family's Hugging Face key map (``jlora.interop.hf.hf_names``), the one table the
loaders use too. Nothing is dropped quietly: every tensor of a file lands on a weight of the base or the
import fails naming it, since a PEFT adapter whose names do not match is otherwise silently not applied.

    jlora.peft.export_peft(adapters, config, 'out/peft')                  # PeftModel.from_pretrained(model, 'out/peft')
    adapters = jlora.peft.import_peft('their/peft', variables, config)    # jlora.adapt(model.apply)(variables, adapters, x)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora.core import files, paths
from jlora.core.adapter import table
from jlora.kinds.dora import DoRA
from jlora.kinds.ia3 import IA3, INPUT, OUTPUT
from jlora.kinds.lora import LoRA, scaling_for
from jlora.interop import hf as export
from jlora.core.partition import Trainable

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the transformers model twice

# PEFT's names for LoRA's two factors, by the kind of weight (the last component of our param path). Both
# store transposes of jlora's a (in, r) and b (r, out): lora_A is nn.Linear(in, r).weight [r, in] and
# lora_B nn.Linear(r, out).weight [out, r] whether the base is nn.Linear or Conv1D (only PEFT's merge
# reads fan_in_fan_out); an Embedding keeps lora_embedding_A [r, vocab] and lora_embedding_B [dim, r].
FACTORS = {"kernel": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}
# PEFT writes a targeted embedding's full weight too (save_embedding_layers), in case its vocabulary grew.
BASE_WEIGHT = "base_layer.weight"
# DoRA (use_dora) adds the magnitude m of each output column, [out], to a weight's LoRA factors.
MAGNITUDE = "lora_magnitude_vector"
# (IA)³'s vector: [out, 1] scales a weight's outputs, [1, in] (a feedforward module) its inputs.
IA3_VECTOR = "ia3_l"

# LoraConfig / IA3Config options that change what an adapter computes in ways jlora's kinds do not.
UNSUPPORTED = {
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QALoRA",
    "lora_bias": "a bias on lora_B",
    "layer_replication": "layer replication",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter targets",
}


class PeftFormatError(ValueError):
    """A PEFT adapter directory is missing, unreadable, or does not fit the base model or jlora's adapters."""


@dataclasses.dataclass(frozen=True)
class Format:
    """How one adapter kind is written to and read from a PEFT adapter directory.

    Attributes:
      peft_type: the ``peft_type`` of its adapter_config.json.
      claims: whether an adapter_config dict holds adapters of this kind.
      tensors: the tensor names (after the module name) a module holds, by the kind of weight
        (the last component of the param path: ``kernel``, ``embedding``).
      write: ``write(found, placed, model_config, use_rslora) -> (tensors, config settings)``.
      read: ``read(config, held tensors, where) -> Adapter`` for one module.
    """

    peft_type: str
    claims: Callable[[dict], bool]
    tensors: dict[str, tuple[str, ...]]
    write: Callable
    read: Callable


#: The PEFT format of each adapter kind, by the kind's name (``jlora.adapter.KINDS``).
FORMATS: dict[str, Format] = {}


def register(kind_name: str, format: Format) -> None:
    """Makes adapters of the kind ``kind_name`` export to and import from PEFT as ``format``."""
    FORMATS[kind_name] = format


def modules(model_config) -> dict[str, str]:
    """``{param_path: hf_module}`` of every weight PEFT's LoRA can adapt in this model.

    Example:
      >>> from jlora.models.gpt2 import GPT2Config
      >>> adaptable = modules(GPT2Config(n_layer=1))
      >>> adaptable['h_0/attn/c_attn/kernel']
      'transformer.h.0.attn.c_attn'
      >>> sorted(adaptable)
      ['h_0/attn/c_attn/kernel', 'h_0/attn/c_proj/kernel', 'h_0/mlp/c_fc/kernel', 'h_0/mlp/c_proj/kernel',
       'wpe/embedding', 'wte/embedding']
    """
    return {
        path: name.removesuffix(".weight")
        for path, (name, _) in export.hf_names(model_config).items()
        if path.rsplit("/", 1)[-1] in FACTORS
    }


def pattern_key(patterns, module: str):
    """The key of PEFT's ``rank_pattern``/``alpha_pattern`` that applies to ``module``, or None.

    PEFT's own rule (``peft.utils.other.get_pattern_key``): the first key, as a regex, that ends the module
    name at a dot boundary.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def peft_settings(config: dict, module: str) -> tuple[int, float, bool]:
    """``(r, lora_alpha, use_rslora)`` PEFT gives ``module`` under an adapter_config dict."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
    rank = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    return rank, alpha, bool(config.get("use_rslora", False))


def peft_scaling(config: dict, module: str) -> tuple[int, float]:
    """``(r, scaling)`` PEFT gives ``module`` under an adapter_config dict."""
    rank, alpha, use_rslora = peft_settings(config, module)
    return rank, scaling_for(alpha, rank, use_rslora)


def _patterns(values: dict[str, object], all_modules: list[str]) -> tuple[object, dict, list[str]]:
    """The common value, PEFT patterns for the modules that differ, and target_modules naming ``values``' keys.

    A short name (``q_proj``) stands for every adapted module it ends when they agree (and, for
    target_modules, when they are all the model has); otherwise the full module names are written.
    """
    default = collections.Counter(values.values()).most_common(1)[0][0]
    by_short = collections.defaultdict(list)
    for module in values:
        by_short[module.rsplit(".", 1)[-1]].append(module)
    pattern, targets = {}, []
    for short, group in sorted(by_short.items()):
        every = [m for m in all_modules if m.rsplit(".", 1)[-1] == short]
        targets.extend([short] if sorted(group) == sorted(every) else sorted(group))
        differing = [m for m in group if values[m] != default]
        if not differing:
            continue
        if len({values[m] for m in group}) == 1:
            pattern[short] = values[group[0]]
        else:
            pattern.update({m: values[m] for m in sorted(differing)})
    return default, pattern, targets


def export_peft(adapters, model_config, out_dir, *, base_model_name_or_path: str | None = None,
                use_rslora: bool | None = None) -> Path:
    """Write adapters as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads.

    LoRA (and DoRA) adapters become a ``peft_type`` ``'LORA'`` adapter with each adapter's own ``lora_alpha``
    and ``use_rslora``, from which PEFT computes the same scaling. Ranks and alphas that differ between
    modules go to ``rank_pattern`` / ``alpha_pattern``, keyed by module names as PEFT matches them. (IA)³ vectors become an ``'IA3'`` adapter, input-scaled ones ``feedforward_modules``.

    Args:
      adapters: an adapter tree of one kind (:class:`jlora.LoRA`, ``jlora.DoRA`` or ``jlora.IA3``) for the
        variables (``{'params': ...}``) or params of a GPT-2 or Llama model, e.g. ``state.trainable.adapters``
        of a restored checkpoint; or that ``jlora.Trainable`` itself, refused when it also trains base leaves
        (PEFT would not get them).
      model_config: the base's ``GPT2Config`` or ``LlamaConfig`` (as ``jlora.models.load`` returns it).
      out_dir: created if needed; its adapter_config.json and adapter_model.safetensors are replaced.
      base_model_name_or_path: recorded for PEFT, whose ``AutoPeftModelForCausalLM`` loads the base from it: a
        hub id, or a directory (an absolute path; a relative one is read from the working directory).
        ``jlora.interop.card.base_source(name).reference`` gives it for a base jlora loads.
      use_rslora: LoRA only: ``None`` (the default) writes the adapters' own rule; True or False writes every
        alpha for that rule (rsLoRA's scaling = alpha / √r, or alpha / r), re-expressed from the scaling, which
        PEFT then divides back to within an ulp.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      PeftFormatError: the adapters mix kinds; one sits on a weight PEFT has no module for, on an embedding
        tied to the output head, or has a shape other than the config's weight there; a LoRA is not 2-D; an
        output-scaled (IA)³ vector is on a module with a bias (PEFT would scale the bias too).

    Example:
      >>> import tempfile, peft, transformers
      >>> from jlora.models.gpt2 import GPT2, GPT2Config
      >>> sizes = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
      >>> config = GPT2Config(**sizes)
      >>> variables = GPT2(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
      >>> adapters = jlora.init(variables, rank=4)  # on every c_attn
      >>> out = export_peft(adapters, config, tempfile.mkdtemp())
      >>> sorted(p.name for p in out.iterdir())
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel(transformers.GPT2Config(**sizes)), out)
      >>> model.peft_config['default'].r, sorted(model.peft_config['default'].target_modules)
      (4, ['c_attn'])
    """
    from safetensors.numpy import save_file

    if isinstance(adapters, Trainable):
        if paths.leaves(adapters.base):
            raise PeftFormatError(
                f"the trainable state also trains base leaves {paths.fmt_paths(p for p, _ in paths.leaves(adapters.base))}, "
                "which a PEFT adapter (bias='none') cannot carry; export the merged model with "
                "jlora.interop.hf.save_hf instead"
            )
        adapters = adapters.adapters
    found = table(adapters)
    if not found:
        raise PeftFormatError("the adapter tree is empty: there is nothing to export")
    kinds = {adapter.name for adapter in found.values()}
    if len(kinds) > 1 or next(iter(kinds)) not in FORMATS:
        shown = ", ".join(f"{p!r}: {type(a).__name__}" for p, a in list(found.items())[:5])
        raise PeftFormatError(
            f"a PEFT adapter holds adapters all of one kind with a PEFT format ({', '.join(sorted(FORMATS))}; "
            f"peft_type and use_dora are one setting for every module); these adapters are {shown}"
        )
    placed = _place(found, model_config)
    tensors, settings = FORMATS[kinds.pop()].write(found, placed, model_config, use_rslora)
    config = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path, **settings,
              "inference_mode": True}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    export.readable(out_dir / WEIGHTS_FILE)  # safetensors leaves 0600
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _place(found: dict, model_config) -> dict[str, tuple[str, str]]:
    """``{adapter path: (param path, hf module)}``, after checking each adapter fits a module PEFT can adapt."""
    known = modules(model_config)
    shapes = export.expected_shapes(model_config)
    tied = export.family(model_config).tied_embedding(model_config)
    placed = {}
    for full_path, adapter in found.items():
        path = full_path.removeprefix("params/")  # adapters of a linen variables dict, or of its params
        if path not in known:
            raise PeftFormatError(
                f"adapter at {full_path!r} is on no weight PEFT adapts in this {type(model_config).__name__}; "
                f"adaptable weights are e.g. {paths.fmt_paths(known)}"
            )
        if path == tied:
            raise PeftFormatError(
                f"adapter at {full_path!r} changes an embedding that is also the output head; PEFT applies an "
                "embedding's adapter to the lookup only, so the exported adapter would compute something else"
            )
        if adapter.kernel_shape != tuple(shapes[path]):
            raise PeftFormatError(
                f"adapter at {full_path!r} is for a weight of shape {adapter.kernel_shape}, but this "
                f"{type(model_config).__name__} has shape {tuple(shapes[path])} there: another base model?"
            )
        placed[full_path] = path, known[path]
    return placed


def _is_conv1d(model_config, path: str) -> bool:
    """Whether the checkpoint stores this kernel as (in, out) like ours: GPT-2's Conv1D (PEFT's fan_in_fan_out)."""
    return path.endswith("/kernel") and export.hf_names(model_config)[path][1] is None


def _has_bias(model_config, path: str) -> bool:
    return path.rsplit("/", 1)[0] + "/bias" in export.hf_names(model_config)


def _plain_number(x):
    x = x.item() if isinstance(x, np.generic) else x
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _lora_export(found, placed, model_config, use_rslora, use_dora=False):
    tensors, ranks, alphas, rules = {}, {}, {}, {}
    for full_path, adapter in found.items():
        path, module = placed[full_path]
        magnitude = adapter.m if use_dora else None
        adapter = adapter.lora if use_dora else adapter
        if adapter.stack_axes or adapter.a.ndim != 2 or adapter.b.ndim != 2:
            raise PeftFormatError(
                f"LoRA at {full_path!r} has factors of shapes {adapter.a.shape}, {adapter.b.shape}; PEFT holds "
                "2-D factors of one unstacked weight"
            )
        name_a, name_b = FACTORS[path.rsplit("/", 1)[-1]]
        tensors[f"{PREFIX}{module}.{name_a}"] = np.ascontiguousarray(np.asarray(adapter.a).T)
        tensors[f"{PREFIX}{module}.{name_b}"] = np.ascontiguousarray(np.asarray(adapter.b).T)
        if magnitude is not None:
            if not path.endswith("/kernel"):
                raise PeftFormatError(f"DoRA at {full_path!r} is on an embedding; jlora exports DoRA on Linear/Conv1D weights")
            tensors[f"{PREFIX}{module}.{MAGNITUDE}"] = np.asarray(magnitude)
        if use_rslora is not None:  # a scaling rule asked for: alpha re-expressed, to within an ulp
            adapter = adapter.with_rslora(use_rslora)
        ranks[module], alphas[module], rules[module] = adapter.rank, _plain_number(adapter.alpha), adapter.use_rslora
    if len(set(rules.values())) > 1:
        example = {rule: module for module, rule in rules.items()}
        raise PeftFormatError(
            f"the adapters mix use_rslora True ({example[True]}) and False ({example[False]}), but a PEFT adapter "
            "has one use_rslora; pass use_rslora= to write every alpha for one scaling rule"
        )
    use_rslora = next(iter(rules.values()))
    every = list(modules(model_config).values())
    rank, rank_pattern, target_modules = _patterns(ranks, every)
    alpha, alpha_pattern, _ = _patterns(alphas, every)
    settings = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        # GPT-2's Conv1D stores (in, out) like our kernels; PEFT needs to know when merging.
        "fan_in_fan_out": any(_is_conv1d(model_config, path) for path, _ in placed.values()),
        "bias": "none",
        "lora_dropout": 0.0,
    }
    for module in ranks:  # the patterns must give back every module's own rank and alpha
        if peft_settings(settings, module) != (ranks[module], alphas[module], use_rslora):
            raise AssertionError(f"rank/alpha patterns {rank_pattern}, {alpha_pattern} misdescribe {module}")
    return tensors, settings


def _ia3_export(found, placed, model_config, use_rslora):
    tensors, sides = {}, {}
    for full_path, adapter in found.items():
        path, module = placed[full_path]
        if not path.endswith("/kernel") or adapter.stack_axes or adapter.in_axes != 1:
            raise PeftFormatError(f"(IA)³ at {full_path!r} is not on one unstacked Linear/Conv1D kernel, which PEFT's IA3 needs")
        if adapter.side != INPUT and _has_bias(model_config, path):
            raise PeftFormatError(
                f"(IA)³ at {full_path!r} scales the outputs of {module}, which has a bias: PEFT's IA3 scales the "
                "bias too, (x·W + b)·l, where jlora's scales only W, so the export would compute something else"
            )
        vector = np.asarray(adapter.vector(), np.asarray(adapter.scale).dtype)
        tensors[f"{PREFIX}{module}.{IA3_VECTOR}"] = vector[None, :] if adapter.side == INPUT else vector[:, None]
        sides[module] = adapter.side
    _, _, target_modules = _patterns(sides, list(modules(model_config).values()))
    feedforward = sorted(m for m, side in sides.items() if side == INPUT)
    # PEFT calls a module feedforward when its name ends with an entry (no dot boundary): a short name only
    # where it ends no output-scaled target.
    short = {}
    for module in feedforward:
        short.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    feedforward_modules = []
    for name, group in sorted(short.items()):
        clash = any(m.endswith(name) and sides[m] != INPUT for m in sides)
        feedforward_modules.extend(group if clash else [name])
    settings = {
        "peft_type": "IA3",
        "target_modules": target_modules,
        "feedforward_modules": feedforward_modules,
        "fan_in_fan_out": any(_is_conv1d(model_config, path) for path, _ in placed.values()),
        "init_ia3_weights": True,
    }
    return tensors, settings


# The types of the adapter_config.json fields jlora reads (PEFT's LoraConfig and IA3Config).
CONFIG_FIELDS = {"peft_type": str | None, "r": int, "lora_alpha": float, "use_rslora": bool | None, "use_dora": bool | None,
                 "fan_in_fan_out": bool | None, "target_modules": list[str] | str | None, "rank_pattern": dict[str, int] | None,
                 "alpha_pattern": dict[str, float] | None, "feedforward_modules": list[str] | str | None, "bias": str | None,
                 "modules_to_save": list[str] | None, "layers_to_transform": int | list[int] | None,
                 "lora_dropout": float | None, "base_model_name_or_path": str | None}


def read_config(peft_dir) -> dict:
    """The adapter_config.json of a PEFT directory, checked to describe an adapter jlora can hold.

    Raises:
      PeftFormatError: the file is missing or not JSON, no kind's :class:`Format` claims it (``peft_type``
        ``'LORA'``, with or without ``use_dora``, or ``'IA3'``), or an option in :data:`UNSUPPORTED` is set.
    """
    path = Path(peft_dir) / CONFIG_FILE
    if not path.is_file():
        raise PeftFormatError(f"{path} does not exist; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PeftFormatError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{path} holds a JSON {type(config).__name__}, not an adapter config object")
    files.checked(config, CONFIG_FIELDS, path, PeftFormatError, positive=["r"])
    regexes = [*(config.get("rank_pattern") or {}), *(config.get("alpha_pattern") or {}),
               *(config.get(key) for key in ("target_modules", "feedforward_modules") if isinstance(config.get(key), str))]
    for regex in regexes:
        try:
            re.compile(regex)
        except re.error as error:
            raise PeftFormatError(f"{path}: {regex!r} is not a valid regular expression ({error})") from None
    if format_of(config) is None:
        readable = sorted({f.peft_type for f in FORMATS.values()})
        raise PeftFormatError(
            f"{path} has peft_type={config.get('peft_type')!r}; jlora imports PEFT adapters of peft_type {readable}"
        )
    for option, what in UNSUPPORTED.items():
        if config.get(option):
            raise PeftFormatError(f"{path} sets {option}={config[option]!r}: {what} is not implemented by jlora")
    return config


def read_weights(peft_dir) -> dict[str, np.ndarray]:
    """``{name: array}`` of a PEFT directory's adapter_model.safetensors, dtypes as stored."""
    from safetensors import SafetensorError, safe_open

    path = Path(peft_dir) / WEIGHTS_FILE
    if not path.is_file():
        hint = (" (adapter_model.bin is a pickle jlora does not read: save with safe_serialization=True)"
                if (Path(peft_dir) / "adapter_model.bin").is_file() else "")
        raise PeftFormatError(f"{path} does not exist{hint}")
    try:
        # The numpy backend cannot hold bfloat16; the flax one can, and np.asarray keeps it via ml_dtypes.
        with safe_open(str(path), framework="flax") as file:
            return {name: np.asarray(file.get_tensor(name)) for name in file.keys()}
    except (SafetensorError, OSError) as error:
        raise PeftFormatError(f"{path} is not a readable safetensors file ({error})") from None


def format_of(config: dict) -> Format | None:
    """The :class:`Format` that claims an adapter_config dict, or None."""
    return next((f for f in FORMATS.values() if f.claims(config)), None)


def _split_name(name: str) -> tuple[str, str] | None:
    """``(module, tensor)`` of a tensor name ``base_model.model.<module>.<tensor>``, or None."""
    if not name.startswith(PREFIX):
        return None
    known = {BASE_WEIGHT, *(t for f in FORMATS.values() for names in f.tensors.values() for t in names)}
    for tensor in known:
        if name.endswith("." + tensor):
            return name[len(PREFIX): -len(tensor) - 1], tensor
    return None


def import_peft(peft_dir, params, model_config) -> dict:
    """A PEFT adapter directory (LoRA, DoRA or IA3) as a jlora adapter tree for the same base model.

    Args:
      peft_dir: a directory written by PEFT's ``save_pretrained`` (adapter_config.json + adapter_model.safetensors).
      params: the base's variables (``{'params': ...}``) or params; the adapter tree mirrors its paths.
      model_config: its ``GPT2Config`` or ``LlamaConfig`` (as ``jlora.models.load`` returns it).

    Returns:
      A nested dict of :class:`jlora.LoRA`, for ``jlora.adapt``, ``jlora.merge`` or a train state; of
      ``jlora.DoRA`` when the config sets ``use_dora`` (``base_norm`` is then computed from ``params``, which
      must hold arrays, not shapes); of ``jlora.IA3`` for ``peft_type`` ``'IA3'``. Factors keep the file's
      dtype; each LoRA's alpha and use_rslora are PEFT's (``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
      ``use_rslora``), so its scaling is the one PEFT computes.

    Raises:
      PeftFormatError: a file is missing or unreadable; the config is not LoRA, DoRA or IA3; a tensor lands on
        no adaptable weight of this model (all such are named); a factor lacks its partner; a shape or rank does
        not fit the base (tensor, expected and found shapes named); an embedding saved alongside differs from the
        base; an output-scaled IA3 vector is on a module whose bias is not zero.

    Example:
      >>> import tempfile, peft, transformers
      >>> base_dir, peft_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
      >>> base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32,
      ...                                                               n_layer=2, n_head=2))
      >>> base.save_pretrained(base_dir)
      >>> lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['c_attn'], fan_in_fan_out=True)  # GPT-2's Conv1D
      >>> peft.get_peft_model(base, lora).save_pretrained(peft_dir)  # as PEFT saves a trained adapter
      >>> model, variables, _, config = jlora.models.load(base_dir)
      >>> adapters = import_peft(peft_dir, variables, config)
      >>> jax.tree.map(jnp.shape, adapters['params']['h_0'])
      {'attn': {'c_attn': {'kernel': LoRA(a=(32, 4), b=(4, 96), alpha=8, stack_axes=0, use_rslora=False)}}}
      >>> jlora.adapt(model.apply)(variables, adapters, jnp.array([[1, 2, 3]])).shape
      (1, 3, 64)
    """
    config = read_config(peft_dir)
    format = format_of(config)
    wanted = lambda path: format.tensors.get(path.rsplit("/", 1)[-1], ())
    tensors = read_weights(peft_dir)
    source = Path(peft_dir) / WEIGHTS_FILE
    known = {module: path for path, module in modules(model_config).items()}
    names = export.hf_names(model_config)
    weights = dict(paths.leaves(params))
    root = "params/" if any(p.startswith("params/") for p in weights) else ""

    factors, stray = collections.defaultdict(dict), []
    for name, array in tensors.items():
        parsed = _split_name(name)
        if parsed is None or parsed[0] not in known or parsed[1] not in (BASE_WEIGHT, *wanted(known[parsed[0]])):
            stray.append(name)
            continue
        factors[parsed[0]][parsed[1]] = array
    if stray:
        example, example_path = next((module, path) for module, path in known.items() if path.endswith("/kernel"))
        raise PeftFormatError(
            f"{source}: tensor(s) {paths.fmt_paths(stray)} are not {config['peft_type']} tensors of any module of "
            f"this {type(model_config).__name__} (names look like {PREFIX}{example}.{wanted(example_path)[0]}); "
            "another base model or adapter kind?"
        )
    if not factors:
        raise PeftFormatError(f"{source} holds no adapter tensors")

    adapters = {}
    for module, held in factors.items():
        path = known[module]
        base = weights.get(root + path)
        if base is None:
            raise PeftFormatError(f"{source}: module {module} maps to {root + path}, which the given params lack")
        if BASE_WEIGHT in held:
            transform = names[path][1]
            stored = held.pop(BASE_WEIGHT)
            stored = stored if transform is None else transform(stored)
            if stored.shape != tuple(base.shape) or not np.array_equal(np.asarray(stored, np.float32), np.asarray(base, np.float32)):
                raise PeftFormatError(
                    f"{source}: {PREFIX}{module}.{BASE_WEIGHT} differs from the base's {root + path} (shape "
                    f"{stored.shape} vs {tuple(base.shape)}); the adapter was trained on other weights or a resized vocabulary"
                )
            if not held:
                continue
        where = _Where(source, module, root + path, base, weights, model_config)
        adapters[root + path] = format.read(config, held, where)
    return paths.nest(adapters)


@dataclasses.dataclass(frozen=True)
class _Where:
    """The module a reader is building an adapter for, and what errors name."""

    source: Path
    module: str
    path: str  # the param path in the given params
    base: object  # the base weight there
    weights: dict
    model_config: object

    def tensor(self, factor: str) -> str:
        return f"{PREFIX}{self.module}.{factor}"

    def refuse(self, message: str) -> PeftFormatError:
        return PeftFormatError(f"{self.source}: {message}")


def _lora_import(config: dict, held: dict, where: _Where):
    path = where.path.removeprefix("params/")
    tied = export.family(where.model_config).tied_embedding(where.model_config)
    name_a, name_b = FACTORS[path.rsplit("/", 1)[-1]]
    for present, absent in ((name_a, name_b), (name_b, name_a)):
        if present in held and absent not in held:
            raise where.refuse(f"{where.tensor(present)} has no {where.tensor(absent)}")
    if path == tied:
        raise where.refuse(
            f"LoRA on {where.module}, an embedding tied to the output head here; PEFT applied it to the lookup "
            "only, which jlora's adapter on the shared weight cannot reproduce"
        )
    lora_a, lora_b = held[name_a], held[name_b]
    rank, alpha, use_rslora = peft_settings(config, where.module)
    base_shape = tuple(where.base.shape)
    fan_in, fan_out = base_shape
    for name, array, want in ((name_a, lora_a, (rank, fan_in)), (name_b, lora_b, (fan_out, rank))):
        if tuple(array.shape) != want:
            raise where.refuse(
                f"tensor {where.tensor(name)} has shape {tuple(array.shape)}, expected {want} "
                f"(r={rank} from the config, base weight {where.path} of shape {base_shape})"
            )
    return LoRA(jnp.asarray(lora_a.T), jnp.asarray(lora_b.T), alpha, use_rslora=use_rslora)


def _dora_import(config: dict, held: dict, where: _Where):
    lora = _lora_import(config, held, where)
    if not where.path.endswith("/kernel"):
        raise where.refuse(f"DoRA on {where.module}, an embedding; jlora imports DoRA on Linear/Conv1D weights")
    magnitude = held.get(MAGNITUDE)
    if magnitude is None:
        raise where.refuse(f"{where.tensor(MAGNITUDE)} is missing: a DoRA adapter (use_dora=true) has one per target")
    if tuple(magnitude.shape) != lora.out_shape:
        raise where.refuse(f"{where.tensor(MAGNITUDE)} has shape {tuple(magnitude.shape)}, expected {lora.out_shape}")
    shell = DoRA(lora.a, lora.b, jnp.asarray(magnitude), None, lora.alpha, lora.stack_axes, use_rslora=lora.use_rslora)
    # base_norm = ‖W0‖ per column: what jlora.dora.init records, for unmerge
    return dataclasses.replace(shell, base_norm=shell.column_norm(where.base))


def _is_feedforward(config: dict, module: str) -> bool:
    """PEFT's rule (``IA3Model._check_target_module_feedforward``): a regex fullmatch, or a name's ending."""
    feedforward = config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module) is not None
    return any(module.endswith(name) for name in feedforward)


def _ia3_import(config: dict, held: dict, where: _Where):
    vector = held[IA3_VECTOR]
    fan_in, fan_out = tuple(where.base.shape)
    feedforward = _is_feedforward(config, where.module)
    want = (1, fan_in) if feedforward else (fan_out, 1)
    if tuple(vector.shape) != want:
        raise where.refuse(
            f"tensor {where.tensor(IA3_VECTOR)} has shape {tuple(vector.shape)}, expected {want} (a "
            f"{'feedforward' if feedforward else 'non-feedforward'} module on base weight {where.path} of shape "
            f"{(fan_in, fan_out)})"
        )
    bias = where.weights.get(where.path.rsplit("/", 1)[0] + "/bias")
    if not feedforward and bias is not None and np.any(np.asarray(bias) != 0):
        raise where.refuse(
            f"IA3 scales the outputs of {where.module}, bias included, (x·W + b)·l; jlora's (IA)³ scales only W, "
            f"and the base's {where.path.rsplit('/', 1)[0]}/bias is not zero"
        )
    side = INPUT if feedforward else OUTPUT
    return IA3(jnp.asarray(vector.reshape(-1)), (fan_in, fan_out), side)


def _is_lora(config: dict, use_dora: bool) -> bool:
    return config.get("peft_type") == "LORA" and bool(config.get("use_dora")) == use_dora


register("lora", Format("LORA", functools.partial(_is_lora, use_dora=False), FACTORS, _lora_export, _lora_import))
register("dora", Format("LORA", functools.partial(_is_lora, use_dora=True), {"kernel": (*FACTORS["kernel"], MAGNITUDE), "embedding": FACTORS["embedding"]},
                        functools.partial(_lora_export, use_dora=True), _dora_import))
register("ia3", Format("IA3", lambda config: config.get("peft_type") == "IA3", {"kernel": (IA3_VECTOR,)}, _ia3_export,
                       _ia3_import))
