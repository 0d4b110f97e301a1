"""The stage functions take params however a Python user has them: validated, a params file's path, or a mapping.

``prepare("params.yaml", out)`` and ``train({...}, ...)`` failed with an AttributeError ('str' object has no
attribute 'data'); a path is now read and a mapping validated as the stage's own sections (unknown keys named).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from featcache.pipeline import extract, load_params, parse_params, prepare, train
from featcache.pipeline.params.base import ConfigError, as_sections
from featcache.pipeline.prepare import PrepareSections


@pytest.fixture
def project(tmp_path, folder_factory, params_factory) -> tuple[Path, dict]:
    folder_factory(tmp_path / "images", per_class=4)
    raw = params_factory(str(tmp_path / "images"))
    raw["backbones"] = {"resnet18": {"weights": "random", "layers": ["pool5"]}}
    raw["features"] = [{"backbone": "resnet18", "layer": "pool5"}]
    raw["extract_run"].update(batch_size=4, block_rows=8, num_workers=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path, raw


def test_a_params_path_a_mapping_and_validated_params_give_the_same_stage_outputs(project):
    root, raw = project
    outs = {}
    for form, params in {"path": root / "params.yaml", "str": str(root / "params.yaml"), "mapping": raw,
                         "validated": load_params(root / "params.yaml")}.items():
        prepare(params, root / form)
        outs[form] = (root / form / "manifest.csv").read_bytes()
    assert len(set(outs.values())) == 1, outs.keys()
    report = extract(str(root / "params.yaml"), "resnet18", root / "path" / "manifest.csv", root / "f.h5",
                     progress=False)
    assert report.n_written == 12
    scores = [train(params, root / "f.h5", "resnet18", "pool5", "logreg", root / form / "m.json")["accuracy"]
              for form, params in {"p": root / "params.yaml", "m": raw, "v": load_params(root / "params.yaml")}.items()]
    assert len(set(scores)) == 1


def test_as_sections_reads_validates_or_passes_through(project):
    root, raw = project
    params = parse_params(raw)
    assert as_sections(params, PrepareSections) is params
    assert as_sections(root / "params.yaml", PrepareSections).data == params.data
    with pytest.raises(ConfigError, match=r"unknown key 'data.split.tarin'.*Did you mean 'train'"):
        as_sections({**raw, "data": {**raw["data"], "split": {"tarin": 0.6, "val": 0.2, "test": 0.2}}},
                    PrepareSections)
    with pytest.raises(ConfigError, match="not found"):
        prepare(root / "nope.yaml", root / "out")
