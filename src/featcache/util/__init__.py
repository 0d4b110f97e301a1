"""Small leaf helpers shared by every subpackage (of featcache, only the leaf ``featcache.errors`` is imported).

* :mod:`featcache.util.atomic` - write a file atomically (temp file + ``os.replace``);
* :mod:`featcache.util.checks` - the integer-setting check (name, bad value, what is allowed; raises
  ``featcache.errors.ParamError``); not imported here, so only the stages that check settings run it;
* :mod:`featcache.util.closing` - the ``with obj:`` mixin of objects with a ``close()``;
* :mod:`featcache.util.compute` - devices, CPU counts and torch thread limits;
* :mod:`featcache.util.hashing` - the sha256 of a file's bytes;
* :mod:`featcache.util.cache_dir`, :mod:`featcache.util.machine_records` - the cache root, its JSON entries, and what
  this machine records there (a file's sha256 while its stat holds, torch's default thread count); not imported
  here, so only the extract stage runs them;
* :mod:`featcache.util.names` - "did you mean" hints for unknown names.
"""

from featcache.util.atomic import atomic_path, write_bytes, write_csv, write_json, write_text
from featcache.util.closing import Closing
from featcache.util.compute import (
    DEVICES,
    default_num_workers,
    physical_cores,
    resolve_device,
    torch_threads,
    usable_cpus,
)
from featcache.util.hashing import file_sha256
from featcache.util.names import closest, did_you_mean

__all__ = [
    "DEVICES",
    "Closing",
    "atomic_path",
    "closest",
    "default_num_workers",
    "did_you_mean",
    "file_sha256",
    "physical_cores",
    "resolve_device",
    "torch_threads",
    "usable_cpus",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_text",
]
