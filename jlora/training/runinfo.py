"""What a run's checkpoints say about the run that wrote them: base, adapters, settings, data, layout.

``jlora finetune`` writes it with every checkpoint; ``generate``, ``eval``, ``merge`` and the exports read
it back to load the same base the same way. On disk it stays the JSON dict that checkpoints always held
(``{"base": {...}, "adapter": {...}, "train": {...}, ...}``), so runs written before :class:`RunInfo`
existed load unchanged; entries an older run lacks take their defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class RunInfo:
    """A run's checkpoint metadata, typed.

    Attributes:
      base: the base's identity: ``{"name", "fingerprint"}`` plus ``"quantize"`` for a quantised base.
      adapter: ``{"method", "options", "bias"}`` that created the adapters (None until known).
      train: the :class:`jlora.training.TrainConfig` as a dict.
      data: ``{"train": paths or "default corpus" (a dict NAME -> PATH with tasks), "seq_len"}``.
      scan: the scanned layers' name when the adapters are stacked along it (``--scan``), else None.
      eval: the validation sample, ``{"tokens", "seq_len"}`` (``jlora eval``'s default), or None.
      tasks: the task names of a multi-task run (one adapter each), else None.
      step: the step of the checkpoint it was read from, or None.
      extra: every other entry of the JSON (``jlora_version``, ``trainable``, ``evaluation`` ...), kept as is.

    Example:
      >>> info = RunInfo.from_json({"base": {"name": "gpt2", "fingerprint": "ab"}, "step": 3})
      >>> info.base_name, info.step, info.scan, info.tasks
      ('gpt2', 3, None, None)
    """

    base: dict
    adapter: dict | None = None
    train: dict | None = None
    data: dict | None = None
    scan: str | None = None
    eval: dict | None = None
    tasks: list[str] | None = None
    step: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    _KEYS = ("base", "adapter", "train", "data", "model", "eval", "tasks", "step")

    @property
    def base_name(self) -> str:
        return self.base["name"]

    @property
    def quantize(self) -> str | None:
        return self.base.get("quantize")

    @property
    def method(self) -> str | None:
        return (self.adapter or {}).get("method")

    @property
    def bias(self) -> str:
        return (self.adapter or {}).get("bias", "none")

    @property
    def options(self) -> dict:
        return (self.adapter or {}).get("options") or {}

    @property
    def seq_len(self) -> int | None:
        """The rows' length the run trained on (its validation sample's, else its data's)."""
        return (self.eval or {}).get("seq_len") or (self.data or {}).get("seq_len")

    def to_json(self) -> dict[str, Any]:
        """The JSON dict a checkpoint holds (the layout checkpoints had before this class)."""
        found = {"base": self.base, "adapter": self.adapter, "train": self.train, "data": self.data,
                 "model": {"scan": self.scan}, "eval": self.eval, "tasks": self.tasks, "step": self.step}
        keep = {k: v for k, v in found.items() if v is not None}
        return self.extra | keep

    @classmethod
    def from_json(cls, entries: dict[str, Any]) -> RunInfo:
        """A checkpoint's metadata dict as a :class:`RunInfo`; entries older runs lack take their defaults."""
        if "base" not in entries:
            raise ValueError(f"run metadata names no base; it holds {sorted(entries)}")
        return cls(base=entries["base"], adapter=entries.get("adapter"), train=entries.get("train"),
                   data=entries.get("data"), scan=(entries.get("model") or {}).get("scan"), eval=entries.get("eval"),
                   tasks=entries.get("tasks") or None, step=entries.get("step"),
                   extra={k: v for k, v in entries.items() if k not in cls._KEYS})

    def resume_differences(self, saved: RunInfo) -> list[str]:
        """What this run would change in the run ``saved`` describes, were it to resume it: any of
        ``"tasks"`` (other task names), ``"scan"`` (stacked or not), ``"train"`` (other training
        settings: it resumes, but will not equal an uninterrupted run), in that order."""
        differ = {"tasks": (self.tasks or []) != (saved.tasks or []), "scan": self.scan != saved.scan,
                  "train": self.train != saved.train}
        return [field for field, different in differ.items() if different]
