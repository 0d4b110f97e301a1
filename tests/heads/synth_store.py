"""Moved to ``tests/_support/blob_store.py`` (re-exported while other branches still import it; delete after merge)."""

from _support.blob_store import LAYER, make_blobs, peak_rss, split_codes, write_store  # noqa: F401
