"""PEFT's LoRA adapter format, in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

A jlora adapter trained in JAX loads with ``peft.PeftModel.from_pretrained`` on the matching transformers
model, and a PEFT adapter trained in PyTorch becomes a jlora adapter tree for the same base. LoRA and DoRA
(``use_dora``, a ``lora_magnitude_vector`` per weight) are read and written; other PEFT types are refused. Module names
come from the model family's Hugging Face key map (``jlora.models.export.hf_names``), the one table the
loaders use too. Nothing is dropped quietly: every tensor of a file lands on a weight of the base or the
import fails naming it, since a PEFT adapter whose names do not match is otherwise silently not applied.

    jlora.peft.export_peft(adapters, config, 'out/peft')                  # PeftModel.from_pretrained(model, 'out/peft')
    adapters = jlora.peft.import_peft('their/peft', variables, config)    # jlora.adapt(model.apply)(variables, adapters, x)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora import paths
from jlora.adapter import table
from jlora.lora import LoRA, scaling_for
from jlora.models import export
from jlora.partition import Trainable

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

# LoraConfig options that change what an adapter computes in ways jlora's LoRA does not.
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
    """A PEFT adapter directory is missing, unreadable, or does not fit the base model or jlora's LoRA."""


def _dora_kind():
    """jlora's DoRA class, or None while this checkout has no ``jlora.dora``."""
    try:
        from jlora.dora import DoRA
    except ImportError:
        return None
    return DoRA


def modules(model_config) -> dict[str, str]:
    """``{param_path: hf_module}`` of every weight PEFT's LoRA can adapt in this model.

    Example:
      >>> modules(GPT2Config(n_layer=1))['h_0/attn/c_attn/kernel']
      'transformer.h.0.attn.c_attn'
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


def peft_scaling(config: dict, module: str) -> tuple[int, float]:
    """``(r, scaling)`` PEFT gives ``module`` under an adapter_config dict."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
    rank = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    return rank, scaling_for(alpha, rank, bool(config.get("use_rslora", False)))


def _alpha(scaling: float, rank: int, use_rslora: bool) -> float:
    """A ``lora_alpha`` from which PEFT recomputes ``scaling`` (alpha / r, or alpha / √r).

    Exact whenever some alpha gives ``scaling`` at this rank, as every scaling ``jlora.init`` makes does;
    otherwise the nearest PEFT can compute, one ulp off at most.
    """
    divisor = math.sqrt(rank) if use_rslora else rank
    alpha, best = scaling * divisor, None
    # The product can round a few ulps away from the alpha that divides back; look on both sides.
    for candidate in _neighbours(alpha, 16):
        error = abs(scaling_for(candidate, rank, use_rslora) - scaling)
        if best is None or error < best[0]:
            best = (error, candidate)
        if error == 0:
            break
    alpha = best[1]
    return int(alpha) if alpha.is_integer() else alpha


