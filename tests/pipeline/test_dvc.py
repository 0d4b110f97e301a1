"""The real ``dvc.yaml`` in a scratch git repo: repro, no-op rerun, data change, ``dvc exp run -S``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from .conftest import shipped_backend

REPO = Path(__file__).resolve().parents[2]

# DVC needs git (dvc init, dvc exp): a machine without it fails here rather than skipping the DVC tests.
assert shutil.which("git") is not None, "git is not on PATH; the DVC pipeline and these tests need it"


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def new_project(root: Path) -> Path:
    """A fresh git + DVC repo holding the project's own pipeline files (as a clone would)."""
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    # Stage deps name the package sources by repo path: give the scratch repo the same tree.
    shutil.copytree(REPO / "src" / "featcache", root / "src" / "featcache",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    # The chart templates (ci_points, paired_delta, <data.task>).
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    # The optional fine-tuning pipeline, a DVC subrepo (its own .dvc/), as committed.
    shutil.copytree(REPO / "finetune", root / "finetune", symlinks=True,
                    ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    return root


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory: pytest.TempPathFactory, folder_factory, params_factory) -> Path:
    root = new_project(tmp_path_factory.mktemp("dvcproj"))
    folder_factory(root / "data" / "tiny", per_class=8)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(params_factory("data/tiny"))  # fast knobs; the finetune section stays as shipped
    params["extract"]["backend"] = shipped_backend()  # the backend a user of the shipped params.yaml runs
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def test_repro_runs_every_stage_then_nothing(dvc_project: Path):
    first = _run(["dvc", "repro"], dvc_project)
    stages = _stages_run(first)
    assert {"digits", "prepare", "extract@efficientnet_lite0", "compare", "export"} <= stages
    assert sum(name.startswith("train@") for name in stages) == 6
    selected = json.loads((dvc_project / "reports" / "compare.json").read_text())["selection"]["run"]
    served = dvc_project / "exports" / "tiny" / "model.onnx"  # the selected run, as the model artifact declares
    assert served.is_file() and f"{selected.split('/')[-1]} (classification)" in _run(
        [sys.executable, "-c", f"import onnx; print(onnx.load({str(served)!r}).doc_string)"], dvc_project)
    artifacts = yaml.safe_load((dvc_project / "dvc.yaml").read_text())["artifacts"]
    assert artifacts["selected-model"]["path"] == "exports/${data.name}/model.onnx"
    table = (dvc_project / "reports" / "compare.md").read_text()
    assert table.count("| efficientnet_lite0 |") == 6
    shown = _run(["dvc", "plots", "show", "-o", "plots_html"], dvc_project)
    assert "failed to load" not in shown.lower(), shown  # the fine-tune pipeline's plots are not collected
    html = (dvc_project / "plots_html" / "index.html").read_text()
    assert "ci_high" in html and "metric_title" in html  # the comparison chart: CIs, axis named by the metric
    assert "simultaneous_low" in html  # the paired chart: each run's Δ vs the best, the CI "distinguishable" reads
    second = _run(["dvc", "repro"], dvc_project)
    assert _stages_run(second) == set()
    # The optional fine-tune pipeline (never run here) does not make the main one look out of date.
    assert (dvc_project / "finetune" / "dvc.yaml").is_file()
    assert _run(["dvc", "status"], dvc_project).strip() == "Data and pipelines are up to date."


def test_metrics_hold_numbers_only_and_git_keeps_them(dvc_project: Path):
    def leaves(tree):
        return [leaf for value in tree.values() for leaf in (leaves(value) if isinstance(value, dict) else [value])]

    files = sorted((dvc_project / "metrics").rglob("*.json"))
    metrics = [path for path in files if not path.name.endswith(".run.json")]
    assert len(metrics) == 6 and len(files) == 12  # one sidecar per run
    for path in metrics:
        values = leaves(json.loads(path.read_text()))
        assert values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), path
    outputs = ["metrics/tiny/efficientnet_lite0/pool/logreg.json", "reports/compare.md",
               "plots/compare/tiny.csv", "plots/compare/tiny.paired.csv",
               "plots/predictions/tiny/efficientnet_lite0/pool/logreg.csv"]
    ignored = subprocess.run(["git", "check-ignore", *outputs], cwd=dvc_project, capture_output=True, text=True)
    assert ignored.stdout == "", f"git ignores cache: false outputs: {ignored.stdout}"


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
    output = _run(["dvc", "exp", "run", "-S", "heads.logreg.Cs=[0.0001]"], dvc_project)
    stages = _stages_run(output)
    assert stages, output
    assert all(name.endswith("-logreg") or name in ("check", "compare", "export") for name in stages), stages
    assert sum(name.endswith("-logreg") for name in stages) == 2
    assert "compare" in stages
    # `dvc metrics diff` compares the workspace with the last commit: numeric deltas for the changed runs.
    diff = json.loads(_run(["dvc", "metrics", "diff", "HEAD", "--json"], dvc_project))
    for layer in ("pool", "block6"):
        changed = diff[f"metrics/tiny/efficientnet_lite0/{layer}/logreg.json"]
        log_loss = changed[f"efficientnet_lite0.{layer}.logreg.log_loss"]
        assert isinstance(log_loss["diff"], float) and log_loss["diff"] != 0, changed
    # `dvc exp show` columns read <backbone>.<layer>.<head>.<score>, not file paths.
    header = _run(["dvc", "exp", "show", "--csv", "--only-changed"], dvc_project).splitlines()[0].split(",")
    assert "efficientnet_lite0.pool.logreg.log_loss" in header, header
    assert not any(column.endswith(".json:accuracy") for column in header), header


