"""The ``data`` section: where the images come from, the task, and how rows are split."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from featcache.pipeline.params.base import Strict
from featcache.store.schema import TASKS

__all__ = ["DataParams", "IOParams", "SplitRatios"]


class SplitRatios(Strict):
    """Fractions of rows per split (must sum to 1; ``val`` may be 0)."""

    train: float = Field(0.6, gt=0, le=1)
    val: float = Field(0.2, ge=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitRatios":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            unset = [name for name in ("train", "val", "test") if name not in self.model_fields_set]
            defaults = (f"; {', '.join(f'{name}: {getattr(self, name):g}' for name in unset)} "
                        f"{'is its default' if len(unset) == 1 else 'are their defaults'}, not set" if unset else "")
            raise ValueError(f"split ratios train+val+test must sum to 1, got {total:g} "
                             f"({self.train:g}+{self.val:g}+{self.test:g}{defaults}). Hint: set all three, e.g. "
                             "{train: 0.6, val: 0.2, test: 0.2} (val may be 0)")
        return self


class IOParams(Strict):
    """How remote shards and images (fsspec URLs) are read; changes how fast, never what.

    The keys are those of ``featcache.extract.inputs.storage.StorageOptions``: ``StorageOptions(**io.model_dump())``.
    """

    #: Seconds one request may take.
    timeout: float = Field(30.0, gt=0)
    #: Attempts per request on transient errors (HTTP 5xx/429, timeouts, resets); 1 never retries.
    tries: int = Field(3, ge=1, le=20)
    #: Seconds before the second attempt, doubled before each further one.
    backoff: float = Field(0.5, ge=0)
    #: Extra ``fsspec.filesystem`` arguments, for every protocol or by protocol (``{s3: {anon: true}}``).
    options: dict[str, Any] = Field(default_factory=dict)


class DataParams(Strict):
    """Where the images come from and how they are split."""

    name: str = Field("digits", pattern=r"^[A-Za-z0-9_.-]+$")
    #: folder: <path>/<class>/<image> | csv: <path>/<csv> | webdataset: tar shards (a folder, a brace
    #: pattern such as shards/{000000..000127}.tar, a URL, or a list of these)
    source: Literal["folder", "csv", "webdataset"] = "folder"
    path: str | list[str] = "data/digits"
    csv: str = "labels.csv"
    #: webdataset: the image member's extensions, preferred first
    image_keys: list[str] = Field(["jpg", "jpeg", "png", "webp"], min_length=1)
    #: webdataset: the member (``cls``) or ``json`` field holding the label, or the target for regression
    label_key: str = Field("cls", min_length=1)
    #: webdataset: the member or ``json`` field holding a split the samples carry (null: always data.split)
    split_key: str | None = "split"
    io: IOParams = IOParams()
    task: Literal[TASKS] = "classification"  # type: ignore[valid-type]
    split: SplitRatios = SplitRatios()
    seed: int = 0
    #: Explicit class list; its order defines the label indices. Labels outside it, and listed classes
    #: without images, are errors. None: every non-empty class folder / CSV label, sorted.
    classes: list[str] | None = Field(None, min_length=1)

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        stripped = [name.strip() for name in value]
        if any(not name for name in stripped):
            raise ValueError(f"data.classes has an empty class name: {value}")
        dupes = sorted({name for name in stripped if stripped.count(name) > 1})
        if dupes:
            raise ValueError(f"data.classes lists {dupes} more than once: {value}")
        return stripped

    @model_validator(mode="after")
    def _list_path_needs_webdataset(self) -> "DataParams":
        if isinstance(self.path, list) and self.source != "webdataset":
            raise ValueError(f"data.path is a list, which only data.source: webdataset takes (a list of shards); "
                             f"data.source is {self.source!r}")
        return self

    @model_validator(mode="after")
    def _classes_need_classification(self) -> "DataParams":
        if self.classes is not None and self.task != "classification":
            raise ValueError(f"data.classes is only for classification (data.task is {self.task!r}); remove it")
        return self

    @model_validator(mode="after")
    def _folder_is_classification(self) -> "DataParams":
        if self.source == "folder" and self.task != "classification":
            raise ValueError(f"data.source: folder labels each image by its class folder, so it takes data.task: "
                             f"classification, not {self.task!r}. Hint: for regression give a CSV with path,target "
                             "columns (data.source: csv, data.csv) or shards with a target (data.source: webdataset)")
        return self
