"""README "Using your own images", step by step, in a fresh git + DVC repo with the project's real files.

Copy a folder of images into ``data/``, ``dvc add`` it, point ``params.yaml`` at
it, ``dvc repro``; then change one image, ``dvc add`` again, and ``dvc repro``
reruns exactly prepare -> extract -> train -> compare, after which ``dvc status``
is clean. Kept small: one backbone with random weights at an early layer, one
cheap head, a dozen images.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from .test_dvc import REPO, _run, _stages_run, new_project

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _readme_recipe() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split("## Using your own images", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory, folder_factory) -> dict:
    root = new_project(tmp_path_factory.mktemp("ownimages"))
    mine = folder_factory(tmp_path_factory.mktemp("my_images"), per_class=4)  # ~/my_images
    shutil.copytree(mine, root / "data" / "pets")                           # cp -r ~/my_images data/pets
    added = _run(["dvc", "add", "data/pets"], root)                         # dvc add data/pets
    _run(["git", "add", "data/pets.dvc", "data/.gitignore"], root)          # git sees the .dvc file
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(name="pets", path="data/pets")                   # the documented edit
    # Small and fast: random weights, an early layer, one cheap head (not part of the recipe).
    params["extract"]["backend"] = "torch"
    params["extract_run"].update(batch_size=16, num_workers=0, block_rows=16)
    params["backbones"] = {"efficientnet_lite0": {"weights": "random", "layers": ["block2"]}}
    params["features"] = [{"backbone": "efficientnet_lite0", "layer": "block2"}]
    params["train"].update(heads=["logreg"], n_boot=10)
    params["heads"]["logreg"].update(Cs=[1.0], refine=False)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = _stages_run(_run(["dvc", "repro"], root))                       # dvc repro
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "pets"], root)
    return {"root": root, "added": added, "first": first}


def test_readme_states_the_recipe_this_test_runs():
    recipe = _readme_recipe()
    for step in ("cp -r ~/my_images data/pets", "dvc add data/pets", "data.name: pets", "data.path: data/pets",
                 "dvc repro", "prepare -> extract -> train -> compare", "dvc status"):
        assert step in recipe, step


def test_dvc_add_of_a_folder_in_data_is_not_git_ignored(pets):
    root = pets["root"]
    assert (root / "data" / "pets.dvc").is_file()
    tracked = _run(["git", "ls-files"], root).split()
    assert "data/pets.dvc" in tracked and "data/.gitignore" in tracked
    assert not any(path.startswith("data/pets/") for path in tracked)  # the images themselves are DVC's


def test_first_repro_runs_the_pipeline_on_the_added_folder(pets):
    assert {"prepare", "extract@efficientnet_lite0", "train@feature0-logreg", "compare"} <= pets["first"]
    report = (pets["root"] / "reports" / "compare.md").read_text()
    assert "Dataset `pets`" in report and "| block2 | logreg |" in report


def test_changing_one_image_reruns_exactly_the_stages_it_affects(pets):
    root = pets["root"]
    image = root / "data" / "pets" / "red" / "000.png"
    Image.fromarray(np.full((24, 24, 3), 7, dtype=np.uint8)).save(image)
    _run(["dvc", "add", "data/pets"], root)
    stages = _stages_run(_run(["dvc", "repro"], root))
    assert stages == {"prepare", "extract@efficientnet_lite0", "train@feature0-logreg", "compare"}
    assert "Data and pipelines are up to date." in _run(["dvc", "status"], root)