def test_a_mistyped_key_that_no_stage_reads_fails_repro(dvc_project: Path):
    """``train.nboot`` is tracked by no train stage (they list ``train.n_boot``): the check stage refuses it."""
    _run(["dvc", "repro"], dvc_project)
    params = dvc_project / "params.yaml"
    shipped = params.read_text()
    raw = yaml.safe_load(shipped)
    raw["train"]["nboot"] = 5
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        result = subprocess.run(["dvc", "repro"], cwd=dvc_project, capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                                           f"{os.environ['PATH']}"))
    finally:
        params.write_text(shipped)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "unknown key 'train.nboot'. Did you mean 'n_boot'?" in output, output
    assert "Traceback" not in output, output
    assert _stages_run(_run(["dvc", "repro"], dvc_project)) <= {"check"}  # the restored file: nothing else reruns


#: A setting per head that can only lower its val score (it cannot take the selection from another run).
_WORSE = {"lightgbm": "heads.lightgbm.n_estimators=1",  # (logreg: the experiment test before sets its Cs)
          "mlp": "heads.mlp.max_epochs=1"}


def test_an_experiment_on_another_head_does_not_rerun_the_export(dvc_project: Path):
    """The export stage depends on compare.json's ``selection`` (the run and its model's sha256), not on every run:
    an experiment on a head that is not selected reruns that head's train stages and compare, and DVC skips the
    export. Was: it depended on the whole models folder and re-exported (~5 s) after any head's experiment."""
    _run(["dvc", "repro"], dvc_project)
    _run(["git", "add", "-A"], dvc_project)
    _run(["git", "commit", "-qm", "baseline"], dvc_project)
    selection = json.loads((dvc_project / "reports" / "compare.json").read_text())["selection"]
    assert len(selection["model_sha256"]) == 64
    other = next(head for head in _WORSE if head != selection["head"])
    output = _run(["dvc", "exp", "run", "--temp", "-S", _WORSE[other]], dvc_project)  # the workspace stays as is
    stages = _stages_run(output)
    assert f"train@feature0-{other}" in stages and "compare" in stages, output
    assert "export" not in stages and "Stage 'export' didn't change" in output, output


def test_a_speed_knob_edit_reruns_no_extraction_a_content_edit_does(dvc_project: Path):
    """``extract_run`` (batch size, workers, ...) is tracked by no extract stage: only ``check`` runs."""
    _run(["dvc", "repro"], dvc_project)
    params = dvc_project / "params.yaml"
    shipped = params.read_text()
    raw = yaml.safe_load(shipped)
    try:
        raw["extract_run"].update(batch_size=8, block_rows=8)
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert _changed_stages(dvc_project) == {"check"}
        assert _stages_run(_run(["dvc", "repro"], dvc_project)) == {"check"}
        raw["extract"]["dtype"] = "float32"  # what the features are: the extraction is out of date
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert _changed_stages(dvc_project) == {"check", "extract@efficientnet_lite0"}
    finally:
        params.write_text(shipped)
    assert _stages_run(_run(["dvc", "repro"], dvc_project)) <= {"check"}


