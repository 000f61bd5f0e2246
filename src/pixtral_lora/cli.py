"""`pixtral-lora` command line: tiny-model, data {generate,generate-scene,validate,preview,export}, eval, calibrate, compare, predict, map."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("pixtral_lora")


def _tiny_model(args) -> int:
    from pixtral_lora.tiny import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed, family=args.family)
    print(f"tiny {args.family} model written to {out}")
    return 0


def _data_generate(args) -> int:
    from pixtral_lora.data.synth import generate_aid_like

    classes = args.classes.split(",") if args.classes else None
    root = generate_aid_like(
        args.out, classes=classes, per_class=args.per_class, size=args.size, seed=args.seed
    )
    print(f"synthetic AID-style data written to {root}")
    return 0


def _class_names_arg(value: str | None) -> list[str] | None:
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [name.strip() for name in value.split(",") if name.strip()]


def _data_validate(args) -> int:
    from pixtral_lora.data.validate import validate

    class_names, test_path, allowed, hf_settings = (
        _class_names_arg(args.classes),
        args.test,
        args.allow_path,
        {},
    )
    if args.config:  # the data settings training will use
        from pixtral_lora.config import load_config

        data = load_config(args.config).data
        class_names = class_names or data.class_names
        test_path = test_path or data.test_path
        allowed = [*allowed, *data.allow_paths_outside]
        hf_settings = {
            "image_column": data.image_column,
            "label_column": data.label_column,
            "hub_config": data.hub_config,
            "hub_revision": data.hub_revision,
        }
    problems = validate(
        args.path,
        class_names=class_names,
        test_path=test_path,
        allowed_roots=allowed,
        hf_settings=hf_settings,
    )
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        print(problem)
    print(f"{args.path}: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    return 1 if errors else 0


def _conversations(path: str, class_names: list[str] | None, prompt, allowed_roots: list[str] | None = None):
    from pixtral_lora.data.loaders import as_conversations, load_any

    dataset, names = load_any(path, class_names, allowed_roots)
    return as_conversations(dataset, prompt, names or [])


def _data_preview(args) -> int:
    from pixtral_lora.config import load_config
    from pixtral_lora.data.preview import sample_view
    from pixtral_lora.modeling import load_processor
    from pixtral_lora.prompt import PromptConfig
    from pixtral_lora.render import Renderer
    from pixtral_lora.tiny import build_processor

    if args.save_image:  # before any work: never over a file an earlier preview did not write
        from pixtral_lora.io import check_replaceable_file, is_our_png

        check_replaceable_file(args.save_image, is_our_png)
    prompt, longest_edge, allowed, bands = (
        PromptConfig(),
        args.image_longest_edge,
        list(args.allow_path),
        None,
    )
    if args.config:
        config = load_config(args.config)
        prompt, longest_edge = config.prompt, config.data.image_longest_edge
        allowed += config.data.allow_paths_outside
        bands = config.data.band_options()
    dataset = _conversations(args.path, _class_names_arg(args.classes), prompt, allowed)
    if not 0 <= args.index < len(dataset):
        print(
            f"--index {args.index} is out of range: {args.path} has {len(dataset)} samples", file=sys.stderr
        )
        return 2
    processor = load_processor(args.processor) if args.processor else build_processor(args.family)
    renderer = Renderer(processor, longest_edge, bands=bands)
    view = sample_view(renderer, dataset[args.index])
    if args.save_image:
        from PIL.PngImagePlugin import PngInfo

        from pixtral_lora.io import PNG_SOFTWARE, atomic_file, is_our_png

        image = renderer.load_images(dataset[args.index]["images"])[0]  # exactly the pixels the model gets
        info = PngInfo()
        info.add_text("Software", f"{PNG_SOFTWARE} preview")
        with atomic_file(args.save_image, "wb", recognise=is_our_png, overwrite=False) as handle:
            image.save(handle, format="PNG", pnginfo=info)
        print(f"image as the model sees it ({image.width}x{image.height}) saved to {args.save_image}")
    if args.ids:
        print(json.dumps({k: view[k] for k in ("id", "label", "input_ids", "labels", "loss_mask")}))
    else:
        print(
            f"sample {args.index} ({view['id']}, label {view['label']!r}): {view['num_tokens']} tokens, "
            f"{view['num_image_tokens']} image tokens, {view['num_loss_tokens']} with loss (inside ⟦ ⟧)"
        )
        print(view["text"])
    return 0


def _data_export(args) -> int:
    from pixtral_lora.data.loaders import export_mistral_jsonl
    from pixtral_lora.prompt import PromptConfig

    dataset = _conversations(args.path, _class_names_arg(args.classes), PromptConfig(), args.allow_path)
    count = export_mistral_jsonl(dataset, args.out, args.image_longest_edge, overwrite=args.overwrite)
    print(f"{count} samples written to {args.out}")
    return 0


def _eval(args) -> int:
    from pixtral_lora.evaluation.evaluate import evaluate_run
    from pixtral_lora.evaluation.vllm import evaluate_run_vllm

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
        out = evaluate_run_vllm(
            args.run_dir, models, limit=args.limit, out_dir=args.out, overwrite=args.overwrite
        )
        print((out / "report.md").read_text(encoding="utf-8").split("\n## ")[0])
        return 0
    models = tuple(args.models.split(","))
    out = evaluate_run(
        args.run_dir,
        modes=args.modes.split(",") if args.modes else None,
        models=models,
        limit=args.limit,
        out_dir=args.out,
        strict=True if args.strict else None,
        merged=args.merged,
        overwrite=args.overwrite,
        gallery_limit=args.gallery_limit,
        abstain_below=args.abstain_below,
        target_accuracy=args.target_accuracy,
    )
    print((out / "report.md").read_text(encoding="utf-8").split("\n## ")[0])
    print(f"report, predictions and confusion matrices in {out}; open {out / 'report.html'} in a browser")
    return 0


def _calibrate(args) -> int:
    from pixtral_lora.evaluation.calibrate import calibrate_run
    from pixtral_lora.evaluation.calibration import calibration_path

    result = calibrate_run(args.run_dir, limit=args.limit)
    before, after = result["before"], result["after"]
    print(
        f"T = {result['temperature']:.3f} on {result['n']} validation images: NLL {before['nll']:.3f} -> "
        f"{after['nll']:.3f}, ECE {before['ece']:.3f} -> {after['ece']:.3f}; written to "
        f"{calibration_path(args.run_dir)}"
    )
    return 0


def _predict(args) -> int:
    import tempfile

    from pixtral_lora.inference.predict import launch_processes, predict_archive

    if not _score_mode_for_target(args):
        return 2
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        if not args.out:
            print("error: --num-processes needs --out", file=sys.stderr)
            return 2
        argv, skip = [], False
        for arg in args.argv:  # the same command for every process, less --num-processes N
            if skip or arg.startswith("--num-processes"):
                skip = arg == "--num-processes"
                continue
            argv.append(arg)
        return launch_processes(argv, args.num_processes)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or str(Path(scratch) / "predictions.jsonl")
        summary = predict_archive(
            args.images,
            args.run,
            out,
            model_path=args.model,
            mode=args.mode,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            as_dataset=args.dataset,
            abstain_below=args.abstain_below,
            target_accuracy=args.target_accuracy,
        )
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


def _score_mode_for_target(args) -> bool:
    if args.target_accuracy is not None and args.mode != "score":
        print("error: --target-accuracy picks a threshold of score mode's calibrated confidences: use "
              "--mode score, or --abstain-below", file=sys.stderr)  # fmt: skip
        return False
    return True


def _map(args) -> int:
    from pixtral_lora.inference.scene_map import map_scene

    if not _score_mode_for_target(args):
        return 2
    summary = map_scene(
        args.scene,
        args.run,
        args.out,
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
        min_valid=args.min_valid,
        abstain_below=args.abstain_below,
        target_accuracy=args.target_accuracy,
    )
    print(
        f"{summary['classified']} tiles of {summary['tile_pixels']} px classified ({summary['empty']} empty or "
        f"mostly masked skipped), CRS {summary['crs']}: "
        + ", ".join(f"{k} {v}" for k, v in summary["per_label"].items())
    )
    print(f"map: {summary['out']}\npicture: {summary['png']}")
    return 0


def _data_generate_scene(args) -> int:
    from pixtral_lora.data.synth import generate_scene_mosaic

    classes = args.classes.split(",") if args.classes else None
    try:
        rows, cols = (int(n) for n in args.grid.lower().split("x"))
        if rows < 1 or cols < 1:
            raise ValueError
    except ValueError:
        print(f"error: --grid {args.grid!r}: give rows x columns, e.g. 4x4", file=sys.stderr)
        return 2
    layout = generate_scene_mosaic(args.out, classes, (rows, cols), args.tile, args.seed)
    print(f"synthetic georeferenced scene written to {args.out}; its grid, row by row:")
    for row in layout:
        print("  " + " ".join(f"{name:<10}" for name in row))
    return 0


def _is_comparison(path: Path) -> bool:
    head = path.read_text(encoding="utf-8", errors="replace")[:300]
    return head.startswith("# Run comparison") or "<title>Run comparison</title>" in head


def _compare(args) -> int:
    from pixtral_lora.evaluation.compare import compare, render_html, render_markdown
    from pixtral_lora.io import atomic_file, check_replaceable_file

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


_ALLOW_HELP = "also allow image paths inside DIR (JSONL/CSV paths must otherwise stay in the data folder)"


def build_parser() -> argparse.ArgumentParser:
    from typing import Annotated

    from pydantic import Field

    from pixtral_lora.config import (
        BatchSize,
        Count,
        ImageEdge,
        NonNegativeCount,
        Pixels,
        PositiveFloat,
        Probability,
        cli_number,
    )

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
    tiny.set_defaults(func=_tiny_model)

    data = commands.add_parser("data", help="generate, validate, preview and export datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    generate = data_commands.add_parser("generate", help="write synthetic AID-style scene folders")
    generate.add_argument("--out", required=True)
    generate.add_argument("--per-class", type=cli_number(Count), default=20)
    generate.add_argument("--size", type=cli_number(Pixels), default=600)
    generate.add_argument("--classes", help="comma-separated subset of the synthetic scene classes")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_data_generate)

    scene = data_commands.add_parser("generate-scene", help="write a synthetic georeferenced scene (GeoTIFF)")
    scene.add_argument("--out", required=True)
    scene.add_argument("--grid", default="4x4", help="rows x columns of scenes")
    scene.add_argument("--tile", type=cli_number(Pixels), default=64, help="pixels per grid cell")
    scene.add_argument("--classes", help="comma-separated synthetic scene classes")
    scene.add_argument("--seed", type=int, default=1)
    scene.set_defaults(func=_data_generate_scene)

    validate = data_commands.add_parser(
        "validate", help="report every problem in a folder, JSONL, CSV or HF dataset (Parquet, hf://...)"
    )
    validate.add_argument("path")
    validate.add_argument("--classes", help="class names: comma-separated or a file with one per line")
    validate.add_argument("--test", help="a test set to check for images shared with PATH")
    validate.add_argument("--allow-path", action="append", default=[], metavar="DIR", help=_ALLOW_HELP)
    validate.add_argument(
        "--config", help="take data settings (columns, hub config, allowed paths) from this config"
    )
    validate.set_defaults(func=_data_validate)

    preview = data_commands.add_parser("preview", help="show one sample exactly as the model sees it")
    preview.add_argument("path")
    preview.add_argument("--index", type=cli_number(NonNegativeCount), default=0)
    preview.add_argument("--ids", action="store_true", help="print token ids, labels and loss mask as JSON")
    preview.add_argument(
        "--processor", help="model path or hub id whose processor to use (default: --family's)"
    )
    preview.add_argument(
        "--family",
        choices=["pixtral", "mistral3"],
        default="pixtral",
        help="without --processor: Pixtral-12B's processor (16-px tokens) or Mistral3's (28-px tokens)",
    )
    preview.add_argument("--config", help="take prompt and image size from this run config")
    preview.add_argument("--classes", help="class names for JSONL/CSV data")
    preview.add_argument("--image-longest-edge", type=cli_number(ImageEdge), default=300)
    preview.add_argument("--allow-path", action="append", default=[], metavar="DIR", help=_ALLOW_HELP)
    preview.add_argument(
        "--save-image", metavar="PNG", help="also save the image exactly as the model sees it"
    )
    preview.set_defaults(func=_data_preview)

    export = data_commands.add_parser("export", help="write a dataset as Mistral fine-tuning JSONL")
    export.add_argument("path")
    export.add_argument("--out", required=True)
    export.add_argument("--classes", help="class names for JSONL/CSV data")
    export.add_argument("--image-longest-edge", type=cli_number(ImageEdge), default=300)
    export.add_argument("--allow-path", action="append", default=[], metavar="DIR", help=_ALLOW_HELP)
    export.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an export")
    export.set_defaults(func=_data_export)

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
    evaluate.add_argument(
        "--backend",
        choices=["transformers", "vllm"],
        default="transformers",
        help="vllm: fast free generation with vLLM on a GPU (pip install vllm); "
        "--merged is then a Mistral-format export",
    )
    evaluate.add_argument(
        "--vllm-base", help="with --backend vllm: the base in Mistral format (dir or hub id)"
    )
    evaluate.add_argument(
        "--vllm-lora",
        help="with --backend vllm and --vllm-base: the fine-tuned model is this --adapter-only export "
        "served as LoRA on the base (what `vllm serve --enable-lora` serves)",
    )
    _abstention_options(evaluate, Probability, cli_number)
    evaluate.set_defaults(func=_eval)

    calibration = commands.add_parser(
        "calibrate", help="fit a temperature on a run's validation split (calibrated confidences)"
    )
    calibration.add_argument("run_dir")
    calibration.add_argument("--limit", type=cli_number(Count), help="only the first N validation images")
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
    mapping.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a map")
    _abstention_options(mapping, Probability, cli_number)
    mapping.set_defaults(func=_map)

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
        help="split the inputs over N local processes (gloo on CPU)",
    )
    predict.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not a predictions file"
    )
    _abstention_options(predict, Probability, cli_number)
    predict.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pixtral-lora` command."""
    from pixtral_lora.errors import user_errors

    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what --num-processes re-runs
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


if __name__ == "__main__":
    sys.exit(main())
