"""Model cards: the README.md an export carries, saying what it was made from and how to load it.

:class:`BaseSource` is what a reader needs to know of the base (its hub id, directory or GGUF quantisation);
:func:`model_card` writes the card of a merged model or a PEFT adapter.
"""

import dataclasses
from pathlib import Path

from jlora.core.adapter import table
from jlora.interop.hf import write_text
from jlora.quant import gguf as gguf_file


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
        return BaseSource(text, None, None, gguf_file.file_type(path))
    return BaseSource(text)


def describe_adapters(adapters, use_rslora=None) -> dict:
    """`{"method", "rank", "alpha", "targets", "weights"}` of an adapter tree, as a model card states them.

    rank and alpha are the kinds' own (``Adapter.card_facts``; None for kinds without them, (IA)³); several
    values are joined ("4, 8"). ``use_rslora`` given, alpha is stated for that scaling rule (as
    ``export_peft`` writes it). targets are the module names adapted (`q_proj, v_proj`), weights the number
    of weights adapted.
    """
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
    return write_text(Path(directory) / "README.md", text)
