"""Training metrics as TensorBoard event files: every number of every history entry, by step.

``jlora.fit`` records history entries; :class:`TensorBoard` is a ``log`` for it that writes each
entry's numbers as scalars (tag = the entry's key, ``valid_perplexity/<task>`` grouped by task),
through tensorboardX's event writer. :func:`read_scalars` reads them back.

    board = TensorBoard("runs/a/tensorboard", start=0)
    jlora.fit(step, state, batch_at, max_steps=100, log=board)
    board.close()
    # tensorboard --logdir runs/a/tensorboard
"""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

FLUSH_SECONDS = 30  # how long step entries may wait in memory before they are written


class TensorBoard:
    """Writes history entries to event files in ``directory``; call it with each entry.

    Args:
      directory: where the event files go (created if needed).
      start: the step a resumed run continues from: TensorBoard then discards what earlier files
        hold after it (a purge event), as ``jlora.fit`` drops those history entries.

    Example:
      >>> import tempfile
      >>> directory = tempfile.mkdtemp()
      >>> with TensorBoard(directory) as board:
      ...     board({"step": 1, "loss": 2.5, "learning_rate": 0.001})
      >>> read_scalars(directory)["loss"]
      [(1, 2.5)]
    """

    def __init__(self, directory, start: int = 0):
        try:
            from tensorboardX.event_file_writer import EventsWriter
        except ImportError:
            raise ImportError("TensorBoard files need tensorboardX: pip install tensorboardX") from None
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # tensorboardX's events writer in this thread: a full disk raises OSError here, at the call
        # that met it (its SummaryWriter writes from a thread, which dies with its own traceback).
        self.events = EventsWriter(str(self.directory / "events"))
        if start:  # what SummaryWriter(purge_step=start) writes: TensorBoard hides older files' later steps
            self.events.write_event(Event(step=start, session_log=SessionLog(status=SessionLog.START)))
        self.flushed = time.monotonic()

    def __call__(self, entry: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=key, simple_value=float(value)) for key, value in entry.items()
                  if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value)]
        self.events.write_event(Event(wall_time=time.time(), step=int(entry["step"]), summary=Summary(value=values)))
        if "loss" not in entry or time.monotonic() - self.flushed > FLUSH_SECONDS:  # an evaluation: worth having at once
            self.events.flush()
            self.flushed = time.monotonic()

    def close(self) -> None:
        """Flushes and closes the file; a second call does nothing."""
        events, self.events = self.events, None
        if events is not None:
            events.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``directory``: ``{tag: [(step, value), ...]}`` in file
    then write order. Values are float32, as TensorBoard stores them; purge events are not applied.

    Raises:
      ValueError: a record's length or checksum field is cut short (a file still being written).
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).rglob("events.out.tfevents.*")):
        for record in _records(path.read_bytes(), path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((int(event.step), value.simple_value))
    return scalars


def _records(blob: bytes, path):
    """The payloads of a TFRecord file: each is a little-endian u64 length, its u32 CRC, the bytes,
    their u32 CRC (the CRCs are not checked)."""
    offset = 0
    while offset < len(blob):
        if offset + 12 > len(blob):
            raise ValueError(f"{path}: a record header is cut short at byte {offset}")
        (length,) = struct.unpack_from("<Q", blob, offset)
        end = offset + 12 + length + 4
        if end > len(blob):
            raise ValueError(f"{path}: a record of {length} bytes at byte {offset} is cut short")
        yield blob[offset + 12 : end - 4]
        offset = end
