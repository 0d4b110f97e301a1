"""WebDataset tar shards: the shard list, and each shard's samples read from its tar headers.

A WebDataset shard is a plain tar file whose members are grouped into
samples by key: ``a/b/0001.jpg``, ``a/b/0001.cls`` and ``a/b/0001.json`` are
the ``jpg``, ``cls`` and ``json`` of the sample ``a/b/0001`` (webdataset's
``base_plus_ext`` rule: the key ends at the first dot of the file name).
:func:`scan_shard` reads one shard sequentially, once, with
:class:`~featcache.extract.inputs.tar_headers.TarReader` (tar headers
only; see there why not ``tarfile``), over a local file or an fsspec URL: it
keeps each sample's image member (its byte offset and size, never decoding it), reads
the small label / split members, and hashes the bytes as they pass (the
shard's sha256). Reading a shard costs one sequential pass: over a URL, range
requests of 8 MiB one after another (:func:`~featcache.extract.inputs.storage.open_binary`).

Why not ``webdataset`` itself: importing it takes 2.2 s and imports torch
(measured on the 2-core VM), which the prepare stage and a warm ONNX
extraction never do; its pipeline streams whole shards in their own order,
while extraction reads the rows of a committed block by byte range. Its
writer (``webdataset.TarWriter``) makes the test shards, and a test checks
that :func:`split_name` splits member names exactly as webdataset does.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from featcache.errors import UserError
from featcache.extract.inputs.storage import (
    StorageOptions,
    describe_failure,
    is_storage_error,
    is_transient,
    is_url,
    open_binary,
)
from featcache.extract.inputs.tar_headers import TarReader

__all__ = ["DEFAULT_IMAGE_KEYS", "Sample", "ShardReadError", "ShardScan", "expand_shards", "scan_shard", "shard_name",
           "split_name"]

logger = logging.getLogger(__name__)

#: Member extensions taken as a sample's image, in order of preference (``data.image_keys``).
DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# webdataset.tariterators.base_plus_ext: key up to the first dot of the file name, extension the rest.
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's tar_file_iterator skips metadata members such as __index__ or __meta__/...
_META = re.compile(r"__[^/]*__($|/)")


class ShardReadError(UserError, OSError):
    """A shard that cannot be read at all (missing, failing after every try, or a server that cannot serve it):
    its member list, and so its samples, are unknown. The message names the shard, why, and what to check."""


#: fsspec's HTTP file, when a server answers a Range request with the whole object (it ignores ``Range``).
_NO_RANGES = "doesn't appear to support range requests"


def split_name(name: str) -> tuple[str | None, str | None]:
    """A member name as webdataset groups it: ``("dir/0001", "seg.png")`` for ``dir/0001.seg.png``.

    Returns ``(None, None)`` for a name without an extension (not part of any sample).
    """
    match = _BASE_PLUS_EXT.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def shard_name(path: str) -> str:
    """The shard's part of a sample id: its file name without ``.tar`` (``shards/000007.tar`` -> ``000007``)."""
    base = posixpath.basename(path.split("?", 1)[0].rstrip("/")) if is_url(path) else Path(path).name
    return base[: -len(".tar")] if base.lower().endswith(".tar") else base


