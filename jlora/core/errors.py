"""The one error jlora raises for a file it reads: a model's weights or a training run's checkpoint."""


class CheckpointError(ValueError):
    """A weight file or checkpoint is missing, unreadable, lacks a field jlora reads, or does not fit the
    model (or run) it is loaded into. The message names the file, and the tensor, key or shape at fault."""
