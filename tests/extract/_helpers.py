"""Moved to ``tests/_support`` (kept as re-exports while other branches still import it; delete after merge)."""

from _support.files import md5, write_image_folder  # noqa: F401
from _support.references import (  # noqa: F401
    BATCH,
    INPUT_SIZE,
    INPUT_SIZES,
    assert_close,
    hooked_module_name,
    input_size,
    mean_pool,
    random_batch,
    reference_activations,
)
