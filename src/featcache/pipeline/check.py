"""``check`` stage: the whole params file validated, with what only a DVC project needs, before any other stage.

The other stages track only the keys they read, so a mistyped key none of them tracks would pass ``dvc repro``
unseen; this stage reads the whole file (``featcache check``, under a second, no model) and fails naming the key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["check"]

logger = logging.getLogger(__name__)


def _check_head_sections(path: str, heads: Sequence[str], sections: Mapping[str, object]) -> None:
    """Refuse a ``train.heads`` entry without its ``heads.<name>`` section when a ``dvc.yaml`` beside ``path``
    tracks ``heads.${item.head}``: DVC would stop on it naming only the key (the CLI and API need no section)."""
    missing = [name for name in heads if name not in sections]
    if not missing:
        return
    try:
        tracked = "heads.${item.head}" in (Path(path).parent / "dvc.yaml").read_text(encoding="utf-8")
    except OSError:
        tracked = False
    if tracked:
        from featcache.pipeline.params.base import ConfigError

        raise ConfigError(
            f"{path}: train.heads lists {missing} without a section under heads: (it has "
            f"{', '.join(sorted(sections)) or 'none'}); the train stages of dvc.yaml track heads.<head>, so `dvc "
            f"repro` stops on {', '.join(f'heads.{name}' for name in missing)}. Hint: add "
            f"{', '.join(f'`{name}: {{}}`' for name in missing)} under heads: ({{}}: the head's defaults).")


def _check_metric_key(path: str, train: Mapping[str, object]) -> None:
    """Refuse a params file without ``train.metric`` when a ``dvc.yaml`` beside it tracks the key: DVC would stop on
    it naming only the key (the CLI and API default it to null)."""
    try:
        tracked = "train.metric" in (Path(path).parent / "dvc.yaml").read_text(encoding="utf-8")
    except OSError:
        tracked = False
    if tracked and "metric" not in train:
        from featcache.pipeline.params.base import ConfigError

        raise ConfigError(
            f"{path}: train has no metric key; the train and compare stages of dvc.yaml track train.metric, so `dvc "
            "repro` stops on it. Hint: add `metric: null` under train: (null: each head selects as by default and "
            "compare ranks by accuracy, or rmse).")


def check(path: str | Path) -> str:
    """Validate the params file ``path`` as every stage reads it; the summary line (``params.yaml: OK (...)``).

    Beyond the strict parse (:func:`~featcache.pipeline.config.parse_params`: a mistyped key fails naming it and
    its close match), a ``dvc.yaml`` beside the file makes two keys required (each ``train.heads`` entry's
    ``heads.<name>`` section, and ``train.metric``), which its stages track; speed-only keys set under ``extract``
    (tracked by the extract stages) are warned about.

    Raises
    ------
    ConfigError
        Naming the bad key or value, what is allowed, and a hint.
    """
    from featcache.pipeline.config import parse_params
    from featcache.pipeline.params.base import read_params_file
    from featcache.pipeline.params.extract import RUN_SECTION, speed_keys_under_extract

    path = str(path)
    raw = read_params_file(path)
    params = parse_params(raw)
    summary = (f"{path}: OK ({len(params.backbones)} backbone(s), {len(params.features)} feature set(s), "
               f"heads {params.train.heads})")
    _check_head_sections(path, params.train.heads, params.heads)
    _check_metric_key(path, raw.get("train") or {})
    tracked = speed_keys_under_extract(raw)
    if tracked:
        logger.warning("%s sets %s under extract: they change how fast features are made, never their values, but "
                       "the extract stages track extract, so editing them reruns the extraction under dvc repro. "
                       "Hint: move them under %s (same meaning), where an edit reruns nothing.", path,
                       ", ".join(tracked), RUN_SECTION)
    return summary
