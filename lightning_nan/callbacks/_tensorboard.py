"""Many scalars of one step written as one TensorBoard event, with what ``TensorBoardLogger.log_metrics`` writes.

Lightning's ``TensorBoardLogger.log_metrics`` (either namespace: both inherit Fabric's) prefixes each
key (``prefix`` + ``LOGGER_JOIN_CHAR``) and calls ``SummaryWriter.add_scalar`` once per key: one event,
one protobuf message and one checksummed record each (~35 us apiece for 48 keys on a 2-core CPU).
:class:`ScalarBatch` writes the same tags, step and ``simple_value`` values as a single event holding
one ``Summary`` with every value.

>>> import tempfile
>>> from torch.utils.tensorboard import SummaryWriter
>>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
>>> with tempfile.TemporaryDirectory() as root:
...     writer = SummaryWriter(root)
...     ScalarBatch(["a", "b"]).write(writer, [1.5, 2.0], step=3)
...     writer.close()
...     acc = EventAccumulator(root)
...     _ = acc.Reload()
...     [(e.step, e.value) for tag in ("a", "b") for e in acc.Scalars(tag)]
[(3, 1.5), (3, 2.0)]
"""

from __future__ import annotations

import math
import struct
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from lightning_nan.callbacks._crc32c import TemplateCRC, crc32c, masked

#: Fabric's ``TensorBoardLogger`` modules; the ``pytorch_lightning`` and ``lightning.pytorch`` loggers inherit
#: their ``log_metrics``. Read from ``sys.modules``: a logger's own module is imported, so nothing is imported here.
_FABRIC_MODULES = ("lightning_fabric.loggers.tensorboard", "lightning.fabric.loggers.tensorboard")


def tensorboard_writer(logger: Any) -> Any | None:
    """The ``torch.utils.tensorboard.SummaryWriter`` behind ``logger`` when its ``log_metrics`` is Lightning's own.

    ``None`` for any other logger, a subclass that overrides ``log_metrics`` (it must see every call), or a
    TensorBoardLogger writing through ``tensorboardX``: those keep going through ``log_metrics``.

    >>> tensorboard_writer(object()) is None
    True
    """
    method = getattr(type(logger), "log_metrics", None)
    if method is None or not any(method is _stock_log_metrics(name) for name in _FABRIC_MODULES):
        return None
    tb = sys.modules.get("torch.utils.tensorboard")
    writer = logger.experiment
    if tb is None or not isinstance(writer, tb.SummaryWriter):
        return None
    return writer


def _stock_log_metrics(module: str) -> Any:
    cls = getattr(sys.modules.get(module), "TensorBoardLogger", None)
    return getattr(cls, "log_metrics", _FABRIC_MODULES)  # a sentinel no logger method is


def prefixed(logger: Any, keys: Sequence[str]) -> list[str]:
    """``keys`` as ``TensorBoardLogger.log_metrics`` names them: ``prefix + LOGGER_JOIN_CHAR + key`` with a prefix.

    >>> class Logger:
    ...     _prefix, LOGGER_JOIN_CHAR = "train", "-"
    >>> prefixed(Logger(), ["norms/grad/w"])
    ['train-norms/grad/w']
    """
    prefix = getattr(logger, "_prefix", "")
    if not prefix:
        return list(keys)
    return [f"{prefix}{logger.LOGGER_JOIN_CHAR}{key}" for key in keys]


