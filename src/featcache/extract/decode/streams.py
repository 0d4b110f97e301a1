"""Hand decoded batches from the decode thread's CUDA stream to the forward's stream.

The device decode path decodes, resizes and crops in a background thread
(:func:`~featcache.extract.decode.device.iter_device_batches`) while the
caller runs the forward of the previous batch. Both are CUDA work: if they
share a stream, every decode waits for the queued forward and the forward for
the decode (TorchCodec decodes on the calling thread's current stream and
synchronises it before it returns), so nothing overlaps. Here the decode
thread gets its own stream, and each batch crosses to the consumer's stream
with an event:

1. the producer runs its CUDA work under :meth:`StreamHandoff.producing`
   (the decode stream is current in that thread);
2. :meth:`StreamHandoff.publish` records an event on the decode stream after
   the batch's last kernel was queued;
3. :meth:`StreamHandoff.receive`, in the consumer's thread, makes the
   consumer's current stream wait for that event (no host synchronisation)
   and marks the batch's device tensors as used by that stream
   (``record_stream``), so the caching allocator does not hand their memory
   back to the decode stream while the forward may still read it.

On the CPU device every step is a no-op and the batches pass unchanged; the
order of the steps is what the tests check there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

__all__ = ["Handed", "StreamHandoff"]


@dataclass(frozen=True)
class Handed:
    """A batch on its way from the decode stream to the consumer.

    Attributes
    ----------
    batch : tuple
        ``(rows int64 (B,), images uint8 (B, 3, S, S) on the device, reasons list[str])``.
    event : torch.cuda.Event or None
        Recorded on the decode stream after the batch's last kernel; None on the CPU.
    """

    batch: tuple[Any, ...]
    event: Any = None


class StreamHandoff:
    """A side stream for the decode thread, and the event handoff to the consumer's stream.

    Parameters
    ----------
    device : str or torch.device
        Where batches are decoded. CUDA: a new stream on that device; anything else: no-ops.

    Attributes
    ----------
    stream : torch.cuda.Stream or None
        The decode stream (None off CUDA).
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def producing(self) -> Iterator[None]:
        """Make the decode stream current in the calling (decode) thread."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def publish(self, batch: tuple[Any, ...]) -> Handed:
        """Mark the end of ``batch``'s work on the decode stream (call it in the producing thread)."""
        if self.stream is None:
            return Handed(batch)
        event = torch.cuda.Event()
        event.record(self.stream)
        return Handed(batch, event)

    def receive(self, handed: Handed) -> tuple[Any, ...]:
        """The batch, made safe to use on the calling thread's current stream (call it in the consumer)."""
        if handed.event is None:
            return handed.batch
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(handed.event)
        for value in handed.batch:
            if isinstance(value, torch.Tensor) and value.is_cuda:
                value.record_stream(consumer)
        return handed.batch
