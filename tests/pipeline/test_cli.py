"""The ``featcache`` command line: listings and clear errors (exit status 2, no traceback)."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from featcache.extract.zoo.registry import BACKBONES
from featcache.pipeline.cli import main


def test_backbones_lists_every_registry_entry(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name, spec in BACKBONES.items():
        assert name in out and str(spec.layers[spec.default_layer].dim) in out


@pytest.mark.parametrize("name", list(BACKBONES))
def test_layers_lists_aliases_dims_and_default(name, capsys):
    assert main(["layers", name]) == 0
    out = capsys.readouterr().out
    spec = BACKBONES[name]
    for alias, layer in spec.layers.items():
        assert alias in out and layer.node in out
    assert "(default)" in out


def test_layers_nodes_lists_raw_graph_nodes(capsys):
    assert main(["layers", "alexnet", "--nodes"]) == 0
    assert "classifier.4" in capsys.readouterr().out


def test_unknown_backbone_fails_with_the_list(capsys):
    assert main(["layers", "resnet51"]) == 2
    err = capsys.readouterr().err
    assert "resnet51" in err and "resnet50" in err and "Did you mean" in err


def test_missing_weights_fail_with_instructions(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = tmp_path / "params.yaml"
    params.write_text("backbones:\n  resnet18: {weights: pretrained}\n")
    (tmp_path / "manifest.csv").write_text("id,path,split,label,target\na,a.png,train,x,\n")
    code = main(["extract", "--params", str(params), "--backbone", "resnet18",
                 "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "f.h5")])
    err = capsys.readouterr().err
    assert code == 2
    assert "resnet18-f37072fd.pth" in err and str(tmp_path / "torch" / "hub" / "checkpoints") in err
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("command", [["check"], ["prepare", "--out", "prepared"]])
def test_a_yaml_syntax_error_names_the_file_line_and_problem(command, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  batch_size: [64\n", encoding="utf-8")
    assert main([*command, "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"featcache {command[0]}: error: Params file {str(params)!r} is not valid YAML")
    assert "line 3, column 1" in err and "expected ',' or ']'" in err and "line 2, column 15" in err
    assert "Traceback" not in err


def test_a_tab_in_the_params_file_is_a_clear_error(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n\tbatch_size: 64\n", encoding="utf-8")
    assert main(["check", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "line 2, column 1" in err and "'\\t'" in err and "no tabs" in err


def test_an_unknown_head_fails_before_reading_the_store(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("backbones:\n  efficientnet_lite0: {weights: random}\n", encoding="utf-8")
    code = main(["train", "--params", str(params), "--store", str(tmp_path / "missing.h5"), "--backbone",
                 "efficientnet_lite0", "--layer", "pool", "--head", "lgbm", "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("featcache train: error: unknown head 'lgbm'; allowed: logreg, lightgbm")
    assert "Did you mean 'lightgbm'?" in err


@pytest.mark.parametrize("command", [["extract", "--manifest", "manifest.csv", "--out", "f.h5"],
                                     ["train", "--store", "f.h5", "--layer", "pool", "--head", "logreg",
                                      "--metrics", "m.json"],
                                     ["export-onnx", "--out", "m.onnx"]], ids=lambda command: command[0])
def test_a_backbone_missing_from_params_is_a_clear_error(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("backbones:\n  efficientnet_lite0: {weights: random}\n", encoding="utf-8")
    (tmp_path / "manifest.csv").write_text("id,path,split,label,target\na,a.png,train,x,\n", encoding="utf-8")
    assert main([*command, "--backbone", "efficientnet_lite1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"featcache {command[0]}: error: Backbone 'efficientnet_lite1' is not configured in "
                          "params.backbones (configured: efficientnet_lite0). Did you mean 'efficientnet_lite0'?")
    assert "under backbones:" in err and "Traceback" not in err


@pytest.mark.parametrize(("head", "section", "message"), [
    ("lightgbm", "{learning_rate: fast}", "heads.lightgbm.learning_rate: 'fast' is not a float; allowed: a finite "
                                          "number > 0 (default 0.1)."),
    ("mlp", "{hidden_sizes: 512}", "heads.mlp.hidden_sizes: 512 is not a list of integers"),
    ("logreg", "{max_iter: 0}", "heads.logreg.max_iter: 0 is out of range; allowed: an integer >= 1 (default 1000)."),
])
def test_a_bad_head_hyper_parameter_is_a_clear_error(head, section, message, tmp_path, monkeypatch, capsys):
    """The train stage refuses the value when it reads params.yaml, before loading any features or fitting."""
    from _support.blob_store import write_store

    train_stage = importlib.import_module("featcache.pipeline.train")  # the module: the package exports train()

    store = write_store(tmp_path / "f.h5", n=100, dim=8, n_classes=3)
    # The synthetic store records no extraction config: take it as the current params'.
    monkeypatch.setattr(train_stage, "expected_store_config", lambda params, backbone, store: store.config)
    params = tmp_path / "params.yaml"
    params.write_text(f"backbones:\n  efficientnet_lite0: {{weights: random}}\nheads:\n  {head}: {section}\n",
                      encoding="utf-8")
    code = main(["train", "--params", str(params), "--store", str(store), "--backbone", "efficientnet_lite0",
                 "--layer", "pool", "--head", head, "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"featcache train: error: Invalid params:\n- {message}"), err


def test_predict_with_a_folder_that_is_no_run_is_a_clear_error(tmp_path, capsys):
    code = main(["predict", "--model", str(tmp_path / "models"), "--store", str(tmp_path / "f.h5"),
                 "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"featcache predict: error: {tmp_path / 'models' / 'featcache-run.json'} not found: ")
    assert "is not a featcache run directory. Hint:" in err


@pytest.mark.parametrize(("args", "message"), [
    ([], "one of the arguments --store --images is required"),
    (["--store", "f.h5", "--images", "a.png"], "argument --images: not allowed with argument --store"),
    (["--images", "a.png", "--batch-size", "0"], "argument --batch-size: '0' is invalid; allowed: an integer >= 1"),
    (["--images", "a.png", "--batch-size", "many"], "argument --batch-size: 'many' is invalid"),
])
def test_predict_argument_mistakes_exit_2_with_the_standard_line(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--model", "models/x", "--out", "p.csv", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"featcache predict: error: {message}" in err and "Traceback" not in err


def test_version_prints_the_package_version(capsys):
    import re
    from pathlib import Path

    import featcache

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"featcache {featcache.__version__}"
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE).group(1) == featcache.__version__


def test_every_option_of_every_command_has_a_help_text():
    import argparse

    from featcache.pipeline.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    missing = [f"{name} {action.dest}" for name, sub in [("featcache", parser), *commands.choices.items()]
               for action in sub._actions if action.help is None and not isinstance(action, argparse._HelpAction)]
    assert not missing


def test_an_unknown_layer_names_the_layer_then_the_backbone(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("backbones:\n  efficientnet_lite0: {weights: pretrained, layers: [blok6]}\n", encoding="utf-8")
    assert main(["check", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "Unknown layer 'blok6' for backbone 'efficientnet_lite0'. Did you mean 'block6'? Allowed: stem," in err


def test_predict_device_cuda_without_cuda_names_the_flag(tmp_path, monkeypatch, capsys):
    import numpy as np
    import torch
    from PIL import Image

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    code = main(["predict", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "a.png"),
                 "--device", "cuda", "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("featcache predict: error: --device is 'cuda' but no CUDA device is visible.")


def test_predict_help_describes_the_output_and_the_inputs(capsys):
    """Was: one line per option; nothing on the CSV's columns, globs, or what --device auto picks."""
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # whatever width argparse wrapped to
    assert stop.value.code == 0
    for text in ("same backbone, weights,", "output CSV columns: id, [split, actual (--store)], prediction",
                 "--images 'new/*.jpg'", "--store features/digits/efficientnet_lite0.h5 --split test",
                 "hidden files skipped", "--model DIR", "auto: the CPU for a store extracted by onnxruntime"):
        assert text in out, text


