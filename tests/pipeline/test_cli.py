"""The ``featcache`` command line: listings and clear errors (exit status 2, no traceback)."""

from __future__ import annotations

import importlib
import os

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