def _edit_source(project: Path, relative: str) -> Path:
    """Append a comment to one copied source file (a change that alters no behaviour); returns the file."""
    path = project / "src" / "featcache" / relative
    path.write_text(path.read_text(encoding="utf-8") + "\n# an edit that changes no behaviour\n", encoding="utf-8")
    return path


def _changed_stages(project: Path) -> set[str]:
    return set(json.loads(_run(["dvc", "status", "--json"], project)))


def test_a_head_edit_reruns_only_train_compare_and_export(dvc_project: Path):
    _run(["dvc", "repro"], dvc_project)
    assert _changed_stages(dvc_project) == set()
    _edit_source(dvc_project, "heads/mlp.py")
    changed = _changed_stages(dvc_project)
    # extract, prepare up to date; the export stage writes a head's graph, so it runs the head's code too
    assert changed and all(name.startswith("train@") or name == "export" for name in changed), changed
    stages = _stages_run(_run(["dvc", "repro"], dvc_project))
    assert stages and all(name.startswith("train@") or name in ("compare", "export") for name in stages), stages


def test_an_extractor_edit_reruns_extract_and_nothing_after(dvc_project: Path):
    """The features come out byte-identical, so DVC stops after the extract stage."""
    _run(["dvc", "repro"], dvc_project)
    _edit_source(dvc_project, "extract/engine.py")
    assert _changed_stages(dvc_project) == {"extract@efficientnet_lite0"}
    assert _stages_run(_run(["dvc", "repro"], dvc_project)) == {"extract@efficientnet_lite0"}
    assert _changed_stages(dvc_project) == set()


def test_an_export_setting_edit_reruns_the_export_not_the_training(dvc_project: Path):
    """``finetune.cam_images`` and ``finetune.export_onnx`` were params of ``finetune@<mode>``: an edit retrained."""
    _run(["dvc", "repro"], dvc_project)  # data/prepared/tiny, which the fine-tuning project reads
    params, finetune = dvc_project / "params.yaml", dvc_project / "finetune"
    shipped = params.read_text()
    raw = yaml.safe_load(shipped)
    raw["finetune"].update(export_onnx=False, cam_images=1, modes={"frozen": {}})
    raw["finetune"]["defaults"].update(input_size=32, batch_size=8, epochs=1, max_train_steps=1)
    cams = finetune / "exports" / "tiny" / "frozen" / "cam"
    try:
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert _stages_run(_run(["dvc", "repro", "export@frozen"], finetune)) == {"finetune@frozen", "export@frozen"}
        assert len(list(cams.glob("*.png"))) == 1
        raw["finetune"]["cam_images"] = 2
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert _stages_run(_run(["dvc", "repro", "export@frozen"], finetune)) == {"export@frozen"}
        assert len(list(cams.glob("*.png"))) == 2
        raw["finetune"]["export_onnx"] = True
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert set(json.loads(_run(["dvc", "status", "--json", "export@frozen"], finetune))) == {"export@frozen"}
    finally:
        params.write_text(shipped)


def test_repro_trains_a_fused_layer_under_its_plus_named_paths(tmp_path_factory, folder_factory, params_factory):
    """``features: [{layer: pool+block6}]``: the train stage's paths hold a '+', which DVC runs, tracks and reports
    as any layer (was: the check stage failed, "features[0].layer 'pool+block6' is not extracted")."""
    root = new_project(tmp_path_factory.mktemp("dvcfused"))
    folder_factory(root / "data" / "tiny", per_class=8)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(params_factory("data/tiny"))
    params["extract"]["backend"] = shipped_backend()
    params["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool+block6"}]
    params["train"]["heads"] = ["logreg"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    trained = [name for name in _stages_run(_run(["dvc", "repro"], root)) if name.startswith("train@")]
    assert len(trained) == 1, trained
    run = json.loads((root / "metrics" / "tiny" / "efficientnet_lite0" / "pool+block6" / "logreg.run.json").read_text())
    assert run["layer"] == "pool+block6" and run["n_features"] == 1280 + 192, run
    assert (root / "models" / "tiny" / "efficientnet_lite0" / "pool+block6" / "logreg" / "featcache-run.json").is_file()
    assert (root / "plots" / "predictions" / "tiny" / "efficientnet_lite0" / "pool+block6" / "logreg.csv").is_file()
    assert "| efficientnet_lite0 | pool+block6 |" in (root / "reports" / "compare.md").read_text()
    assert _stages_run(_run(["dvc", "repro"], root)) == set()
