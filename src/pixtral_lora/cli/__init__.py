"""`pixtral-lora` command line: tiny-model, dequantize, data {generate,generate-scene,validate,audit,preview,export}, eval, calibrate, compare, predict, map, serve-command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("pixtral_lora")


def _dequantize(args) -> int:
    from pixtral_lora.export.hf import export_hf

    out = export_hf(args.model, args.out, None, dtype=args.dtype, overwrite=args.overwrite)
    print(f"{args.dtype} copy of {args.model} written to {out}")
    return 0


def _tiny_model(args) -> int:
    from pixtral_lora.model.tiny import build_tiny_model

    out = build_tiny_model(
        args.out, seed=args.seed, family=args.family, like=args.like, overwrite=args.overwrite
    )
    print(f"tiny {args.family} model written to {out}")
    return 0


def _eval(args) -> int:
    from pixtral_lora.evaluation.evaluate import EvalOptions, evaluate_run

    if args.backend == "vllm":
        if not args.merged and not (args.vllm_lora and args.vllm_base):
            print(
                "error: --backend vllm needs --merged DIR (a convert_to_mistral.py output), or --vllm-base "
                "and --vllm-lora (the base in Mistral format and an --adapter-only export)",
                file=sys.stderr,
            )
            return 2
        finetuned = args.merged or (args.vllm_base, args.vllm_lora)
        models = {"finetuned": finetuned, **({"base": args.vllm_base} if args.vllm_base else {})}
        models = {name: model for name, model in models.items() if name in args.models.split(",")}
        if not models:
            print(f"error: --models {args.models}: vLLM has none of them to evaluate here", file=sys.stderr)
            return 2
        from pixtral_lora.evaluation.vllm_backend import evaluate_run_vllm

        out = evaluate_run_vllm(
            args.run_dir,
            models,
            modes=tuple(args.modes.split(",")) if args.modes else None,
            limit=args.limit,
            out_dir=args.out,
            overwrite=args.overwrite,
            force=args.force,
        )
        print((out / "report.md").read_text(encoding="utf-8").split("\n## ")[0])
        return 0
    models = tuple(args.models.split(","))
    options = EvalOptions(
        modes=tuple(args.modes.split(",")) if args.modes else None,
        models=models,
        limit=args.limit,
        out_dir=args.out,
        strict=True if args.strict else None,
        merged=args.merged,
        overwrite=args.overwrite,
        force=args.force,
        gallery_limit=args.gallery_limit,
        abstain_below=args.abstain_below,
        target_accuracy=args.target_accuracy,
    )
    out = evaluate_run(args.run_dir, options)
    print((out / "report.md").read_text(encoding="utf-8").split("\n## ")[0])
    print(f"report, predictions and confusion matrices in {out}; open {out / 'report.html'} in a browser")
    return 0


def _calibrate(args) -> int:
    from pixtral_lora.evaluation.calibrate import calibrate_run
    from pixtral_lora.evaluation.calibration import calibration_path

    result = calibrate_run(args.run_dir, limit=args.limit, force=args.force)
    before, after = result["before"], result["after"]
    print(
        f"T = {result['temperature']:.3f} on {result['n']} validation images: NLL {before['nll']:.3f} -> "
        f"{after['nll']:.3f}, ECE {before['ece']:.3f} -> {after['ece']:.3f}; written to "
        f"{calibration_path(args.run_dir)}"
    )
    return 0


def _predict(args) -> int:
    import tempfile

    from pixtral_lora.inference.predict import PredictOptions, predict_archive

    if not _score_mode_for_target(args):
        return 2
    ray_address = _ray_address(args)
    if ray_address is False:
        return 2
    if ray_address and not args.out:
        print(
            "error: --num-processes/--ray-address need --out (the job writes a resumable file)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or str(Path(scratch) / "predictions.jsonl")
        options = PredictOptions(
            model_path=args.model,
            mode=args.mode,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            force=args.force,
            as_dataset=args.dataset,
            abstain_below=args.abstain_below,
            target_accuracy=args.target_accuracy,
            backend=_backend(args, args.model),
            ray_address=ray_address,
            replicas=args.num_processes,
        )
        summary = predict_archive(args.images, args.run, out, options)
        if not summary:  # a non-zero rank of a multi-process launch: rank 0 reports
            return 0
        if not args.out:
            for line in Path(out).read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if row["error"]:
                    print(f"{row['path']}\tunreadable\t{row['error']}")
                    continue
                confidence = "" if row["confidence"] is None else f"\t{row['confidence']:.3f}"
                print(f"{row['path']}\t{row['label']}{confidence}\t{row['raw_answer']!r}")
    print(
        f"{summary['inputs']} inputs ({summary['skipped_as_done']} already done), "
        f"{summary['images_per_second']:.1f} images/s; per label: "
        + ", ".join(f"{k} {v}" for k, v in summary["per_label"].items())
        + f"; unreadable: {len(summary['unreadable'])}; no valid label: {summary['no_label']}"
        + (f"; abstained: {summary['abstained']}" if summary["abstained"] else "")
        + (f"; written to {args.out}" if args.out else "")
    )
    for path in summary["unreadable"][:10]:
        print(f"unreadable: {path}", file=sys.stderr)
    return 0


def _serve_command(args) -> int:
    from pixtral_lora.export.vllm_adapter import serve_many

    adapters = {}
    for given in args.adapters:
        name, _, path = given.rpartition("=")
        folder = Path(path)
        name = name or (folder.resolve().parent.name if folder.name in ("lora", "adapter") else folder.name)
        if name in adapters:
            print(f"error: two adapters named {name!r}: name them, NAME=DIR", file=sys.stderr)
            return 2
        adapters[name] = folder
    print(serve_many(adapters))
    return 0


def _score_mode_for_target(args) -> bool:
    if args.target_accuracy is not None and args.mode != "score":
        print("error: --target-accuracy picks a threshold of score mode's calibrated confidences: use "
              "--mode score, or --abstain-below", file=sys.stderr)  # fmt: skip
        return False
    return True


def _ray_address(args) -> str | None | bool:
    """Where predict/map's Ray job runs: `--ray-address`, or with `--num-processes N` alone a local
    cluster; None for one process. False (said in one line) when Ray is not installed."""
    address = args.ray_address or ("local" if args.num_processes > 1 else None)
    if address is None:
        return None
    try:
        import ray  # noqa: F401
    except ImportError:
        print(f"error: --num-processes {args.num_processes} runs {args.num_processes} replicas as a Ray job: "
              "pip install 'pixtral-lora[ray]' (Ray is not installed)", file=sys.stderr)  # fmt: skip
        return False
    return address


def _map(args) -> int:
    from pixtral_lora.inference.scene_map import MapOptions, map_scene

    if not _score_mode_for_target(args):
        return 2
    ray_address = _ray_address(args)
    if ray_address is False:
        return 2
    options = MapOptions(
        tile=args.tile,
        stride=args.stride,
        tile_m=args.tile_m,
        resize_to=args.resize_to,
        mode=args.mode,
        min_confidence=args.min_confidence,
        to_wgs84=args.to_wgs84,
        model_path=args.model,
        edges=args.edges,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        force=args.force,
        min_valid=args.min_valid,
        abstain_below=args.abstain_below,
        target_accuracy=args.target_accuracy,
        backend=_backend(args, args.model),
        ray_address=ray_address,
        replicas=args.num_processes,
    )
    summary = map_scene(args.scene, args.run, args.out, options)
    print(
        f"{summary['classified']} tiles of {summary['tile_pixels']} px classified ({summary['empty']} empty or "
        f"mostly masked skipped), CRS {summary['crs']}: "
        + ", ".join(f"{k} {v}" for k, v in summary["per_label"].items())
    )
    print(f"map: {summary['out']}\npicture: {summary['png']}")
    return 0


def _is_comparison(path: Path) -> bool:
    head = path.read_text(encoding="utf-8", errors="replace")[:300]
    return head.startswith("# Run comparison") or "<title>Run comparison</title>" in head


def _compare(args) -> int:
    from pixtral_lora.evaluation.compare import compare, render_html, render_markdown
    from pixtral_lora.outputs import atomic_file, check_replaceable_file

    if args.out and Path(args.out).suffix not in (".md", ".html"):
        print(f"error: --out {args.out}: use a .md or .html file name", file=sys.stderr)
        return 2
    if args.out:
        check_replaceable_file(args.out, _is_comparison, args.overwrite)
    data = compare(args.runs, eval_name=args.eval, model=args.model)
    markdown = render_markdown(data)
    print(markdown)
    if args.out:
        with atomic_file(args.out, recognise=_is_comparison, overwrite=args.overwrite) as handle:
            handle.write(render_html(data) if args.out.endswith(".html") else markdown)
        print(f"written to {args.out}")
    return 0


def _abstention_options(parser, Probability, cli_number) -> None:
    """--abstain-below and --target-accuracy, the same for eval, predict and map."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--abstain-below",
        type=cli_number(Probability),
        metavar="P",
        help="abstain from answers whose confidence is under P (outcome 'abstained', label kept)",
    )
    group.add_argument(
        "--target-accuracy",
        type=cli_number(Probability),
        metavar="A",
        help="abstain below the threshold that gives accuracy A on the validation split (score mode, "
        "needs the run's calibration.json)",
    )


