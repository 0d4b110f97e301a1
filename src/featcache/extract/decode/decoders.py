"""Batched JPEG decoders on a device: TorchCodec's when installed, else torchvision's.

:func:`select_decoder` picks the first that decodes a tiny test JPEG on the
device (which also shows whether it applies the EXIF orientation itself);
:func:`gpu_decode_status` says what runs, or why nothing does and the fix, for
a doctor command; :func:`decode_each` decodes a batch in one call and, when
the device rejects any file (one bad file fails the whole call), finds the
rejected ones by decoding one at a time. TorchCodec is optional and imported
only when used; torchvision >= 0.29 warns that its decoders are deprecated on
every call, and that one warning is silenced here only.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from featcache.errors import UserError

__all__ = ["DeviceDecodeError", "DeviceDecoder", "select_decoder", "gpu_decode_status", "settle_stream",
           "decode_each"]

logger = logging.getLogger(__name__)

#: The DeprecationWarning torchvision >= 0.29 emits on every image-decoder call (silenced there only).
_TORCHVISION_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision are deprecated"


class DeviceDecodeError(UserError, RuntimeError):
    """No batched JPEG decoder works on the requested device (the message says why and the fix)."""


@dataclass(frozen=True)
class DeviceDecoder:
    """A batched JPEG decoder bound to a device.

    Attributes
    ----------
    name : str
        ``torchcodec`` or ``torchvision``.
    device : str
        Where the decoded images live.
    decode : callable
        ``decode(list of 1-D uint8 CPU tensors) -> list of (3, H, W) uint8 tensors on device``;
        raises when any input is rejected.
    applies_exif : bool
        Whether the decoder already applies the EXIF orientation (checked on a test image).
    """

    name: str
    device: str
    decode: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    applies_exif: bool


def _torchcodec(device: str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    from torchcodec.decoders import decode_jpeg  # optional; imported only when used

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        out = decode_jpeg(datas, mode="RGB", device=device)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    return decode


def _torchvision(device: str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION, category=DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION, category=DeprecationWarning)
            out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    return decode


def _probe_jpeg() -> torch.Tensor:
    """A 3x2 (width x height) JPEG whose EXIF orientation 6 makes it 2x3 upright."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 30, 90)).save(buffer, "JPEG", exif=exif)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


@functools.lru_cache(maxsize=None)
def select_decoder(device: str) -> DeviceDecoder:
    """The fastest working JPEG decoder for ``device``: TorchCodec, else torchvision.

    Each candidate decodes a tiny test JPEG on the device first, which also
    tells whether it applies the EXIF orientation itself.

    Raises
    ------
    DeviceDecodeError
        When no decoder works on ``device``; the message says why and how to fix it.
    """
    device = str(torch.device(device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceDecodeError(f"GPU decode on {device!r} needs a CUDA device, and torch {torch.__version__} "
                                "sees none. Hint: set extract.decode: cpu, or install a CUDA build of torch.")
    failures = []
    for name, build in (("torchcodec", _torchcodec), ("torchvision", _torchvision)):
        try:
            decode = build(device)
            shape = tuple(decode([_probe_jpeg()])[0].shape)
        except Exception as error:  # noqa: BLE001 - a missing or broken decoder is reported, the next one tried
            failures.append(f"{name}: {type(error).__name__}: {error}".replace("\n", " "))
            continue
        if shape in ((3, 2, 3), (3, 3, 2)):
            return DeviceDecoder(name, device, decode, applies_exif=shape == (3, 3, 2))
        failures.append(f"{name}: decoded a 3x2 test JPEG to shape {shape}")
    raise DeviceDecodeError(f"No JPEG decoder works on {device!r} ({'; '.join(failures)}). Hint: install "
                            "torchcodec (pip install torchcodec) or a torchvision built with image support, or set "
                            "extract.decode: cpu.")


def gpu_decode_status(device: str = "cuda") -> tuple[bool, str]:
    """Whether batched device JPEG decoding works on ``device``, and what runs or why not (for ``doctor``)."""
    try:
        decoder = select_decoder(device)
    except DeviceDecodeError as error:
        return False, str(error)
    text = f"{decoder.name}.decode_jpeg, batched on {decoder.device}"
    if decoder.name != "torchcodec":
        text += " (torchcodec not importable; `pip install torchcodec` gives the faster batched decoder)"
    return True, text


def settle_stream(device: str) -> None:
    """On CUDA, wait until the work queued on the calling thread's current stream is done (else nothing).

    Called before every device decode: neither decoder orders its writes after
    work already queued on the caller's stream. nvJPEG's hardware engine (used
    by TorchCodec for baseline JPEGs) does not honour the stream it is given
    (meta-pytorch/torchcodec#1634), and torchvision's batched decoder runs on
    a pool stream that does not wait for the caller's (pytorch/vision#9606).
    Either may be handed, by the caching allocator, memory that kernels queued
    on that stream (the previous batch's resize) still read. The decode thread
    has its own stream, so this waits only for its own work, never the forward.
    """
    if device.startswith("cuda"):
        torch.cuda.current_stream(torch.device(device)).synchronize()


def decode_each(decoder: DeviceDecoder, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Decode a batch in one call; if the device rejects any file, decode one by one (None for rejects)."""
    if not datas:
        return []
    settle_stream(decoder.device)
    try:
        return list(decoder.decode(datas))
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a rejected file fails the whole call: find it alone
        logger.debug("batched device decode failed (%s: %s); decoding one by one", type(error).__name__, error)
    decoded: list[torch.Tensor | None] = []
    for data in datas:
        settle_stream(decoder.device)
        try:
            decoded.append(decoder.decode([data])[0])
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - retried on the CPU path, which reports it if bad there too
            logger.debug("device decoder rejected a file (%s: %s)", type(error).__name__, error)
            decoded.append(None)
    return decoded
