"""The training layer: data and chat records, the losses, the jitted step, evaluation, sharding over
devices and hosts, the loop, adapter checkpoints and metrics.

This package's names are the ones of the former ``jlora.train`` module (``jlora.train`` still
names this package): the step, its losses, evaluation and placement on a mesh.
"""

from jlora.training.losses import blocked_cross_entropy, chunked_lm_loss, lm_loss, make_loss, task_loss
from jlora.training.sharding import (DATA, FSDP, batch_sharding, fsdp_spec, mesh, place, replicate, shard_batch,
                                     shard_fsdp, shard_state)
from jlora.training.step import TrainConfig, TrainState, init_state, make_optimizer, make_step, schedule
from jlora.training.evaluate import EVAL_TOKENS, eval_sample, make_eval, perplexity
from jlora.training.runinfo import RunInfo

__all__ = ["DATA", "EVAL_TOKENS", "FSDP", "RunInfo", "TrainConfig", "TrainState", "batch_sharding", "blocked_cross_entropy",
           "chunked_lm_loss", "eval_sample", "fsdp_spec", "init_state", "lm_loss", "make_eval", "make_loss",
           "make_optimizer", "make_step", "mesh", "perplexity", "place", "replicate", "schedule", "shard_batch",
           "shard_fsdp", "shard_state", "task_loss"]
