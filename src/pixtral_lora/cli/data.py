"""`pixtral-lora data ...`: generate, generate-scene, validate, audit, preview and export datasets."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path


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


def _hf_settings(data) -> dict:
    """The validator's settings for a Hub/Parquet source, from a config's `data` section."""
    return {
        "image_column": data.image_column,
        "label_column": data.label_column,
        "hub_config": data.hub_config,
        "hub_revision": data.hub_revision,
    }


def _data_validate(args) -> int:
    from pixtral_lora.data.validate import validate

    class_names, test_path, allowed, hf_settings, prompt = (
        _class_names_arg(args.classes),
        args.test,
        args.allow_path,
        {},
        None,
    )
    if args.config:  # the data settings training will use
        from pixtral_lora.config.yaml_loading import load_config

        config = load_config(args.config)
        data, prompt = config.data, config.prompt
        class_names = class_names or data.class_names
        test_path = test_path or data.test_path
        allowed = [*allowed, *data.allow_paths_outside]
        hf_settings = _hf_settings(data)
    problems = validate(
        args.path,
        class_names=class_names,
        test_path=test_path,
        allowed_roots=allowed,
        hf_settings=hf_settings,
        prompt=prompt,
    )
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        print(problem)
    print(f"{args.path}: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    return 1 if errors else 0


def _conversations(path: str, data, prompt):
    """Every sample of the source at `path` as a conversation, read with the `data` settings
    (`config.schema.DataSection`) exactly as training reads it."""
    from pixtral_lora.data.loaders import as_conversations
    from pixtral_lora.data.sources import load_source

    source = load_source(path, data, "data")
    return as_conversations(source.all_rows(), prompt, source.class_names or [])


def _data_section(path: str, data, classes: str | None, allowed: list[str]):
    """The `data` settings a data command reads `path` with: `data` (a loaded `--config`'s section),
    else the defaults, with `--classes` and `--allow-path` on top."""
    from pixtral_lora.config.schema import DataSection

    data = DataSection(path=str(path)) if data is None else data
    update = {"allow_paths_outside": [*data.allow_paths_outside, *allowed]}
    if classes:
        update["class_names"] = _class_names_arg(classes)
    return data.model_copy(update=update)


def _data_preview(args) -> int:
    from pixtral_lora.config.yaml_loading import load_config
    from pixtral_lora.data.raster import band_options
    from pixtral_lora.model.loading import load_processor
    from pixtral_lora.model.preview import sample_view
    from pixtral_lora.model.render import Renderer
    from pixtral_lora.model.tiny import build_processor
    from pixtral_lora.task.prompt import PromptConfig

    if args.save_image:  # before any work: never over a file an earlier preview did not write
        from pixtral_lora.outputs import check_replaceable_file, is_our_png

        check_replaceable_file(args.save_image, is_our_png, args.overwrite)
    prompt, longest_edge, bands, configured = PromptConfig(), args.image_longest_edge, None, None
    if args.config:
        config = load_config(args.config)
        prompt, longest_edge = config.prompt, config.data.image_longest_edge
        bands, configured = band_options(config.data), config.data
    data = _data_section(args.path, configured, args.classes, list(args.allow_path))
    dataset = _conversations(args.path, data, prompt)
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

        from pixtral_lora.outputs import PNG_SOFTWARE, atomic_file, is_our_png

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
    from pixtral_lora.task.prompt import PromptConfig

    data = _data_section(args.path, None, args.classes, list(args.allow_path))
    dataset = _conversations(args.path, data, PromptConfig())
    count = export_mistral_jsonl(dataset, args.out, args.image_longest_edge, overwrite=args.overwrite)
    print(f"{count} samples written to {args.out}")
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
    layout = generate_scene_mosaic(
        args.out, classes, (rows, cols), args.tile, args.seed, overwrite=args.overwrite
    )
    print(f"synthetic georeferenced scene written to {args.out}; its grid, row by row:")
    for row in layout:
        print("  " + " ".join(f"{name:<10}" for name in row))
    return 0


_ALLOW_HELP = "also allow image paths inside DIR (JSONL/CSV paths must otherwise stay in the data folder)"


def _audit_run(args):
    """The run `--run` names, opened, after checking DATASET is the data it was trained on."""
    from pixtral_lora.errors import UserError
    from pixtral_lora.run.reader import Run

    if args.config:
        raise UserError("data audit: --config and --run both name a split; give one (--run audits the run's)")
    run = Run.open(args.run, force=args.force)
    trained_on = Path(run.config.data.path)
    if Path(args.path).resolve() != trained_on.resolve():
        raise UserError(
            f"data audit: {args.path} is not the data {args.run} was trained on ({trained_on}, its "
            "config.yaml data.path); audit that data, or leave out --run"
        )
    return run


def _validator_findings(data, prompt) -> dict:
    """`data validate`'s findings (unreadable images, bad answers, shared content) for the audit."""
    from pixtral_lora.data.validate import validate

    problems = validate(
        data.path,
        class_names=data.class_names,
        test_path=data.test_path,
        allowed_roots=list(data.allow_paths_outside),
        hf_settings=_hf_settings(data),
        prompt=prompt,
    )
    return {
        "errors": sum(p.severity == "error" for p in problems),
        "warnings": sum(p.severity == "warning" for p in problems),
        "problems": [dataclasses.asdict(p) for p in problems],
    }


def _data_audit(args) -> int:
    from pixtral_lora.config.schema import Config
    from pixtral_lora.config.yaml_loading import load_config
    from pixtral_lora.data.audit import audit
    from pixtral_lora.data.audit_report import check_audit_out, write_audit
    from pixtral_lora.data.splits import load_run_data

    check_audit_out(args.out, args.overwrite)
    if args.run:
        run = _audit_run(args)
        config, splits = run.config, run.splits()
        data = config.data
    else:
        config = load_config(args.config) if args.config else Config(data={"path": str(args.path)})
        data = _data_section(args.path, config.data, args.classes, list(args.allow_path))
        data = data.model_copy(update={"path": str(args.path)})
        splits = load_run_data(config.model_copy(update={"data": data})).splits
    findings = audit(splits, args.max_distance, workers=args.workers)
    findings["validator"] = _validator_findings(data, config.prompt)
    if args.run:
        from pixtral_lora.evaluation.label_errors import find_label_errors

        findings["label_errors"] = find_label_errors(args.run, args.limit, args.force)
    out = write_audit(findings, str(args.path), args.out, args.overwrite, splits)
    counts = findings["counts"]
    labels = ""
    if "label_errors" in findings:
        errors = findings["label_errors"]
        labels = (
            f"; likely label errors: {len(errors['out_of_sample']['candidates'])} of "
            f"{errors['out_of_sample']['scored']} validation/test images, "
            f"{len(errors['in_sample']['candidates'])} of {errors['in_sample']['scored']} training (in sample)"
        )
    print(
        f"{findings['images']} images: {counts['exact']} exact and {counts['near']} near-duplicate groups, "
        f"{counts['conflicting']} with conflicting labels, {counts['leak']} across splits "
        f"({counts['leaked_test_images']} test images with a twin), {counts['unreadable']} unreadable"
        f"{labels}; {len(findings['exclude'])} ids in {out / 'exclude.txt'}; report: {out / 'audit.html'}"
    )
    return 0


def add_data_commands(commands) -> None:
    """The `data` command and its subcommands, on the top-level parser's subparsers."""
    from pixtral_lora.config.schema import Count, ImageEdge, NonNegativeCount, Pixels, cli_number

    data = commands.add_parser("data", help="generate, validate, audit, preview and export datasets")
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
    scene.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not a synthetic scene"
    )
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
    preview.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --save-image even if an earlier preview did not write it",
    )
    preview.set_defaults(func=_data_preview)

    audit = data_commands.add_parser(
        "audit", help="find exact and near-duplicate images, conflicting labels and train/test leakage"
    )
    audit.add_argument("path")
    audit.add_argument(
        "--out", required=True, help="folder for audit.json, audit.md, audit.html and exclude.txt"
    )
    audit.add_argument("--config", help="audit this config's split (data settings, test_size, split_seed)")
    audit.add_argument("--classes", help="class names for JSONL/CSV data")
    audit.add_argument(
        "--max-distance",
        type=cli_number(NonNegativeCount),
        default=8,
        help="largest perceptual-hash distance (bits of 64) still called a near-duplicate (default 8)",
    )
    audit.add_argument(
        "--workers",
        type=cli_number(Count),
        default=min(8, os.cpu_count() or 1),
        help="processes that hash images (default: the CPUs, at most 8)",
    )
    audit.add_argument(
        "--run",
        help="audit this run's recorded split and rank likely label errors with its fine-tuned model "
        "(cleanlab on score-mode probabilities)",
    )
    audit.add_argument(
        "--limit", type=cli_number(Count), help="with --run: score only the first N images of each split"
    )
    audit.add_argument(
        "--force", action="store_true", help="with --run: warn instead of refusing a run whose inputs changed"
    )
    audit.add_argument("--allow-path", action="append", default=[], metavar="DIR", help=_ALLOW_HELP)
    audit.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an audit")
    audit.set_defaults(func=_data_audit)

    export = data_commands.add_parser("export", help="write a dataset as Mistral fine-tuning JSONL")
    export.add_argument("path")
    export.add_argument("--out", required=True)
    export.add_argument("--classes", help="class names for JSONL/CSV data")
    export.add_argument("--image-longest-edge", type=cli_number(ImageEdge), default=300)
    export.add_argument("--allow-path", action="append", default=[], metavar="DIR", help=_ALLOW_HELP)
    export.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an export")
    export.set_defaults(func=_data_export)