def _neighbours(x: float, steps: int):
    """``x``, then the floats 1, 2, ... ulps below and above it."""
    yield x
    below = above = x
    for _ in range(steps):
        below, above = math.nextafter(below, -math.inf), math.nextafter(above, math.inf)
        yield below
        yield above


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
                use_rslora: bool = False) -> Path:
    """Write LoRA adapters as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads.

    PEFT recomputes each module's scaling from ``lora_alpha`` and ``r``, so the alpha written is
    ``scaling · r`` (``scaling · √r`` with ``use_rslora``), chosen so that PEFT's division gives back the
    adapter's ``scaling`` bit for bit (for every scaling ``jlora.init`` makes with the same ``use_rslora``;
    otherwise to within one ulp). Ranks and alphas that differ between modules go to ``rank_pattern`` /
    ``alpha_pattern``, keyed by module names as PEFT matches them.

    Args:
      adapters: an adapter tree of :class:`jlora.LoRA` (or all ``jlora.DoRA``) for the variables (``{'params': ...}``) or params of a
        GPT-2 or Llama model, e.g. ``state.trainable.adapters`` of a restored checkpoint; or that
        ``jlora.Trainable`` itself, refused when it also trains base leaves (PEFT would not get them).
      model_config: the base's ``GPT2Config`` or ``LlamaConfig`` (as ``jlora.models.load`` returns it).
      out_dir: created if needed; its adapter_config.json and adapter_model.safetensors are replaced.
      base_model_name_or_path: recorded for PEFT (the hub name or directory of the base).
      use_rslora: write rsLoRA's alpha (scaling = alpha / √r), for training on in PEFT with rsLoRA.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      PeftFormatError: an adapter is not a 2-D LoRA, sits on a weight PEFT's LoRA has no module for, on an
        embedding tied to the output head, or has a shape other than the config's weight there.

    Example:
      >>> export_peft(adapters, config, 'out/peft', base_model_name_or_path='gpt2')
      >>> model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained('gpt2'), 'out/peft')
    """
    from safetensors.numpy import save_file

    if isinstance(adapters, Trainable):
        if paths.leaves(adapters.base):
            raise PeftFormatError(
                f"the trainable state also trains base leaves {paths.fmt_paths(p for p, _ in paths.leaves(adapters.base))}, "
                "which a PEFT LoRA adapter (bias='none') cannot carry; export the merged model with "
                "jlora.models.export.save_hf instead"
            )
        adapters = adapters.adapters
    found = table(adapters)
    if not found:
        raise PeftFormatError("the adapter tree is empty: there is nothing to export")
    known = modules(model_config)
    names = export.hf_names(model_config)
    shapes = export.expected_shapes(model_config)
    tied = export.family(model_config).tied_embedding(model_config)
    dora = _dora_kind()
    kinds = {type(adapter) for adapter in found.values()}
    if not kinds <= {LoRA, dora} or len(kinds) > 1:
        shown = ", ".join(f"{p!r}: {type(a).__name__}" for p, a in list(found.items())[:5])
        raise PeftFormatError(
            f"PEFT's LoRA format holds LoRA or DoRA adapters, all of one kind (use_dora is one flag for every "
            f"module); these adapters are {shown}"
        )
    use_dora = kinds == {dora}
    tensors, ranks, alphas, kernel_in_out = {}, {}, {}, []
    for full_path, adapter in found.items():
        path = full_path.removeprefix("params/")  # adapters of a linen variables dict, or of its params
        magnitude = adapter.m if use_dora else None
        adapter = adapter.lora if use_dora else adapter
        if adapter.stack_axes or adapter.a.ndim != 2 or adapter.b.ndim != 2:
            raise PeftFormatError(
                f"LoRA at {full_path!r} has factors of shapes {adapter.a.shape}, {adapter.b.shape}; PEFT holds "
                "2-D factors of one unstacked weight"
            )
        if path not in known:
            raise PeftFormatError(
                f"adapter at {full_path!r} is on no weight PEFT's LoRA adapts in this {type(model_config).__name__}; "
                f"adaptable weights are e.g. {paths.fmt_paths(known)}"
            )
        if path == tied:
            raise PeftFormatError(
                f"adapter at {full_path!r} changes an embedding that is also the output head; PEFT applies an "
                "embedding's LoRA to the lookup only, so the exported adapter would compute something else"
            )
        if adapter.kernel_shape != tuple(shapes[path]):
            raise PeftFormatError(
                f"adapter at {full_path!r} is for a weight of shape {adapter.kernel_shape}, but this "
                f"{type(model_config).__name__} has shape {tuple(shapes[path])} there: another base model?"
            )
        module = known[path]
        name_a, name_b = FACTORS[path.rsplit("/", 1)[-1]]
        tensors[f"{PREFIX}{module}.{name_a}"] = np.ascontiguousarray(np.asarray(adapter.a).T)
        tensors[f"{PREFIX}{module}.{name_b}"] = np.ascontiguousarray(np.asarray(adapter.b).T)
        if magnitude is not None:
            if not path.endswith("/kernel"):
                raise PeftFormatError(f"DoRA at {full_path!r} is on an embedding; jlora exports DoRA on Linear/Conv1D weights")
            tensors[f"{PREFIX}{module}.{MAGNITUDE}"] = np.asarray(magnitude)
        ranks[module] = adapter.rank
        alphas[module] = _alpha(adapter.scaling, adapter.rank, use_rslora)
        if path.endswith("/kernel"):
            kernel_in_out.append(names[path][1] is None)

    rank, rank_pattern, target_modules = _patterns(ranks, list(known.values()))
    alpha, alpha_pattern, _ = _patterns(alphas, list(known.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        # GPT-2's Conv1D stores (in, out) like our kernels; PEFT needs to know when merging.
        "fan_in_fan_out": any(kernel_in_out),
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
    }
    for module in ranks:  # the patterns must give back every module's own rank and scaling
        if peft_scaling(config, module) != (ranks[module], scaling_for(alphas[module], ranks[module], use_rslora)):
            raise AssertionError(f"rank/alpha patterns {rank_pattern}, {alpha_pattern} misdescribe {module}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def read_config(peft_dir) -> dict:
    """The adapter_config.json of a PEFT directory, checked to describe an adapter jlora's LoRA can hold.

    Raises:
      PeftFormatError: the file is missing or not JSON, ``peft_type`` is not ``'LORA'``, or an option in
        :data:`UNSUPPORTED` is set.
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
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise PeftFormatError(f"{path} has peft_type={peft_type!r}; jlora imports PEFT LoRA adapters (peft_type 'LORA')")
    for option, what in UNSUPPORTED.items():
        if config.get(option):
            raise PeftFormatError(f"{path} sets {option}={config[option]!r}: {what} is not implemented by jlora's LoRA")
    if config.get("use_dora") and _dora_kind() is None:
        raise PeftFormatError(f"{path} sets use_dora=true, but this jlora has no DoRA adapter kind (jlora.dora)")
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


def _split_name(name: str) -> tuple[str, str] | None:
    """``(module, factor)`` of a tensor name ``base_model.model.<module>.<factor>``, or None."""
    if not name.startswith(PREFIX):
        return None
    for factor in (*FACTORS["kernel"], *FACTORS["embedding"], BASE_WEIGHT, MAGNITUDE):
        if name.endswith("." + factor):
            return name[len(PREFIX): -len(factor) - 1], factor
    return None


def import_peft(peft_dir, params, model_config) -> dict:
    """A PEFT LoRA adapter directory as a jlora adapter tree for the same base model.

    Args:
      peft_dir: a directory written by PEFT's ``save_pretrained`` (adapter_config.json + adapter_model.safetensors).
      params: the base's variables (``{'params': ...}``) or params; the adapter tree mirrors its paths.
      model_config: its ``GPT2Config`` or ``LlamaConfig`` (as ``jlora.models.load`` returns it).

    Returns:
      A nested dict of :class:`jlora.LoRA`, for ``jlora.adapt``, ``jlora.merge`` or a train state; of
      ``jlora.DoRA`` when the config sets ``use_dora`` (``base_norm`` is then computed from ``params``, which
      must hold arrays, not shapes). Factors keep the file's dtype; each scaling is the one PEFT computes
      (``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``).

    Raises:
      PeftFormatError: a file is missing or unreadable; the config is not LoRA or DoRA; a tensor lands on no
        adaptable weight of this model (all such are named); a factor lacks its partner; a shape or rank does not
        fit the base (tensor, expected and found shapes named); an embedding saved alongside differs from the base.

    Example:
      >>> model, variables, _, config = jlora.models.load('path/to/base')
      >>> adapters = import_peft('path/to/peft-adapter', variables, config)
      >>> logits = jlora.adapt(model.apply)(variables, adapters, tokens)
    """
    config = read_config(peft_dir)
    tensors = read_weights(peft_dir)
    source = Path(peft_dir) / WEIGHTS_FILE
    known = {module: path for path, module in modules(model_config).items()}
    names = export.hf_names(model_config)
    tied = export.family(model_config).tied_embedding(model_config)
    weights = dict(paths.leaves(params))
    root = "params/" if any(p.startswith("params/") for p in weights) else ""
    use_dora = bool(config.get("use_dora"))

    factors, stray = collections.defaultdict(dict), []
    for name, array in tensors.items():
        parsed = _split_name(name)
        if parsed is None or parsed[0] not in known:
            stray.append(name)
            continue
        module, factor = parsed
        path = known[module]
        wanted = FACTORS[path.rsplit("/", 1)[-1]] + ((MAGNITUDE,) if use_dora else ())
        if factor != BASE_WEIGHT and factor not in wanted:
            stray.append(name)
            continue
        factors[module][factor] = array
    if stray:
        example = f"{PREFIX}{next(iter(known))}.{FACTORS['kernel'][0]}"
        raise PeftFormatError(
            f"{source}: tensor(s) {paths.fmt_paths(stray)} are not LoRA factors of any module of this "
            f"{type(model_config).__name__} (names look like {example!r}); another base model or adapter kind?"
        )
    if not factors:
        raise PeftFormatError(f"{source} holds no LoRA tensors")

    adapters = {}
    for module, held in factors.items():
        path = known[module]
        base = weights.get(root + path)
        if base is None:
            raise PeftFormatError(f"{source}: module {module} maps to {root + path}, which the given params lack")
        base_shape = tuple(base.shape)
        if BASE_WEIGHT in held:
            transform = names[path][1]
            stored = held.pop(BASE_WEIGHT)
            stored = stored if transform is None else transform(stored)
            if stored.shape != base_shape or not np.array_equal(np.asarray(stored, np.float32), np.asarray(base, np.float32)):
                raise PeftFormatError(
                    f"{source}: {PREFIX}{module}.{BASE_WEIGHT} differs from the base's {root + path} (shape "
                    f"{stored.shape} vs {base_shape}); the adapter was trained on other weights or a resized vocabulary"
                )
            if not held:
                continue
        name_a, name_b = FACTORS[path.rsplit("/", 1)[-1]]
        for present, absent in ((name_a, name_b), (name_b, name_a)):
            if present in held and absent not in held:
                raise PeftFormatError(f"{source}: {PREFIX}{module}.{present} has no {PREFIX}{module}.{absent}")
        if path == tied:
            raise PeftFormatError(
                f"{source}: LoRA on {module}, an embedding tied to the output head here; PEFT applied it to the "
                "lookup only, which jlora's adapter on the shared weight cannot reproduce"
            )
        lora_a, lora_b = held[name_a], held[name_b]
        rank, scaling = peft_scaling(config, module)
        fan_in, fan_out = base_shape
        for name, array, want in ((name_a, lora_a, (rank, fan_in)), (name_b, lora_b, (fan_out, rank))):
            if tuple(array.shape) != want:
                raise PeftFormatError(
                    f"{source}: tensor {PREFIX}{module}.{name} has shape {tuple(array.shape)}, expected {want} "
                    f"(r={rank} from the config, base weight {root + path} of shape {base_shape})"
                )
        lora = LoRA(jnp.asarray(lora_a.T), jnp.asarray(lora_b.T), scaling)
        if use_dora and not path.endswith("/kernel"):
            raise PeftFormatError(f"{source}: DoRA on {module}, an embedding; jlora imports DoRA on Linear/Conv1D weights")
        if use_dora:
            adapters[root + path] = _dora_from(lora, held.get(MAGNITUDE), base, f"{source}: {PREFIX}{module}.{MAGNITUDE}")
        else:
            adapters[root + path] = lora
    return paths.nest(adapters)


def _dora_from(lora: LoRA, magnitude, base, name: str):
    """A jlora DoRA of PEFT's factors and magnitude; ``base_norm`` (for unmerge) is ‖W0‖ of the base."""
    dora = _dora_kind()
    out_shape = lora.out_shape
    if magnitude is None:
        raise PeftFormatError(f"{name} is missing: a DoRA adapter (use_dora=true) has one per target")
    if tuple(magnitude.shape) != out_shape:
        raise PeftFormatError(f"{name} has shape {tuple(magnitude.shape)}, expected {out_shape}")
    shell = dora(lora.a, lora.b, jnp.asarray(magnitude), None, lora.scaling, lora.stack_axes)
    return dataclasses.replace(shell, base_norm=shell.column_norm(base))
