"""The ``featcache`` command line: one subcommand per stage plus registry listings.

Every stage command reads ``--params`` (default ``params.yaml``), validates it
strictly before any work, and takes its input and output paths as arguments
(``dvc.yaml`` passes them), so the same commands run under ``dvc repro`` or by hand.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from featcache import __version__
from featcache.errors import UserError

__all__ = ["OutputPathError", "main", "build_parser"]

logger = logging.getLogger("featcache")

#: What an interrupted command keeps for its rerun, where it keeps something (the end of the Ctrl-C line's hint).
_KEPT_ON_INTERRUPT = {"extract": "; an extraction resumes from the blocks it had committed"}


class OutputPathError(UserError, OSError):
    """An output path a command cannot write: in a read-only folder, under a file, or a folder where a file
    goes (or the reverse). Checked before any work, so nothing is half written."""


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``.`` for a relative path whose folders are all new)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _check_output(option: str, value: str, kind: str) -> None:
    """Refuse an output path ``value`` of ``option`` (a ``file`` or a ``folder``) that cannot be written.

    Raises
    ------
    OutputPathError
        Naming the option, the path, what is in the way and a hint.
    """
    path = Path(value)
    hint = f"Hint: give {option} a path in a folder you can write to (folders are created as needed)."
    if path.is_dir() and kind == "file":
        raise OutputPathError(f"{option} {value!r} is a folder; allowed: a file path. Hint: name a file, in that "
                              "folder or elsewhere (folders are created as needed).")
    if path.exists() and not path.is_dir() and kind == "folder":
        raise OutputPathError(f"{option} {value!r} is a file; allowed: a folder. Hint: name a new or existing "
                              "folder (created as needed); the file is left as it is.")
    existing = _nearest_existing(path if kind == "folder" else path.parent)
    if not existing.is_dir():
        raise OutputPathError(f"{option} {value!r} cannot be created: {existing.as_posix()!r} is a file, not a "
                              f"folder. {hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {value!r} cannot be written: the folder {existing.as_posix()!r} is "
                              f"read-only (a read-only file system, or no write permission). {hint}")


def _check_outputs(args: argparse.Namespace) -> None:
    """Check every output path the command was given (its ``outputs``: option -> file or folder) up front."""
    for option, kind in getattr(args, "outputs", {}).items():
        value = getattr(args, option.lstrip("-").replace("-", "_").lower())  # --model-dir: model_dir; OUT: out
        if value is not None:
            _check_output(option, value, kind)


def _cmd_backbones(args: argparse.Namespace) -> None:
    from featcache.extract.zoo.registry import BACKBONES

    print(f"{'backbone':<20} {'input':>5} {'default':<10} {'dim':>5}  weights")
    for spec in BACKBONES.values():
        default = spec.layers[spec.default_layer]
        print(f"{spec.name:<20} {spec.input_size:>5} {spec.default_layer:<10} {default.dim:>5}  {spec.weights}")
    print("\nAny timm model is a backbone too: `model: timm/<name>[.<tag>]` under backbones.<your name> in "
          "params.yaml;\nlist its layers with `featcache layers timm/<name>`.")


def _model_in_params(name: str, path: str | None) -> str | None:
    """``backbones.<name>.model`` of the params file ``path`` (None when not given or not set)."""
    if path is None:
        return None
    from featcache.pipeline.params.base import read_params_file

    entry = ((read_params_file(path) or {}).get("backbones") or {}).get(name)
    return entry.get("model") if isinstance(entry, dict) else None


def _cmd_layers(args: argparse.Namespace) -> None:
    from featcache.extract.zoo.registry import get_backbone

    model = _model_in_params(args.backbone, args.params)
    spec = get_backbone(args.backbone, model)
    print(f"{spec.name}: {spec.description}")
    if spec.num_prefix_tokens:
        print(f"token maps: {spec.num_prefix_tokens} prefix token(s), "
              f"{'token 0 is the class token (pooling: cls)' if spec.class_token else 'no class token'}")
    width = max([22, *(len(layer.node) for layer in spec.layers.values())])
    print(f"{'alias':<14} {'node':<{width}} {'dim':>5}  {'kind':<6} post_relu")
    for alias, layer in spec.layers.items():
        mark = "  (default)" if alias == spec.default_layer else ""
        print(f"{alias:<14} {layer.node:<{width}} {layer.dim:>5}  {layer.kind:<6} {layer.post_relu}{mark}")
    if args.nodes:
        from featcache.extract.runners.torch_runner import graph_node_names
        from featcache.extract.zoo.weights import load_backbone

        net = load_backbone(spec.name, "random", model=model).model
        print("\nRaw graph nodes (usable as layer names):")
        for node in graph_node_names(net, spec):
            print(f"  {node}")


def _cmd_doctor(args: argparse.Namespace) -> None:
    from featcache.extract.doctor import doctor_report

    print("\n".join(doctor_report()))


def _cmd_digits(args: argparse.Namespace) -> None:
    from featcache.extract.inputs.sources import write_digits

    write_digits(args.out)


def _cmd_check(args: argparse.Namespace) -> None:
    from featcache.pipeline.check import check

    print(check(args.params))


def _cmd_cache(args: argparse.Namespace) -> None:
    from featcache.pipeline.cache import cache_folders, format_cache_report, prune_cache, prune_summary

    onnx_cache = None
    if args.params is not None:  # extract_run.onnx_cache: the ONNX cache folder, when not the root's onnx/
        from featcache.extract.onnx.cache import resolve_cache_dir
        from featcache.pipeline.params.backbones import load_extract_sections

        onnx_cache = resolve_cache_dir(load_extract_sections(args.params).extract.onnx_cache)
    if args.prune is not None:
        print(prune_summary(*prune_cache(args.prune, onnx_cache, dry_run=args.dry_run), args.prune, args.dry_run))
    print("\n".join(format_cache_report(cache_folders(onnx_cache))))


def _cmd_prepare(args: argparse.Namespace) -> None:
    from featcache.pipeline.prepare import load_prepare_sections, prepare

    prepare(load_prepare_sections(args.params), args.out)


def _cmd_extract(args: argparse.Namespace) -> None:
    from featcache.pipeline.extract import extract
    from featcache.pipeline.params.backbones import load_extract_sections

    report = extract(load_extract_sections(args.params), args.backbone, args.manifest, args.out,
                     progress=not args.no_progress, force=args.force)
    print(f"{report.path}: {report.summary()}")


def _cmd_train(args: argparse.Namespace) -> None:
    from featcache.pipeline.train import load_train_sections, train

    train(load_train_sections(args.params), args.store, args.backbone, args.layer, args.head, args.metrics,
          model_dir=args.model_dir, predictions_path=args.predictions)


def _cmd_predict(args: argparse.Namespace) -> None:
    from featcache.pipeline.predict import PredictError, predict_images, predict_store, write_predictions

    if args.images and args.split:
        raise PredictError(f"--split {args.split!r} selects rows of a --store; --images scores every image given. "
                           "Hint: drop --split, or give the images of that split only.")
    if args.store:
        rows = predict_store(args.model, args.store, split=args.split)
    else:
        rows = predict_images(args.model, args.images, batch_size=args.batch_size, device=args.device,
                              onnx_cache=args.onnx_cache)
    path = write_predictions(rows, args.out)
    failed = sum(1 for row in rows if row["error"])
    scored = len(rows) - failed
    print(f"{path}: {scored} prediction{'' if scored == 1 else 's'}"
          + (f", {failed} image{'' if failed == 1 else 's'} failed (see the error column)" if failed else ""))


def _cmd_export(args: argparse.Namespace) -> None:
    from featcache.pipeline.serve import export_selected, export_serving_model

    if (args.selected is None) != (args.models is None):  # argparse makes --model and --selected exclusive
        raise UserError("--selected REPORT and --models DIR (models/<dataset>, holding the selected run's folder) go "
                        "together; allowed otherwise: --model alone, the run folder")
    print(export_selected(args.selected, args.models, args.out, onnx_cache=args.onnx_cache) if args.selected
          else export_serving_model(args.model, args.out, onnx_cache=args.onnx_cache))


def _cmd_export_onnx(args: argparse.Namespace) -> None:
    from featcache.pipeline.onnx import export_from_params
    from featcache.pipeline.params.backbones import load_extract_sections

    print(export_from_params(load_extract_sections(args.params), args.backbone, args.out, opset=args.opset))


def _cmd_onnx_parity(args: argparse.Namespace) -> None:
    from featcache.pipeline.onnx import parity_from_params
    from featcache.pipeline.params.backbones import load_extract_sections

    print(parity_from_params(load_extract_sections(args.params), args.backbone, onnx_path=args.onnx,
                             manifest_path=args.manifest, batch_size=args.batch_size, atol=args.atol, rtol=args.rtol,
                             min_cosine=args.min_cosine))


def _cmd_finetune(args: argparse.Namespace) -> None:
    from featcache.pipeline.finetune import export_stage, finetune_stage, load_finetune_sections

    params = load_finetune_sections(args.params)
    metrics = finetune_stage(params, args.mode, args.manifest, args.out, args.metrics,
                             confusion_path=args.confusion, progress=not args.no_progress)
    metric = "accuracy" if metrics["task"] == "classification" else "rmse"
    print(f"{args.metrics}: finetune-{args.mode} test {metric} {metrics[metric]:.4f} "
          f"(TTA {metrics.get('tta_' + metric, float('nan')):.4f}), fit {metrics['fit_seconds']:.1f}s")
    if not args.no_export:  # the DVC project makes them in its export@<mode> stage instead
        _print_exports(export_stage(params, args.out, args.manifest), args.out)


def _cmd_finetune_export(args: argparse.Namespace) -> None:
    from featcache.pipeline.finetune import export_stage, load_finetune_sections

    out = args.out or args.model
    _print_exports(export_stage(load_finetune_sections(args.params), args.model, args.manifest, out), out)


def _print_exports(written: list[Path], folder: str) -> None:
    cams = sum(path.suffix == ".png" for path in written)
    print(f"{folder}: {'model.onnx and ' if len(written) > cams else ''}{cams} CAM overlay{'' if cams == 1 else 's'}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from featcache.pipeline.compare import compare

    metric = args.metric
    if metric is None and args.params is not None:  # train.metric: what the heads selected on
        from featcache.pipeline.params.base import load_sections
        from featcache.pipeline.params.train import TrainSection

        metric = load_sections(TrainSection, args.params).train.metric
    compare(args.metrics_dir, args.out, plot_path=args.plot, metric=metric)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the option and exits with status 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an integer >= 1")
    return value


def _non_negative_float(text: str) -> float:
    """An argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a number of days >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    # Value sets of the choices below, each from its one home; all four modules are torch-free, so --help
    # stays cheap. Imported here, not at module level: they only validate arguments, so they are no
    # stage's dvc deps (tests/pipeline/test_stage_deps.py reads the module level, main and the handler).
    from featcache.finetune.config import MODES
    from featcache.heads.registry import head_names
    from featcache.store.schema import SPLITS
    from featcache.util.compute import DEVICES

    parser = argparse.ArgumentParser(prog="featcache", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="featcache's debug logging (and other libraries' info lines)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; `featcache COMMAND --help` lists its options")

    sub.add_parser("backbones", help="list registered backbones").set_defaults(func=_cmd_backbones)
    layers = sub.add_parser("layers", help="list a backbone's layer aliases and dims (a registry name, "
                            "timm/<model>, or a backbone of --params)")
    layers.add_argument("backbone", help="a registry name (see `featcache backbones`), timm/<model>, or a "
                        "backbone of --params")
    layers.add_argument("--params", help="read backbones.<backbone>.model from this params file")
    layers.add_argument("--nodes", action="store_true", help="also list raw graph node names")
    layers.set_defaults(func=_cmd_layers)

    sub.add_parser("doctor", help="what extraction runs on here (torch/CUDA, onnxruntime, GPU decode) and "
                   "what backend/autocast 'auto' picks, with fixes").set_defaults(func=_cmd_doctor)
    digits = sub.add_parser("digits", help="write the embedded digits dataset as PNG files")
    digits.add_argument("out", help="output folder (one subfolder of PNG files per digit)")
    digits.set_defaults(func=_cmd_digits, outputs={"OUT": "folder"})

    def with_params(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        return p

    with_params(sub.add_parser("check", help="validate params.yaml")).set_defaults(func=_cmd_check)

    prep = with_params(sub.add_parser("prepare", help="build the manifest (ids, labels, splits)"))
    prep.add_argument("--out", required=True, help="output folder (manifest.csv, summary.json)")
    prep.set_defaults(func=_cmd_prepare, outputs={"--out": "folder"})

    ext = with_params(sub.add_parser("extract", help="extract one backbone's layers to HDF5"))
    ext.add_argument("--backbone", required=True, help="a key of backbones: in the params file")
    ext.add_argument("--manifest", required=True, help="manifest.csv of the prepare stage")
    ext.add_argument("--out", required=True, help="output HDF5 feature store (a finished one made from the same "
                     "config, manifest and weights is kept as it is; an interrupted run into it resumes from its "
                     "committed blocks)")
    ext.add_argument("--force", action="store_true", help="rebuild --out even when it is up to date")
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")
    ext.set_defaults(func=_cmd_extract, outputs={"--out": "file"})

    tr = with_params(sub.add_parser("train", help="train and score one head on one layer"))
    tr.add_argument("--store", required=True, help="HDF5 feature store written by extract")
    tr.add_argument("--backbone", required=True, help="the store's backbone (a key of backbones: in the params file)")
    tr.add_argument("--layer", required=True, help="an extracted layer of the store (an alias or a graph node), "
                    "or several joined by '+', side by side (pool+block6)")
    tr.add_argument("--head", required=True, help=f"one of {', '.join(head_names())} "
                    "(hyper-parameters: heads.<head> in the params file)")
    tr.add_argument("--metrics", required=True, help="output metrics JSON (test scores; a .run.json sidecar beside it)")
    tr.add_argument("--model-dir", help="save the fitted head here (for `featcache predict --model`)")
    tr.add_argument("--predictions", help="CSV of test actual,predicted (DVC's confusion or scatter plot, by task)")
    tr.set_defaults(func=_cmd_train,
                    outputs={"--metrics": "file", "--model-dir": "folder", "--predictions": "file"})

    exp = with_params(sub.add_parser("export-onnx", help="export a backbone's layers (pooled) to ONNX"))
    exp.add_argument("--backbone", required=True, help="a key of backbones: in the params file")
    exp.add_argument("--out", required=True, help="output .onnx file")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18)")
    exp.set_defaults(func=_cmd_export_onnx, outputs={"--out": "file"})

    par = with_params(sub.add_parser("onnx-parity", help="compare ONNX and torch outputs on one batch"))
    par.add_argument("--backbone", required=True, help="a key of backbones: in the params file")
    par.add_argument("--onnx", help="exported file (default: export to a temporary file)")
    par.add_argument("--manifest", help="take the batch from these images (default: seeded random input)")
    par.add_argument("--batch-size", type=_positive_int, default=8, help="images in the batch (default: 8)")
    par.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default: 1e-4)")
    par.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default: 1e-3)")
    par.add_argument("--min-cosine", type=float, default=0.9999,
                     help="lowest per-image cosine similarity accepted (default: 0.9999)")
    par.set_defaults(func=_cmd_onnx_parity)

    pred = sub.add_parser(
        "predict", help="score a feature file or new images with a saved head",
        description=textwrap.fill(
            "Score new images (--images) or the rows of a feature store (--store) with a head saved by "
            "`featcache train --model-dir` (the train stage of `dvc repro`). Images are featurised as "
            "the head's features were: same backbone, weights, preprocessing, pooling, runtime (the "
            "store's backend) and storage rounding, so --images gives the predictions --store gives.", 79),
        epilog=textwrap.fill("output CSV columns: id, [split, actual (--store)], prediction, p_<class> per class "
                             "(a classifier), error (empty unless that image could not be read).", 79)
               + "\n\nexamples:\n"
               "  featcache predict --model models/digits/efficientnet_lite0/pool/logreg --images new/ --out p.csv\n"
               "  featcache predict --model models/digits/efficientnet_lite0/pool/logreg --images 'new/*.jpg' "
               "--out p.csv\n"
               "  featcache predict --model models/digits/efficientnet_lite0/pool/logreg \\\n"
               "      --store features/digits/efficientnet_lite0.h5 --split test --out test.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pred.add_argument("--model", required=True, metavar="DIR",
                      help="run folder written by train: models/<dataset>/<backbone>/<layer>/<head> (holds the "
                           "saved head and featcache-run.json)")
    source = pred.add_mutually_exclusive_group(required=True)  # exactly one; argparse exits 2 otherwise
    source.add_argument("--store", metavar="H5", help="an HDF5 feature store to score (any dataset, extracted "
                                                       "like the head's features)")
    source.add_argument("--images", nargs="+", metavar="PATH",
                        help="image files, folders (searched recursively, hidden files skipped), quoted glob "
                             "patterns such as 'new/*.jpg', or URLs")
    pred.add_argument("--split", choices=SPLITS, help="only this split of --store (default: every row)")
    pred.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                      help="images per forward pass with --images (default: 32)")
    pred.add_argument("--device", default="auto", choices=DEVICES,
                      help="where --images are featurised (default: auto: the CPU for a store extracted by "
                           "onnxruntime, OpenVINO or torch on the CPU; else CUDA when available)")
    pred.add_argument("--onnx-cache", default="auto", metavar="DIR",
                      help="ONNX export cache with --images, as extract_run.onnx_cache (default: auto: "
                           "$FEATCACHE_CACHE_DIR/onnx or ~/.cache/featcache/onnx; none: no cache); give the "
                           "extraction's to run an int8 store's very graph")
    pred.add_argument("--out", required=True, metavar="CSV", help="output CSV (folders created as needed)")
    pred.set_defaults(func=_cmd_predict, outputs={"--out": "file"})

    serve = sub.add_parser(
        "export", help="a trained run as one ONNX file for serving (images in, scores out)",
        description=textwrap.fill(
            "Write the run's backbone (weights, layer, pooling, the store's float16 rounding) and head as one ONNX "
            "model: input `images` (B, 3, S, S) float32, normalised as its metadata_props['featcache_model'] says; "
            "outputs `scores` (what `featcache predict --images` gives) and `label` (a classifier's class index).", 79),
        epilog="examples:\n  featcache export --model models/digits/efficientnet_lite0/block6/mlp --out model.onnx\n"
               "  featcache export --selected reports/compare.json --models models/digits --out model.onnx\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run = serve.add_mutually_exclusive_group(required=True)  # exactly one; argparse exits 2 otherwise
    run.add_argument("--model", metavar="DIR", help="a run folder of train: models/<dataset>/<backbone>/<layer>/<head>")
    run.add_argument("--selected", metavar="JSON",
                     help="compare's report (reports/compare.json): export the run it selected, found under --models")
    serve.add_argument("--models", metavar="DIR", help="with --selected: the dataset's models folder, models/<dataset>")
    serve.add_argument("--out", required=True, metavar="ONNX", help="output .onnx file (folders created as needed)")
    serve.add_argument("--onnx-cache", default="auto", metavar="DIR", help="where the backbone's export is looked for "
                       "first, as extract_run.onnx_cache (default: auto; none: export it afresh)")
    serve.set_defaults(func=_cmd_export, outputs={"--out": "file"})

    ft = with_params(sub.add_parser("finetune", help="fine-tune a backbone end to end (the heads' baseline)"))
    ft.add_argument("--mode", required=True, choices=MODES, help="the fine-tuning recipe")
    ft.add_argument("--manifest", required=True, help="manifest.csv of the prepare stage")
    ft.add_argument("--out", required=True, help="run folder: model.pt, model.json, weight_report.json, "
                                                 "history.json, bad_images.json, backbone.pt, and (unless "
                                                 "--no-export) the exports (finetune.export_onnx: model.onnx, "
                                                 "finetune.cam_images: cam/)")
    ft.add_argument("--metrics", required=True, help="metrics JSON (the train stage's format)")
    ft.add_argument("--confusion", help="actual,predicted CSV of the test split (DVC's confusion or scatter plot, "
                    "by task)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.add_argument("--no-export", action="store_true", help="train only; make the exports later with "
                    "`featcache finetune-export` (as the DVC project's export@<mode> stage does)")
    ft.set_defaults(func=_cmd_finetune,
                    outputs={"--out": "folder", "--metrics": "file", "--confusion": "file"})

    fte = with_params(sub.add_parser("finetune-export", help="export a fine-tuned run: ONNX model "
                                     "(finetune.export_onnx) and CAM overlays (finetune.cam_images)"))
    fte.add_argument("--model", required=True, metavar="DIR", help="run folder written by `featcache finetune "
                     "--out` (model.pt, model.json)")
    fte.add_argument("--manifest", required=True, help="manifest.csv the run was trained on (the CAM images)")
    fte.add_argument("--out", metavar="DIR", help="folder for model.onnx and cam/ (default: --model)")
    fte.set_defaults(func=_cmd_finetune_export, outputs={"--out": "folder"})

    cache = sub.add_parser("cache", help="what featcache's cache root holds (ONNX exports, records); --prune DAYS "
                           "removes the entries not used for that long")
    cache.add_argument("--prune", type=_non_negative_float, metavar="DAYS",
                       help="remove the entries no command used in the last DAYS days (0: all not in use now)")
    cache.add_argument("--dry-run", action="store_true", help="with --prune: only list what would be removed")
    cache.add_argument("--params", help="params file whose extract_run.onnx_cache names the ONNX cache folder")
    cache.set_defaults(func=_cmd_cache)

    cmp_ = sub.add_parser("compare", help="rank every run in one report")
    cmp_.add_argument("--metrics-dir", required=True, nargs="+", help="one or more folders of run metrics")
    cmp_.add_argument("--out", required=True, help="output folder (compare.md, compare.json)")
    cmp_.add_argument("--plot", help="also write the ranking as CSV here (DVC plot)")
    cmp_.add_argument("--metric", help="rank and pair by this test metric (default: train.metric of --params, else "
                                       "accuracy or rmse)")
    cmp_.add_argument("--params", help="params file whose train.metric is the default --metric")
    cmp_.set_defaults(func=_cmd_compare, outputs={"--out": "folder", "--plot": "file"})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featcache`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    # featcache's own progress at INFO; other libraries (the ONNX exporter's passes...) only when they warn. With -v:
    # featcache's DEBUG lines and the others' INFO, not their DEBUG (PIL's is two lines per PNG decoded).
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # dask.distributed (a dask extraction) sets its loggers to INFO on import: only its warnings
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    try:
        _check_outputs(args)  # before any work: a path that cannot be written leaves no half-written outputs
        args.func(args)
    except UserError as error:
        print(f"featcache {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (or DVC passing it on): a line, not a traceback; 130 as shells report it
        print(f"featcache {args.command}: interrupted. Hint: rerun it (or `dvc repro`)"
              f"{_KEPT_ON_INTERRUPT.get(args.command, '')}.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