def build_parser() -> argparse.ArgumentParser:
    from typing import Annotated

    from pydantic import Field

    from pixtral_lora.config.schema import (
        BatchSize,
        Count,
        ImageEdge,
        NonNegativeCount,
        Pixels,
        PositiveFloat,
        Probability,
        cli_number,
    )
    from pixtral_lora.families import shape_names

    parser = argparse.ArgumentParser(prog="pixtral-lora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser(
        "tiny-model", help="write a random-initialised tiny checkpoint of a model family's real architecture"
    )
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--family",
        choices=["pixtral", "mistral3"],
        default="pixtral",
        help="pixtral: Pixtral-12B's config (default); mistral3: Mistral Small 3.2's (Ministral 3's family)",
    )
    tiny.add_argument(
        "--like",
        choices=shape_names(),
        help="which released shape of --family to copy (default its flagship; mistral3's ministral-3-8b has a "
        "ministral3 language model: YaRN rope, llama-4 attention scaling)",
    )
    tiny.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not a previous tiny model"
    )
    tiny.set_defaults(func=_tiny_model)

    dequantize = commands.add_parser(
        "dequantize", help="write a bf16 copy of an FP8 checkpoint (Ministral 3 Instruct) for QLoRA"
    )
    dequantize.add_argument("model", help="local checkpoint or hub id")
    dequantize.add_argument("--out", required=True)
    dequantize.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    dequantize.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not a previous dequantized copy"
    )
    dequantize.set_defaults(func=_dequantize)

    from pixtral_lora.cli.data import add_data_commands

    add_data_commands(commands)

    evaluate = commands.add_parser("eval", help="evaluate a run's held-out split, base and fine-tuned")
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "--modes", help="comma-separated: generate,constrained,score (default: the config's)"
    )
    evaluate.add_argument("--models", default="base,finetuned", help="which of base,finetuned to evaluate")
    evaluate.add_argument("--merged", help="evaluate this merged HF checkpoint as the fine-tuned model")
    evaluate.add_argument("--limit", type=cli_number(Count), help="only the first N test images")
    evaluate.add_argument("--strict", action="store_true", help="no label normalisation when parsing answers")
    evaluate.add_argument("--out", help="report directory (default: RUN_DIR/eval)")
    evaluate.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it holds files other than a report"
    )
    evaluate.add_argument(
        "--gallery-limit",
        type=cli_number(NonNegativeCount),
        default=200,
        help="mistakes shown per model and mode in report.html",
    )
    _backend_options(evaluate, "--merged")
    _abstention_options(evaluate, Probability, cli_number)
    evaluate.add_argument(
        "--force",
        action="store_true",
        help="use the run although its base, config.yaml or held-out images changed since training (a warning goes into the outputs)",
    )
    evaluate.set_defaults(func=_eval)

    calibration = commands.add_parser(
        "calibrate", help="fit a temperature on a run's validation split (calibrated confidences)"
    )
    calibration.add_argument("run_dir")
    calibration.add_argument("--limit", type=cli_number(Count), help="only the first N validation images")
    calibration.add_argument(
        "--force",
        action="store_true",
        help="use the run although its base, config.yaml or held-out images changed since training (a warning goes into the outputs)",
    )
    calibration.set_defaults(func=_calibrate)

    comparison = commands.add_parser("compare", help="compare evaluated runs (config differences, McNemar)")
    comparison.add_argument("runs", nargs="+", metavar="RUN_DIR")
    comparison.add_argument("--out", help="also write compare.md or compare.html")
    comparison.add_argument("--eval", default="eval", help="each run's report directory name (default: eval)")
    comparison.add_argument("--model", default="finetuned", help="which evaluated model to compare")
    comparison.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not a comparison"
    )
    comparison.set_defaults(func=_compare)

    mapping = commands.add_parser(
        "map", help="classify a georeferenced scene tile by tile into a GeoJSON map"
    )
    mapping.add_argument("scene", help="a GeoTIFF/COG in any CRS")
    mapping.add_argument("--run", required=True)
    mapping.add_argument(
        "--out", required=True, help="map.geojson or map.gpkg (the picture goes beside it as .png)"
    )
    mapping.add_argument(
        "--tile", type=cli_number(Pixels), default=600, help="tile size in pixels (AID's scenes are 600)"
    )
    mapping.add_argument(
        "--tile-m",
        type=cli_number(PositiveFloat),
        help="tile size in metres instead, from the raster's resolution",
    )
    mapping.add_argument(
        "--stride", type=cli_number(Pixels), help="pixels between tiles (default: the tile size)"
    )
    mapping.add_argument(
        "--resize-to", type=cli_number(ImageEdge), help="longest edge the model sees (default: the run's)"
    )
    mapping.add_argument("--mode", default="score", choices=["generate", "constrained", "score"])
    mapping.add_argument(
        "--min-confidence",
        type=cli_number(Probability),
        default=0.5,
        help="hatch tiles below this confidence",
    )
    mapping.add_argument(
        "--min-valid",
        type=cli_number(Probability),
        default=0.5,
        help="least share of a tile's pixels that must be valid (alpha, mask, nodata) to classify it",
    )
    mapping.add_argument("--to-wgs84", action="store_true", help="write polygons in EPSG:4326")
    mapping.add_argument("--edges", choices=["pad", "skip"], default="pad", help="partial tiles at the edges")
    mapping.add_argument("--model", help="a merged HF checkpoint instead of base + adapter")
    mapping.add_argument("--batch-size", type=cli_number(BatchSize))
    mapping.add_argument(
        "--num-processes",
        type=cli_number(Annotated[int, Field(ge=1, le=256)]),
        default=1,
        help="N replicas, each holding one model, as a Ray Data job (on a local cluster unless --ray-address)",
    )
    mapping.add_argument(
        "--ray-address",
        help="run as a Ray Data job: local (a cluster started in this process), auto or HOST:PORT (join one)",
    )
    _backend_options(mapping, "--model")
    mapping.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a map")
    _abstention_options(mapping, Probability, cli_number)
    mapping.add_argument(
        "--force",
        action="store_true",
        help="use the run although its base, config.yaml or held-out images changed since training (a warning goes into the outputs)",
    )
    mapping.set_defaults(func=_map)

    serving = commands.add_parser(
        "serve-command",
        help="the vllm serve command for several --adapter-only exports on one base, each under a versioned name",
    )
    serving.add_argument(
        "adapters",
        nargs="+",
        metavar="[NAME=]DIR",
        help="an --adapter-only export (NAME: default its run's folder name); served as NAME-<8 hex of its adapter>",
    )
    serving.set_defaults(func=_serve_command)

    predict = commands.add_parser("predict", help="classify new images with a trained run (resumable)")
    predict.add_argument(
        "images",
        metavar="SOURCE",
        help="a folder of images (recursive), a glob, a .txt/.csv list of paths, a .parquet file or hf://OWNER/NAME",
    )
    predict.add_argument(
        "--dataset",
        action="store_true",
        help="read a SOURCE folder as an HF dataset (Parquet, save_to_disk, imagefolder)",
    )
    predict.add_argument("--run", required=True, help="run directory (prompt, classes, adapter)")
    predict.add_argument("--model", help="use this merged/exported HF checkpoint instead of base + adapter")
    predict.add_argument("--mode", default="score", choices=["generate", "constrained", "score"])
    predict.add_argument("--out", help="write .jsonl, .csv or .parquet (resumable) instead of printing")
    predict.add_argument(
        "--batch-size",
        type=cli_number(BatchSize),
        help="images per batch (default: the run's eval.batch_size)",
    )
    predict.add_argument(
        "--num-processes",
        type=cli_number(Annotated[int, Field(ge=1, le=256)]),
        default=1,
        help="N replicas, each holding one model, as a Ray Data job (on a local cluster unless --ray-address)",
    )
    predict.add_argument(
        "--ray-address",
        help="run as a Ray Data job: local (a cluster started in this process), auto or HOST:PORT (join one)",
    )
    predict.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not a predictions file"
    )
    _backend_options(predict, "--model")
    _abstention_options(predict, Probability, cli_number)
    predict.add_argument(
        "--force",
        action="store_true",
        help="use the run although its base, config.yaml or held-out images changed since training (a warning goes into the outputs)",
    )
    predict.set_defaults(func=_predict)
    return parser


def _backend_options(parser, merged_flag: str) -> None:
    parser.add_argument(
        "--backend",
        choices=["transformers", "vllm"],
        default="transformers",
        help=f"vllm: vLLM's engine (pip install vllm), every mode, on Mistral-format exports: {merged_flag} "
        "a merged convert_to_mistral.py export, or --vllm-base with --vllm-lora",
    )
    parser.add_argument("--vllm-base", help="with --backend vllm: the base in Mistral format (dir or hub id)")
    parser.add_argument(
        "--vllm-lora",
        help="with --backend vllm and --vllm-base: this --adapter-only export of the run served as LoRA on "
        "the base (what `vllm serve --enable-lora` serves)",
    )


def _backend(args, merged: str | None):
    from pixtral_lora.inference.classifier import Backend

    backend = Backend(args.backend, args.vllm_base, args.vllm_lora)
    backend.check(merged)
    return backend


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pixtral-lora` command."""
    from pixtral_lora.errors import user_errors

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # rasterio logs every GDAL complaint at INFO; the command says what matters
        logging.getLogger("rasterio").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
