"""From image files to model-ready pixels: preprocessing, header probes, the CPU loaders and the device decoder.

* ``images``: any image file or its bytes to upright 8-bit RGB (PIL, the pixel limit, checks, TIFFs);
* ``preprocess``: the model-specific recipe (resize/crop, normalise);
* ``loaders``: PIL decoding in worker processes (numpy batches, or torch's DataLoader);
* ``probe``, ``decoders``, ``device``: JPEGs decoded in batches on a CUDA device.
"""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "Preprocessor": "preprocess",
    **dict.fromkeys(["DECODE_ERRORS", "ImageTooLargeError", "load_rgb", "to_rgb"], "images"),
    **dict.fromkeys(["ImageDataset", "ImageReader", "iter_array_batches", "make_loader"], "loaders"),
    **dict.fromkeys(["iter_device_batches"], "device"),
    **dict.fromkeys(["gpu_decode_status", "select_decoder"], "decoders"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