class ScalarBatch:
    """A fixed list of scalar tags, written together as one event per step.

    The event is the ``Event(wall_time, step, Summary(value=[Summary.Value(tag, simple_value)...]))``
    that ``add_scalar`` would write per tag, with every value in one ``Summary``. Its encoding is
    prepared once: each :meth:`write` packs the values into it with one ``struct`` call and hands the
    bytes to the writer's queue (where ``EventFileWriter.add_event`` puts ``event.SerializeToString()``),
    instead of building and copying a 48-entry protobuf message on every step. The record's checksums
    come with them (:class:`~lightning_nan.callbacks._crc32c.TemplateCRC`: only the value bytes are
    hashed), so the writer's thread does not run its pure-Python CRC over the whole event. Events of
    frequent writes are held back, then encoded and handed over several at a time (:meth:`write`,
    :meth:`flush`).

    >>> from tensorboard.compat.proto.event_pb2 import Event
    >>> event = Event.FromString(ScalarBatch(["loss", "lr"]).serialize([0.5, 0.25], step=7, wall_time=1.0))
    >>> event.step, [(v.tag, v.simple_value) for v in event.summary.value]
    (7, [('loss', 0.5), ('lr', 0.25)])
    """

    def __init__(self, tags: Sequence[str]) -> None:
        self.tags = list(tags)
        heads = []  # per value: Summary.value's key and length, the tag field, simple_value's key
        for tag in self.tags:
            name = tag.encode()
            value = b"\x0a" + _varint(len(name)) + name + b"\x15"  # field 1 (tag, bytes); field 2 (float)
            heads.append(b"\x0a" + _varint(len(value) + 4) + value)
        self._summary = struct.Struct("<" + "".join(f"{len(h)}sf" for h in heads))
        self._args: list[Any] = [x for h in heads for x in (h, 0.0)]
        self._summary_key = b"\x2a" + _varint(self._summary.size)  # Event field 5 (summary), its length
        self._crc: TemplateCRC | None = None  # prepared at the first write (a few ms)
        self._headers: dict[int, bytes] = {}  # a record's length and its checksum, by length
        self._held: list[tuple[list[float], int, float]] = []  # events not yet written: values, step, wall time
        self._held_queue: Any = None  # the writer's queue they go to
        self._held_writer: Any = None  # and its SummaryWriter
        self._held_since = 0.0  # time.time() of the first of them
        self._last_write = -math.inf

    def _template_crc(self) -> TemplateCRC:
        if self._crc is None:
            positions: list[int] = []
            offset = 0
            for head in self._args[0::2]:
                offset += len(head)
                positions += range(offset, offset + 4)  # the float's bytes
                offset += 4
            self._crc = TemplateCRC(self._summary.pack(*_zeros(self._args)), positions)
        return self._crc

    def record(self, data: bytes) -> bytes:
        """``data`` (from :meth:`serialize`) framed as a TFRecord: length, its masked CRC, ``data``, its masked CRC.

        The packed summary ends ``data``; its part of the CRC comes from the template.
        """
        header = self._headers.get(len(data))
        if header is None:
            length = struct.pack("<Q", len(data))
            header = self._headers[len(data)] = length + struct.pack("<I", masked(crc32c(length)))
        at = len(data) - self._summary.size
        crc = self._template_crc().crc(data[:at], data[at:])
        return header + data + struct.pack("<I", masked(crc))

    def serialize(self, values: Sequence[float], step: int, wall_time: float) -> bytes:
        """The encoded ``Event`` holding ``values`` (one per tag, in order), as ``SerializeToString`` gives it."""
        if len(values) != len(self.tags):
            raise ValueError(f"Expected {len(self.tags)} values (one per tag), got {len(values)}")
        args = self._args
        args[1::2] = values
        head = b"\x09" + _DOUBLE.pack(wall_time)  # field 1 (wall_time, double)
        if step:  # field 2 (step, int64), left out at 0 as protobuf does
            head += b"\x10" + _varint(int(step))
        return head + self._summary_key + self._summary.pack(*args)

    #: At most this many records are held back before they go to the writer's thread together.
    HOLD_RECORDS = 256
    #: ... and none longer than this (seconds); a write this long after the last one is not held at all.
    HOLD_SECONDS = 1.0

    def flush(self) -> None:
        """Encode the held events and hand them to the writer's thread as one item of its queue.

        If that writer was closed meanwhile (a ``SummaryWriter`` opens a new file at its next write),
        the held events are dropped with a warning: they cannot go to the old file any more.

        >>> ScalarBatch(["a"]).flush()  # nothing held: nothing to do
        """
        if not self._held:
            return
        held, queue, writer = self._held, self._held_queue, self._held_writer
        self._held, self._held_queue, self._held_writer = [], None, None
        records: list[bytes] = []
        last = b""
        for values, step, wall_time in held:  # in one go: the code and tables stay in cache from one to the next
            try:
                last = self.serialize(values, step, wall_time)
            except OverflowError:  # a finite value beyond float32: protobuf turns it into inf, as in add_scalar
                _hand_over(queue, records, last)
                records = []
                self._add_summary(writer, values, step, wall_time)
                continue
            records.append(self.record(last))
        _hand_over(queue, records, last)

    def write(self, writer: Any, values: Sequence[float], step: int) -> None:
        """Add one event at ``step`` holding ``values`` to the event file of ``writer`` (a ``SummaryWriter``).

        When writes come less than :attr:`HOLD_SECONDS` apart, the events are held back, then encoded
        and handed to the writer's thread together, :attr:`HOLD_RECORDS` at a time or once the first of
        them is :attr:`HOLD_SECONDS` old: one wake-up of that thread per batch instead of one per step
        (each costs the training thread some hundreds of microseconds on a 2-core CPU), and the
        encoding runs warm. Each event keeps the wall time of its ``write``. Call :meth:`flush` before
        the writer is flushed or closed.
        """
        if len(values) != len(self.tags):
            raise ValueError(f"Expected {len(self.tags)} values (one per tag), got {len(values)}")
        now = time.time()
        events = writer._get_file_writer().event_writer  # tensorboard's EventFileWriter
        queue = getattr(events, "_async_writer", None)
        frequent, self._last_write = now - self._last_write < self.HOLD_SECONDS, now
        if queue is not None and _frames_records(queue):
            if self._held_queue is not queue:
                self.flush()
                self._held_queue, self._held_writer, self._held_since = queue, writer, now
            self._held.append((list(values), step, now))
            if not frequent or len(self._held) >= self.HOLD_RECORDS or now - self._held_since >= self.HOLD_SECONDS:
                self.flush()
            return
        self.flush()  # the events of these tags stay in step order in the file
        data = None
        if queue is not None:
            try:
                data = self.serialize(values, step, now)
            except OverflowError:
                pass
        if data is None or queue is None:
            self._add_summary(writer, values, step, now)
        else:
            queue.write(data)  # what EventFileWriter.add_event does with the serialized event

    def _add_summary(self, writer: Any, values: Sequence[float], step: int, wall_time: float) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary  # what torch's add_scalar builds

        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in zip(self.tags, values)])
        writer._get_file_writer().add_summary(summary, step, wall_time)