def test_check_refuses_a_head_without_the_section_dvc_tracks(tmp_path, capsys):
    # dvc.yaml's train stages track heads.<head>: without the section DVC stops naming only the key, so the
    # check stage (which runs first) says which section to add; without a dvc.yaml no section is needed.
    params = tmp_path / "params.yaml"
    params.write_text("train: {heads: [logreg, sgd]}\nheads: {logreg: {max_iter: 100}}\n", encoding="utf-8")
    assert main(["check", "--params", str(params)]) == 0
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    params:\n      - heads.${item.head}\n")
    assert main(["check", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "train.heads lists ['sgd'] without a section under heads: (it has logreg)" in err, err
    assert "Hint: add `sgd: {}` under heads:" in err, err
    params.write_text("train: {heads: [logreg, sgd]}\nheads: {logreg: {}, sgd: {}}\n", encoding="utf-8")
    assert main(["check", "--params", str(params)]) == 0


@pytest.mark.parametrize("verbose", [False, True])
def test_a_dask_run_logs_featcache_not_the_clusters_life(verbose, tmp_path):
    """A dask extraction (extract_run.scheduler) imports distributed, which sets its loggers to INFO: the
    scheduler's and nannies' 38 lines a run ('Register worker', 'Lost all workers', ...) buried the progress
    lines of a `dvc repro` log. The CLI shows only its warnings; `featcache -v` shows everything."""
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("data: {name: x}\n")
    code = ("import logging, sys\nfrom featcache.pipeline.cli import main\n"
            f"assert main({['-v'] * verbose + ['check', '--params', str(tmp_path / 'params.yaml')]!r}) == 0\n"
            "import distributed\nlogging.getLogger('distributed.scheduler').info('cluster chatter')\n"
            "logging.getLogger('distributed.scheduler').warning('cluster trouble')\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DASK_")}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stderr
    assert "cluster trouble" in err
    assert ("cluster chatter" in err) == verbose


def test_verbose_is_featcaches_debug_not_every_librarys(tmp_path):
    """`featcache -v extract` logged PIL's DEBUG lines, two per PNG decoded (7,174 of a 7,226-line log for 1,797
    digits): -v shows featcache's DEBUG lines and other libraries' INFO lines, not their DEBUG."""
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("data: {name: x}\n")
    code = ("import logging\nfrom featcache.pipeline.cli import main\n"
            f"assert main({['-v', 'check', '--params', str(tmp_path / 'params.yaml')]!r}) == 0\n"
            "logging.getLogger('featcache.extract.engine').debug('our detail')\n"
            "logging.getLogger('PIL.PngImagePlugin').debug('png chunk')\n"
            "logging.getLogger('PIL.PngImagePlugin').info('png news')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "our detail" in err and "png news" in err and "png chunk" not in err


def test_ctrl_c_is_one_line_and_exit_130_not_a_traceback(monkeypatch, capsys):
    import featcache.pipeline.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_digits", interrupted)
    assert main(["digits", "unused"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("featcache digits: interrupted.") and "Traceback" not in err


@pytest.mark.parametrize(("command", "resumes"), [("extract", True), ("finetune", False)])
def test_the_ctrl_c_hint_promises_a_resume_only_where_the_command_resumes(monkeypatch, capsys, command, resumes):
    """An interrupted fine-tuning starts over: its Ctrl-C line said that an extraction resumes from its blocks."""
    import featcache.pipeline.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"_cmd_{command}", interrupted)
    argv = {"extract": ["extract", "--backbone", "b", "--manifest", "m", "--out", "o"],
            "finetune": ["finetune", "--mode", "frozen", "--manifest", "m", "--out", "o", "--metrics", "x"]}[command]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"featcache {command}: interrupted. Hint: rerun it (or `dvc repro`)") and err.count("\n") == 1
    assert ("resumes from the blocks it had committed" in err) == resumes, err


# ------------------------------------------------------------ extract: an up-to-date store is kept
@pytest.fixture(scope="module")
def finished_store(tmp_path_factory, folder_factory, params_factory):
    """A prepared tiny folder, its params (torch, 16-row blocks) and one finished store of them."""
    import yaml

    from featcache.pipeline.config import parse_params
    from featcache.pipeline.extract import extract
    from featcache.pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("uptodate")
    folder_factory(root / "images", per_class=8)
    raw = params_factory(str(root / "images"))
    raw["extract_run"].update(block_rows=8, num_workers=0)
    raw["backbones"] = {"efficientnet_lite0": {"weights": "pretrained", "layers": ["pool"]}}
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    prepare(parse_params(raw), root / "prepared")
    extract(parse_params(raw), "efficientnet_lite0", root / "prepared" / "manifest.csv", root / "done.h5",
            progress=False)
    return {"root": root, "raw": raw, "store": root / "done.h5"}


def _store_copy(finished_store, tmp_path):
    import shutil

    out = tmp_path / "f.h5"
    shutil.copy2(finished_store["store"], out)
    return out


def _extract_cli(finished_store, out, *extra, params=None, manifest=None) -> list[str]:
    root = finished_store["root"]
    return ["extract", "--params", str(params or root / "params.yaml"), "--backbone", "efficientnet_lite0",
            "--manifest", str(manifest or root / "prepared" / "manifest.csv"), "--out", str(out), "--no-progress",
            *extra]


def _no_model(monkeypatch):
    """Building a runner (the backbone, its weights, an ONNX export) fails: an up-to-date run never gets there."""
    import featcache.extract.plan as plan

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(plan, "build_runner", refuse)


def _log(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def test_extract_keeps_a_finished_store_of_the_same_inputs(finished_store, tmp_path, monkeypatch, capsys, caplog):
    """A rerun of the same command (a script, a notebook cell) rebuilt the finished store from scratch: it is
    kept (same inode and mtime), without building the model, saying so in one line and in the CLI's print."""
    import logging

    out = _store_copy(finished_store, tmp_path)
    before = os.stat(out)
    _no_model(monkeypatch)
    with caplog.at_level(logging.INFO):
        assert main(_extract_cli(finished_store, out)) == 0
    after = os.stat(out)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert f"{out} is up to date (24 rows, same config and manifest); --force rebuilds it" in _log(caplog)
    assert capsys.readouterr().out.strip() == f"{out}: up to date: 24 rows, 0 skipped; --force rebuilds it"
    assert not any(p.name.endswith((".parts", ".lock", ".partial")) for p in tmp_path.iterdir())


def test_an_up_to_date_store_names_the_blocks_an_unfinished_rebuild_left(finished_store, tmp_path, monkeypatch,
                                                                          caplog):
    """A --force rebuild interrupted, then the command rerun without --force: the finished store is kept, and the
    committed blocks of the rebuild (disk space) are named with what to do, not left unseen."""
    import logging

    from featcache.store.writer import parts_root

    out = _store_copy(finished_store, tmp_path)
    blocks = parts_root(out) / "0123456789abcdef"
    blocks.mkdir(parents=True)
    (blocks / "block-00000.npz").write_bytes(b"")
    _no_model(monkeypatch)
    with caplog.at_level(logging.INFO):
        assert main(_extract_cli(finished_store, out)) == 0
    assert f"{parts_root(out)} holds the committed blocks of an unfinished rebuild of {out}, which is kept as up " \
           "to date: --force resumes that rebuild from them" in _log(caplog)


def test_extract_rebuilds_a_store_of_another_config_naming_the_change(finished_store, tmp_path, caplog):
    import logging

    import h5py
    import yaml

    from featcache.store import FeatureStore

    out = _store_copy(finished_store, tmp_path)
    raw = {**finished_store["raw"], "extract": {**finished_store["raw"]["extract"], "dtype": "float32"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        assert main(_extract_cli(finished_store, out, params=tmp_path / "params.yaml")) == 0
    assert f"Rebuilding {out}: it was made from other inputs: config extract.dtype: store has 'float16', " \
           "params say 'float32'" in _log(caplog)
    with FeatureStore(out) as store:
        assert store.config["extract"]["dtype"] == "float32"
    with h5py.File(out, "r") as f:
        assert f["features/pool"].dtype == "float32"


def test_extract_rebuilds_a_store_of_another_manifest(finished_store, tmp_path, caplog):
    """One label changed in the manifest: the ids and paths are the same, the store is not."""
    import logging

    from featcache.store import FeatureStore

    out = _store_copy(finished_store, tmp_path)
    lines = (finished_store["root"] / "prepared" / "manifest.csv").read_text(encoding="utf-8").splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    label = header.index("label")
    relabelled = next(line.split(",")[label] for line in lines[2:] if line.split(",")[label] != first[label])
    row_id, first[label] = first[header.index("id")], relabelled
    manifest = finished_store["root"] / "relabelled" / "manifest.csv"  # its relative paths name the same images
    manifest.parent.mkdir()
    manifest.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        assert main(_extract_cli(finished_store, out, manifest=manifest)) == 0
    assert f"Rebuilding {out}: it was made from other inputs: manifest_sha256: store has '" in _log(caplog)
    with FeatureStore(out) as store:
        labels = dict(zip(store.ids().tolist(), store.labels().tolist()))
        assert store.classes[labels[row_id]] == relabelled


def test_extract_force_rebuilds_an_up_to_date_store(finished_store, tmp_path, capsys, caplog):
    import logging

    out = _store_copy(finished_store, tmp_path)
    before = os.stat(out)
    with caplog.at_level(logging.INFO):
        assert main(_extract_cli(finished_store, out, "--force")) == 0
    assert f"Rebuilding {out} (--force)" in _log(caplog)
    assert os.stat(out).st_ino != before.st_ino  # a new file renamed into place
    assert capsys.readouterr().out.strip().startswith(f"{out}: 24 rows written, 0 skipped, ")
    with open(out, "rb") as new, open(finished_store["store"], "rb") as old:
        assert new.read() == old.read()  # the same bytes again


def test_extract_rebuilds_a_store_that_is_not_complete(finished_store, tmp_path, caplog):
    import logging

    import h5py

    out = _store_copy(finished_store, tmp_path)
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    with caplog.at_level(logging.INFO):
        assert main(_extract_cli(finished_store, out)) == 0
    assert f"Rebuilding {out}: it cannot be kept (incomplete store {out} (complete=False)" in _log(caplog)
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"]


def test_an_interrupted_rebuild_of_other_inputs_resumes(finished_store, tmp_path, monkeypatch, caplog):
    """The finished store is of config A; a run of config B committed every block, then failed to write the final
    file: the rerun of B resumes from its blocks (it does not keep A's store, and does not start over)."""
    import logging

    import yaml

    from featcache.store.writer import StoreWriter

    out = _store_copy(finished_store, tmp_path)
    raw = {**finished_store["raw"], "extract": {**finished_store["raw"]["extract"], "resize_mode": "squash"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    args = _extract_cli(finished_store, out, params=tmp_path / "params.yaml")
    finalize = StoreWriter.finalize

    def full_disk(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(StoreWriter, "finalize", full_disk)
    with pytest.raises(OSError, match="disk full"):
        main(args)
    monkeypatch.setattr(StoreWriter, "finalize", finalize)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    log = _log(caplog)
    assert f"Rebuilding {out}: it was made from other inputs: config extract.resize_mode: store has 'crop'" in log
    assert "all 3 blocks (24 rows) already committed; nothing left to extract" in log


def test_extract_rebuilds_a_store_with_rows_a_server_failed(finished_store, tmp_path, caplog):
    """Rows skipped for a transient cause (a timeout, HTTP 503) are no bad images: the warning says to extract
    again to read them, so a store holding such rows is not kept as up to date."""
    import logging

    import h5py

    out = _store_copy(finished_store, tmp_path)
    with h5py.File(out, "r+") as f:
        table = f["errors"][()]
        dtype = f["errors"].dtype
        del f["errors"]
        failed = np.empty(1, dtype=dtype)
        failed[0] = ("red/000.png", "timeout after 3 tries (30 s each)")
        f.create_dataset("errors", data=np.concatenate([table, failed]), dtype=dtype)
    with caplog.at_level(logging.INFO):
        assert main(_extract_cli(finished_store, out)) == 0
    assert f"Rebuilding {out}: 1 of its skipped rows failed a read for a transient cause (e.g. red/000.png)" \
           in _log(caplog)
    with h5py.File(out, "r") as f:
        assert f["errors"].shape == (0,)
