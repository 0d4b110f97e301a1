"""Strict params: every mistake fails before any work, naming key, value and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from featcache.pipeline.config import load_params, parse_params
from featcache.pipeline.params.base import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert "efficientnet_lite0" in params.backbones
    assert {(f.backbone, f.layer) for f in params.features} == {("efficientnet_lite0", "pool"),
                                                                   ("efficientnet_lite0", "block6")}


def test_defaults_fill_features_from_backbones():
    params = parse_params({"backbones": {"resnet18": {"weights": "random", "layers": ["pool5", "res4"]}}})
    assert [(f.backbone, f.layer) for f in params.features] == [("resnet18", "pool5"), ("resnet18", "res4")]


def test_a_fused_feature_of_extracted_layers_passes():
    params = parse_params({"backbones": {"efficientnet_lite0": {"layers": ["pool", "block6"]}},
                           "features": [{"backbone": "efficientnet_lite0", "layer": "pool+block6"},
                                        {"backbone": "efficientnet_lite0", "layer": "block6+pool"}]})
    assert [f.layer for f in params.features] == ["pool+block6", "block6+pool"]


@pytest.mark.parametrize("layer, expected", [
    ("pool+blok6", ["features[0].layer 'pool+blok6' fuses ['blok6'], not extracted for 'efficientnet_lite0' "
                    "(backbones.efficientnet_lite0.layers = ['pool', 'block6']). Did you mean 'block6'? Hint: add",
                    "layers of different backbones are not fused"]),
    ("pool+res4", ["fuses ['res4']", "['pool', 'block6']"]),  # a layer of another backbone
    ("pool+", ["features[0].layer 'pool+' has an empty part; allowed: ", "Hint: remove the stray '+'"]),
    ("pool+pool", ["features[0].layer 'pool+pool' names ['pool'] more than once", "Hint: list each layer once"]),
])
def test_a_fused_feature_names_its_missing_or_bad_part(layer, expected):
    with pytest.raises(ConfigError) as info:
        parse_params({"backbones": {"efficientnet_lite0": {"layers": ["pool", "block6"]},
                                    "resnet18": {"layers": ["res4"]}},
                      "features": [{"backbone": "efficientnet_lite0", "layer": layer}]})
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_a_fused_name_among_a_backbones_layers_is_refused_with_the_features_hint():
    """Extraction would look for a node called 'pool+block6' and fail late, naming no fix."""
    with pytest.raises(ConfigError) as info:
        parse_params({"backbones": {"efficientnet_lite0": {"layers": ["pool+block6"]}}})
    message = str(info.value)
    assert "backbones.efficientnet_lite0.layers" in message and "'pool+block6' is a fused layer name" in message
    assert "Hint: extract ['pool', 'block6'] here and fuse them under features:" in message, message


@pytest.mark.parametrize("raw, expected", [
    ({"extract": {"batchsize": 8}}, ["extract.batchsize", "batch_size"]),
    ({"data": {"sourc": "folder"}}, ["data.sourc", "source"]),
    ({"trian": {}}, ["trian", "train"]),
    ({"backbones": {"efficientnet_lite0": {"layer": ["pool"]}}}, ["layer", "layers"]),
])
def test_unknown_key_names_it_and_the_close_match(raw, expected):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    for text in expected:
        assert text in str(info.value)


@pytest.mark.parametrize("raw, expected", [
    ({"extract": {"pooling": "mean"}}, ["extract.pooling", "'mean'", "avg"]),
    ({"extract": {"batch_size": 0}}, ["extract.batch_size", "0"]),
    ({"extract": {"batch_size": "big"}}, ["extract.batch_size", "big"]),
    ({"data": {"task": "segmentation"}}, ["data.task", "classification", "regression"]),
    ({"data": {"split": {"train": 0.5, "val": 0.2, "test": 0.2}}}, ["sum to 1", "0.9"]),
    ({"backbones": {"resnet1000": {}}}, ["resnet1000", "resnet50", "Allowed"]),
    ({"backbones": {"vgg16": {"layers": ["fc9"]}}}, ["fc9", "fc7", "vgg16"]),
    ({"features": [{"backbone": "resnet18", "layer": "pool5"}]}, ["features[0].backbone", "resnet18"]),
    ({"features": [{"backbone": "efficientnet_lite0", "layer": "head"}]}, ["features[0].layer", "'head'", "pool"]),
    ({"heads": {"logreg": {"C_grid": [1]}}}, ["C_grid", "logreg", "Cs"]),
    ({"heads": {"svm": {}}}, ["svm", "logreg", "lightgbm", "mlp"]),
    ({"train": {"heads": ["logreg", "xgboost"]}}, ["train.heads", "xgboost"]),
])
def test_bad_values_are_named_with_the_allowed_ones(raw, expected):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    for text in expected:
        assert text in str(info.value), str(info.value)


@pytest.mark.parametrize("raw, line", [
    ({"heads": {"logreg": {"max_itr": 5}}}, "- heads.logreg: unknown parameter 'max_itr' for head 'logreg'"),
    ({"heads": {"lgbm": {"n_jobs": 1}}}, "- heads.lgbm: unknown head 'lgbm'"),
    ({"features": [{"backbone": "resnet18", "layer": "pool5"}]}, "- features[0].backbone 'resnet18'"),
    ({"heads": {"lightgbm": {"learning_rate": "fast"}}},
     "- heads.lightgbm.learning_rate: 'fast' is not a float; allowed: a finite number > 0 (default 0.1)."),
    ({"heads": {"logreg": {"max_iter": -5}}}, "- heads.logreg.max_iter: -5 is out of range; allowed: an integer >= 1"),
    ({"heads": {"mlp": {"dropout": 1}}}, "- heads.mlp.dropout: 1 is out of range; allowed: a number in [0, 1)"),
    ({"heads": {"lightgbm": {"n_estimators": None}}}, "- heads.lightgbm.n_estimators: null is not allowed"),
    ({"heads": {"mlp": {"hidden_sizes": 512}}}, "- heads.mlp.hidden_sizes: 512 is not a list of integers"),
    ({"data": {"task": "regression", "source": "csv"}, "heads": {"logreg": {"alphas": "0.1"}}},
     "- heads.logreg.alphas: '0.1' is not a list of numbers"),
    ({"heads": {"mlp": {"hidden_sizes": [512, 0]}}},
     "- heads.mlp.hidden_sizes[1]: 0 is out of range; allowed: an integer >= 1. Hint: "),
    ({"heads": {"lightgbm": {"pca_components": 0}}}, "- heads.lightgbm.pca_components: 0 is out of range; allowed: an "
                                                    "integer >= 1 or a number in (0, 1) or null (default null)."),
])
def test_a_whole_file_check_names_the_key_where_the_line_starts(raw, line):
    """A cross-section check's line starts with the key in params.yaml (``heads.logreg``), not ``params:``."""
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert any(text.startswith(line) for text in str(info.value).splitlines()), str(info.value)