def _hand_over(queue: Any, records: list[bytes], last: bytes) -> None:
    if records:
        framed = _Framed(last)  # never empty: the writer's thread marks an item done only if it is truthy
        framed.record = b"".join(records)
        try:
            queue.write(framed)
        except OSError as err:  # tensorboard's "Writer is closed"
            warnings.warn(f"{len(records)} TensorBoard event(s) held back could not be written: {err}", stacklevel=3)


_DOUBLE = struct.Struct("<d")


def _zeros(args: list[Any]) -> list[Any]:
    return [x if i % 2 == 0 else 0.0 for i, x in enumerate(args)]


class _Framed(bytes):
    """The bytes of one event, carrying the framed records of the events held back, this one last, to write
    in their place. Only a record writer whose class :func:`_frames_records` swapped is given them."""

    record: bytes


def _frames_records(queue: Any) -> bool:
    """Let the record writer behind tensorboard's ``_AsyncWriter`` ``queue`` take :class:`_Framed` as is.

    Its class is swapped, once, for a subclass that writes a framed record without computing the
    checksums again (and anything else as before). ``False`` when the writer is not tensorboard's
    ``RecordWriter`` as this code knows it: the bytes then go as plain bytes.
    """
    record_writer = getattr(queue, "_writer", None)
    if isinstance(record_writer, _FramingRecordWriter):
        return True
    worker = getattr(queue, "_worker", None)
    base = _record_writer_class()
    if base is None or type(record_writer) is not base or getattr(worker, "_record_writer", None) is not record_writer:
        return False
    record_writer.__class__ = _framing_class(base)
    return True


def _record_writer_class() -> Any:
    module = sys.modules.get("tensorboard.summary.writer.record_writer")
    return getattr(module, "RecordWriter", None)


_FRAMING: dict[Any, Any] = {}


def _framing_class(base: Any) -> Any:
    cls = _FRAMING.get(base)
    if cls is None:

        class Framing(_FramingRecordWriter, base):
            def write(self, data: bytes) -> None:
                if type(data) is _Framed:
                    self._writer.write(data.record)
                else:
                    super().write(data)

        cls = _FRAMING[base] = Framing
    return cls


class _FramingRecordWriter:
    """Marks record writers whose class :func:`_frames_records` swapped."""


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of ``n`` (negative ints as their 64-bit two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
