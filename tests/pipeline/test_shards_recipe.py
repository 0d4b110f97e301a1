"""README "Millions of images", step by step, in a fresh git + DVC repo with the project's real files.

1. WebDataset shards (written by webdataset's ``TarWriter``) copied into
   ``data/shards``, ``dvc add``-ed, ``params.yaml`` pointed at them, ``dvc
   repro``; then one more shard, ``dvc add`` again, and ``dvc repro`` reruns
   exactly prepare -> extract -> train -> compare, after which ``dvc status``
   is clean.
2. A CSV of image URLs (a loopback HTTP server, 127.0.0.1) in ``data/urls``,
   ``dvc add``-ed, ``dvc repro``: one URL answers 404 and is reported by id.

Kept small: one backbone with random weights at an early layer, one cheap head.
"""

from __future__ import annotations

import shutil

import h5py
import pytest
import yaml

from _support.shards import LoopbackServer, shards_from_folder

from .test_dvc import REPO, _run, _stages_run, new_project

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _readme_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split("## Millions of images", 1)[1].split("\n## ", 1)[0]


def _small(params: dict) -> None:
    """Fast settings, not part of the recipe: random weights, an early layer, one cheap head."""
    params["extract"]["backend"] = "torch"
    params["extract_run"].update(batch_size=16, num_workers=0, block_rows=16)
    params["backbones"] = {"efficientnet_lite0": {"weights": "random", "layers": ["block2"]}}
    params["features"] = [{"backbone": "efficientnet_lite0", "layer": "block2"}]
    params["train"].update(heads=["logreg"], n_boot=10)
    params["heads"]["logreg"].update(Cs=[1.0], refine=False)


def test_readme_states_the_recipes_these_tests_run():
    recipe = _readme_section()
    for step in ("cp -r ~/my_shards data/shards", "dvc add data/shards", "data.source: webdataset",
                 "data.path: data/shards", "dvc repro", "prepare -> extract -> train -> compare", "dvc status",
                 "cp ~/urls.csv data/urls/labels.csv", "dvc add data/urls", "data.source: csv",
                 "data.path: data/urls", "test_shards_recipe.py"):
        assert step in recipe, step


@pytest.fixture(scope="module")
def shards_project(tmp_path_factory, folder_factory) -> dict:
    root = new_project(tmp_path_factory.mktemp("shardsrecipe"))
    images = folder_factory(tmp_path_factory.mktemp("images"), per_class=5)
    mine = tmp_path_factory.mktemp("my_shards")
    shards_from_folder(images, mine, per_shard=6)                              # ~/my_shards: 000000.tar ...
    extra = sorted(mine.glob("*.tar"))[-1]
    held_back = tmp_path_factory.mktemp("later") / "000099.tar"
    shutil.move(extra, held_back)                                               # a shard added later
    shutil.copytree(mine, root / "data" / "shards")                            # cp -r ~/my_shards data/shards
    _run(["dvc", "add", "data/shards"], root)                                  # dvc add data/shards
    _run(["git", "add", "data/shards.dvc", "data/.gitignore"], root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(name="pets", source="webdataset", path="data/shards")  # the documented edit
    _small(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = _stages_run(_run(["dvc", "repro"], root))                          # dvc repro
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "shards"], root)
    return {"root": root, "first": first, "held_back": held_back}


def test_first_repro_runs_the_pipeline_on_the_added_shards(shards_project):
    root = shards_project["root"]
    assert {"prepare", "extract@efficientnet_lite0", "train@feature0-logreg", "compare"} <= shards_project["first"]
    with h5py.File(root / "features" / "pets" / "efficientnet_lite0.h5", "r") as store:
        assert store.attrs["n_rows"] == 12 and "shards" in store.attrs
    assert "Dataset `pets`" in (root / "reports" / "compare.md").read_text()


def test_adding_a_shard_reruns_exactly_the_stages_it_affects(shards_project):
    root = shards_project["root"]
    shutil.copy(shards_project["held_back"], root / "data" / "shards" / "000099.tar")
    _run(["dvc", "add", "data/shards"], root)
    stages = _stages_run(_run(["dvc", "repro"], root))
    # the one run, retrained on the new rows, is the selected one: its model changed, so the export reruns too
    assert stages == {"prepare", "extract@efficientnet_lite0", "train@feature0-logreg", "compare", "export"}
    assert "Data and pipelines are up to date." in _run(["dvc", "status"], root)
    with h5py.File(root / "features" / "pets" / "efficientnet_lite0.h5", "r") as store:
        assert store.attrs["n_rows"] == 15


def test_a_csv_of_urls_runs_with_the_404_reported(tmp_path_factory, folder_factory):
    root = new_project(tmp_path_factory.mktemp("urlrecipe"))
    served = folder_factory(tmp_path_factory.mktemp("served"), per_class=5)
    with LoopbackServer(served) as server:
        rows = [f"{server.url}{p.relative_to(served).as_posix()},{p.parent.name}"
                for p in sorted(served.rglob("*.png"))]
        rows.append(f"{server.url}red/gone.png,red")
        (root / "data" / "urls").mkdir(parents=True)                              # mkdir -p data/urls
        (root / "data" / "urls" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        _run(["dvc", "add", "data/urls"], root)                                    # dvc add data/urls
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["data"].update(name="web", source="csv", path="data/urls")         # the documented edit
        _small(params)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        stages = _stages_run(_run(["dvc", "repro"], root))                         # dvc repro
    assert {"prepare", "extract@efficientnet_lite0", "compare"} <= stages
    with h5py.File(root / "features" / "web" / "efficientnet_lite0.h5", "r") as store:
        errors = [(i.decode(), r.decode()) for i, r in store["errors"][()]]
        assert store.attrs["n_rows"] == 15
    assert errors == [(f"{server.url}red/gone.png", "missing object (404 not found)")]