@pytest.mark.parametrize(("task", "bad", "line", "good"), [
    ("regression", {"Cs": [0.1, 0]}, "- heads.logreg.Cs[1]: 0 is out of range; allowed: a finite number > 0.",
     {"Cs": [0.1, 1]}),
    ("regression", {"max_iter": 0}, "- heads.logreg.max_iter: 0 is out of range", {"max_iter": 50}),
    ("classification", {"alphas": []}, "- heads.logreg.alphas: [] is empty", {"alphas": [10]}),
])
def test_a_key_only_the_other_tasks_twin_takes_is_checked_against_that_twin(task, bad, line, good):
    """One ``heads.logreg`` section serves the logistic regression and its ridge twin: ``Cs`` is not used under
    regression, but a bad value there is refused now, not when the task changes (after the extraction)."""
    data = {"task": task, "source": "folder" if task == "classification" else "csv"}
    with pytest.raises(ConfigError) as info:
        parse_params({"data": data, "heads": {"logreg": bad}})
    assert any(text.startswith(line) for text in str(info.value).splitlines()), str(info.value)
    parse_params({"data": data, "heads": {"logreg": good}})


@pytest.mark.parametrize("raw", [
    {"backbones": {"efficientnet_lite0": {"weights": "pretrianed"}}},
    {"finetune": {"weights": "Pretrained"}},
])
def test_a_misspelt_weights_word_fails_the_check(raw):
    """``featcache check`` refuses ``weights: pretrianed`` (else only the extract stage finds it, as a missing file)."""
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert "weights" in str(info.value) and "Did you mean 'pretrained'?" in str(info.value), str(info.value)


@pytest.mark.parametrize("weights", ["random", "pretrained", "weights/ft.pth", "model.safetensors", "/no/such/dir/x"])
def test_weights_paths_are_left_to_the_extractor(weights):
    assert parse_params({"backbones": {"resnet18": {"weights": weights}}}).backbones["resnet18"].weights == weights


