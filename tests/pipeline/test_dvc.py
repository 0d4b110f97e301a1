"""The real ``dvc.yaml`` in a scratch git repo: repro, no-op rerun, data change, ``dvc exp run -S``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory: pytest.TempPathFactory, folder_factory, params_factory) -> Path:
    root = tmp_path_factory.mktemp("dvcproj")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    # Stage deps name the package sources by repo path: give the scratch repo the same tree.
    shutil.copytree(REPO / "src" / "featcache", root / "src" / "featcache",
                    ignore=shutil.ignore_patterns("__pycache__"))
    folder_factory(root / "data" / "tiny", per_class=8)
    params = params_factory("data/tiny")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # the bar_ci template
    return root


def test_repro_runs_every_stage_then_nothing(dvc_project: Path):
    first = _run(["dvc", "repro"], dvc_project)
    stages = _stages_run(first)
    assert {"digits", "prepare", "extract@efficientnet_lite0", "compare"} <= stages
    assert sum(name.startswith("train@") for name in stages) == 6
    table = (dvc_project / "reports" / "compare.md").read_text()
    assert table.count("| efficientnet_lite0 |") == 6
    _run(["dvc", "plots", "show", "-o", "plots_html"], dvc_project)
    html = (dvc_project / "plots_html" / "index.html").read_text()
    assert "errorbar" in html and "ci_high" in html  # the comparison bar chart carries its CIs
    second = _run(["dvc", "repro"], dvc_project)
    assert _stages_run(second) == set()
    assert "up to date" in _run(["dvc", "status"], dvc_project)


def test_changing_one_image_reruns_prepare_extract_and_downstream(dvc_project: Path):
    image = dvc_project / "data" / "tiny" / "red" / "000.png"
    Image.fromarray(np.full((24, 24, 3), 7, dtype=np.uint8)).save(image)
    stages = _stages_run(_run(["dvc", "repro"], dvc_project))
    assert {"prepare", "extract@efficientnet_lite0"} <= stages
    assert "digits" not in stages


def test_exp_run_on_a_head_param_reruns_only_that_head(dvc_project: Path):
    _run(["dvc", "repro"], dvc_project)
    _run(["git", "add", "-A"], dvc_project)
    _run(["git", "commit", "-qm", "baseline"], dvc_project)
    output = _run(["dvc", "exp", "run", "-S", "heads.logreg.refine=true"], dvc_project)
    stages = _stages_run(output)
    assert stages, output
    assert all(name.endswith("-logreg") or name == "compare" for name in stages), stages
    assert sum(name.endswith("-logreg") for name in stages) == 2
    assert "compare" in stages