def expand_shards(path: str | Sequence[str]) -> list[str]:
    """The shards of ``data.path``: a folder of ``.tar`` files, a brace pattern, a file or URL, or a list of these.

    Brace patterns follow webdataset (``shards/{000000..000127}.tar``,
    ``{train,val}-{0..3}.tar``; ``braceexpand``). A local folder gives its
    ``*.tar`` files (not hidden ones). The order is the sample-id order:
    sorted by :func:`shard_name`.

    Raises
    ------
    ValueError
        No shards, a compressed shard (``.tar.gz``: its members cannot be
        read by byte range), or two shards with the same name (their sample
        ids would collide).
    """
    from braceexpand import braceexpand

    items = [path] if isinstance(path, str) else list(path)
    shards: list[str] = []
    for item in items:
        for one in braceexpand(str(item)):
            if not is_url(one) and Path(one).is_dir():
                found = sorted(str(p) for p in Path(one).iterdir() if p.is_file() and p.suffix == ".tar"
                               and not p.name.startswith("."))
                if not found:
                    raise ValueError(f"No .tar shards in the folder {one!r}. Hint: data.path is a folder of "
                                     "WebDataset .tar shards, a brace pattern (shards/{000000..000009}.tar) or a list.")
                shards.extend(found)
            else:
                shards.append(one)
    if not shards:
        raise ValueError(f"data.path {path!r} names no shards.")
    for shard in shards:
        if re.search(r"\.(tgz|tar\.(gz|bz2|xz|zst))$", shard.split("?", 1)[0], re.IGNORECASE):
            raise ValueError(f"Shard {shard!r} is compressed; featcache reads members by byte range, which needs "
                             "plain .tar shards. Hint: decompress it (gunzip), as img2dataset's default output is.")
    names: dict[str, str] = {}
    for shard in shards:
        other = names.setdefault(shard_name(shard), shard)
        if other != shard:
            raise ValueError(f"Shards {other!r} and {shard!r} have the same name {shard_name(shard)!r}; sample ids "
                             "(<shard>/<key>) would collide. Hint: rename one of them.")
    return sorted(dict.fromkeys(shards), key=lambda s: shard_name(s) + "/")


@dataclass
class Sample:
    """One sample of a shard, as its tar headers (and small text members) describe it.

    Attributes
    ----------
    key : str
        webdataset's ``__key__``.
    image : str
        Name of the image member (``""``: none of the image keys).
    offset, size : int
        Byte offset of the image member's data in the shard, and its size.
    label, split : str or None
        The label (or regression target) and the split the sample carries, if any.
    members : list of str
        Extensions of every member of the sample (for messages).
    """

    key: str
    image: str = ""
    offset: int = 0
    size: int = 0
    label: str | None = None
    split: str | None = None
    members: list[str] = field(default_factory=list)