def test_missing_params_file_says_where(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    from featcache.pipeline.cli import main

    (tmp_path / "params.yaml").write_text("extract:\n  poolin: avg\n")
    assert main(["check", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "extract.poolin" in err and "pooling" in err and "Traceback" not in err


def test_the_schema_defaults_are_the_shipped_params():
    """A key left out of params.yaml means what the shipped params.yaml says (``auto``, not another default)."""
    import yaml

    from featcache.pipeline.params.extract import ExtractParams

    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text(encoding="utf-8"))
    defaults = ExtractParams().model_dump()
    knobs = {**shipped["extract"], **shipped["extract_run"]}
    differ = {key: (defaults[key], value) for key, value in knobs.items() if defaults[key] != value}
    assert not differ, f"extract defaults (code, params.yaml) differ: {differ}"


def test_each_stage_validates_only_the_sections_it_reads(tmp_path):
    """A typo in a head's section stops train and check, not prepare or extract (which never read it)."""
    import yaml

    from featcache.pipeline.finetune import load_finetune_sections
    from featcache.pipeline.params.backbones import load_extract_sections
    from featcache.pipeline.prepare import load_prepare_sections
    from featcache.pipeline.train import load_train_sections

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"heads": {"mlp": {"hiden_sizes": [8]}}, "finetune": {"epochz": 1}}))
    assert load_prepare_sections(path).data.name == "digits"
    assert list(load_extract_sections(path).backbones) == ["efficientnet_lite0"]
    with pytest.raises(ConfigError, match="hiden_sizes"):
        load_train_sections(path)
    with pytest.raises(ConfigError, match="epochz"):
        load_finetune_sections(path)
    with pytest.raises(ConfigError, match="epochz"):  # check validates every section
        load_params(path)
    # The sections a stage reads are still strict, and a typo in extract stops the train stage too.
    path.write_text(yaml.safe_dump({"extract": {"poolin": "max"}}))
    for load in (load_extract_sections, load_train_sections, load_params):
        with pytest.raises(ConfigError, match="unknown key 'extract.poolin'.*pooling"):
            load(path)
    assert load_prepare_sections(path).data.name == "digits"


def test_the_shipped_head_values_pass_for_both_tasks():
    """Every value of the shipped ``heads`` section has its head's type and is in range, for either task."""
    import yaml

    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text(encoding="utf-8"))
    for task in ("classification", "regression"):
        source = "folder" if task == "classification" else "csv"  # class folders carry no regression target
        params = parse_params({**shipped, "data": {**shipped["data"], "task": task, "source": source}})
        assert params.heads == shipped["heads"]


def test_check_refuses_a_bad_head_value_before_any_stage_runs_importing_no_head_library(tmp_path):
    """``featcache check`` (the first stage; no DVC here) stops on ``learning_rate: fast`` in a fresh interpreter
    that imports no scikit-learn, lightgbm or torch."""
    import os
    import subprocess
    import sys
    import textwrap

    (tmp_path / "params.yaml").write_text("heads:\n  lightgbm:\n    learning_rate: fast\n", encoding="utf-8")
    probe = textwrap.dedent("""
        import sys
        from featcache.pipeline.cli import main
        code = main(["check", "--params", "params.yaml"])
        print("HEAVY", sorted(m for m in ("sklearn", "lightgbm", "torch") if m in sys.modules))
        sys.exit(code)
        """)
    import featcache

    env = dict(os.environ, PYTHONPATH=str(Path(featcache.__file__).resolve().parents[1]))  # the code under test
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "heads.lightgbm.learning_rate: 'fast' is not a float" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_a_sections_own_check_is_not_followed_by_the_whole_section():
    """``finetune.defaults: unknown setting 'lrr' ...`` names the key; the section's 20 values after it were noise.
    A type error of a mapping given where a list belongs still shows what was given."""
    with pytest.raises(ConfigError) as info:
        parse_params({"finetune": {"defaults": {"lrr": 0.1, "epochs": 2}}})
    line = next(text for text in str(info.value).splitlines() if text.startswith("- finetune.defaults:"))
    assert "'lrr'" in line and "(got {" not in line, line
    with pytest.raises(ConfigError, match=r"layers: Input should be a valid list \(got \{'a': 1\}\)"):
        parse_params({"backbones": {"efficientnet_lite0": {"layers": {"a": 1}}}})


@pytest.mark.parametrize("raw, line", [
    ({"train": None}, "- train: a section (a mapping of keys) expected, got None. Hint: a key with nothing under it "
                      "is null in YAML: remove the line, or write `train: {}` for the defaults."),
    ({"heads": None}, "- heads: a section (a mapping of keys) expected, got None. Hint: "),
    ({"backbones": {"resnet18": None}}, "- backbones.resnet18: a section (a mapping of keys) expected, got None. "
                                        "Hint: a key with nothing under it is null in YAML: remove the line, or write "
                                        "`resnet18: {}` for the defaults."),
    ({"train": "abc"}, "- train: a section (a mapping of keys) expected, got 'abc'. Hint: indent its keys under "
                       "`train:`, one `name: value` a line."),
])
def test_a_section_that_is_no_mapping_says_so_in_yaml_words(raw, line):
    """``train:`` with nothing under it (YAML null), not pydantic's 'valid dictionary or instance of TrainParams'."""
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert line in str(info.value) and "instance of" not in str(info.value)


def test_a_fine_tuning_setting_directly_under_finetune_says_where_it_goes():
    with pytest.raises(ConfigError, match=r"unknown key 'finetune\.epochs'\. 'epochs' is a fine-tuning setting: put "
                                          r"it under finetune\.defaults \(every mode\) or finetune\.modes\.<mode> "
                                          r"\(one mode\)\. Allowed keys here: backbone"):
        parse_params({"finetune": {"epochs": 3}})
    with pytest.raises(ConfigError) as info:
        parse_params({"finetune": {"bogus": 3}})
    assert "fine-tuning setting" not in str(info.value)
