"""The adapter kinds jlora ships, one module each behind the protocol of ``jlora.core.adapter``.

Importing this package registers every bundled kind in ``jlora.core.adapter.KINDS``: code that
restores adapters by kind name (checkpoints, PEFT import, the CLI) imports it first.
"""

from jlora.kinds import dora, ia3, lora, pissa

BUNDLED = ("dora", "ia3", "lora")  # the kinds' names, and the CLI's --method choices

__all__ = ["BUNDLED", "dora", "ia3", "lora", "pissa"]