@dataclass
class ShardScan:
    """What :func:`scan_shard` found in one shard.

    Attributes
    ----------
    path : str
        The shard as listed (local path or URL).
    sha256 : str
        Hex sha256 of the bytes read (the whole shard, unless ``problem``).
    size : int
        Bytes read.
    samples : list of Sample
        Sorted by key.
    problem : str
        ``""``, or why the shard ended early (truncated, not a tar); the samples before it are kept.
    cut : str or None
        With ``problem``: the key of the sample the early end went through (the last one in tar order),
        whose later members (often its label: webdataset writes ``jpg`` before ``json``) are lost.
    duplicates : list of str
        Member names that occur more than once in the shard (the sample they belong to is ambiguous).
    """

    path: str
    sha256: str
    size: int
    samples: list[Sample]
    problem: str = ""
    cut: str | None = None
    duplicates: list[str] = field(default_factory=list)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def _json_field(text: str, key: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or key not in value or value[key] is None:
        return None
    return str(value[key])


def _scan_once(path: str, image_keys: Sequence[str], label_key: str, split_key: str | None,
               options: StorageOptions) -> ShardScan:
    samples: dict[str, Sample] = {}
    jsons: dict[str, str] = {}
    rank = {ext: i for i, ext in enumerate(image_keys)}
    last_key, duplicates = None, []
    with open_binary(path, options) as raw:
        reader = TarReader(raw)
        for member, data in reader.members():
            if _META.match(member.name):
                continue
            key, ext = split_name(member.name)
            if key is None or ext is None:
                continue
            sample = samples.get(key) or samples.setdefault(key, Sample(key))
            last_key = key
            ext = ext.lower()
            if ext in sample.members:
                duplicates.append(member.name)
            sample.members.append(ext)
            if ext in rank:
                if not sample.image or rank[ext] < rank[split_name(sample.image)[1].lower()]:  # type: ignore[union-attr]
                    sample.image, sample.offset, sample.size = member.name, member.offset, member.size
                continue
            if ext not in (label_key, split_key, "json"):
                continue
            text = data.take(member.size)
            if len(text) < member.size:  # cut by the end of the shard: a partial label is no label
                continue
            if ext == label_key:
                sample.label = _text(text)
            elif ext == split_key:
                sample.split = _text(text)
            else:
                jsons[key] = _text(text)
        reader.drain()  # the end-of-archive blocks and padding belong to the shard's hash
    for key, text in jsons.items():
        sample = samples[key]
        if sample.label is None:
            sample.label = _json_field(text, label_key)
        if sample.split is None and split_key is not None:
            sample.split = _json_field(text, split_key)
    return ShardScan(path, reader.sha256.hexdigest(), reader.size, sorted(samples.values(), key=lambda s: s.key),
                     reader.problem, last_key if reader.problem else None, duplicates)


def scan_shard(path: str, image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS, label_key: str = "cls",
               split_key: str | None = "split", options: StorageOptions | None = None) -> ShardScan:
    """Read one shard's samples from its tar headers, without decoding any image.

    Parameters
    ----------
    path : str
        Local path or URL of a plain ``.tar`` shard.
    image_keys : sequence of str
        Image member extensions, preferred first (``data.image_keys``).
    label_key : str
        A member extension (``cls``) or a field of the sample's ``json`` that
        holds the label or regression target (``data.label_key``).
    split_key : str or None
        Likewise for a split the samples carry (``train``/``val``/``test``).
    options : StorageOptions, optional
        Timeout, tries and fsspec options; a transient error rescans the shard.

    Returns
    -------
    ShardScan
        A shard that ends early (truncated, a damaged header) is returned with its ``problem`` and the ``cut``
        sample set: :func:`~featcache.extract.inputs.sharded.from_shards` warns, knowing which samples are rows.

    Raises
    ------
    ShardReadError
        The shard cannot be read (missing, failing after every try, or on a
        server that ignores Range requests), or is empty or not a tar archive
        at all: its member list, and so its samples, are unknown. An
        ``OSError`` and a ``UserError``.
    """
    options = options or StorageOptions()
    keys = tuple(k.lower() for k in image_keys)
    for attempt in range(1, options.tries + 1):
        try:
            scan = _scan_once(path, keys, label_key.lower(), split_key.lower() if split_key else None, options)
        except Exception as error:  # noqa: BLE001 - each fsspec backend raises its own error types
            if not (is_transient(error) or isinstance(error, (OSError, ValueError)) or is_storage_error(error)):
                raise  # a bug, not a storage failure
            if is_transient(error) and attempt < options.tries:
                delay = options.backoff * 2 ** (attempt - 1)
                logger.info("rereading shard %s in %.1f s (try %d of %d): %s", shard_name(path), delay,
                            attempt + 1, options.tries, describe_failure(error, attempt, options))
                time.sleep(delay)
                continue
            if _NO_RANGES in str(error):
                raise ShardReadError(
                    f"Shard {path!r} cannot be read: its server ignores HTTP Range requests (it answers with the "
                    "whole object), which featcache needs: prepare reads a shard in blocks, and extract reads each "
                    "image member by byte range. Hint: serve the shards with a server that supports Range requests "
                    "(nginx, Apache, an object store; not `python -m http.server`), or copy them to a local folder "
                    "and point data.path at it.") from error
            reason = describe_failure(error, attempt if is_transient(error) else 1, options,
                                      "http" if is_url(path) else "")
            raise ShardReadError(f"Shard {path!r} cannot be read: {reason}. Its member list is needed to list its "
                                 "samples. Hint: check data.path (and data.io for remote shards).") from error
        if scan.size == 0 or (scan.problem and not scan.samples):  # nothing of it is a tar: a failed download?
            what = "an empty file (0 bytes)" if scan.size == 0 else \
                f"not a tar archive ({scan.problem}; {scan.size:,} bytes)"
            raise ShardReadError(f"Shard {path!r} is {what}: none of its samples can be listed (a failed download, "
                                 "or an error page saved under the shard's name?). Hint: download the shard again, "
                                 "or leave it out of data.path.")
        if not scan.problem and not scan.samples:
            logger.warning("Shard %s is a tar archive without samples (no member named <key>.<ext>): it adds no "
                           "rows", path)
        return scan
    raise AssertionError("unreachable")  # pragma: no cover
