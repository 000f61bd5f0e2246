"""Fine-tune Pixtral with LoRA/QLoRA on an image-classification dataset.

    accelerate launch train.py configs/aid.yaml                       # Pixtral-12B on AID, one GPU
    accelerate launch train.py configs/aid.yaml --set training.learning_rate=2e-4
    python train.py configs/tiny.yaml                                  # tiny model, CPU minutes

A rerun with the same config resumes from the last checkpoint in `training.output_dir`.
The recipe itself lives in src/pixtral_lora/training/recipe.py.
"""

import argparse
import logging
import sys

from pixtral_lora.config.yaml_loading import load_config
from pixtral_lora.errors import user_errors
from pixtral_lora.training.recipe import train


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set training.max_steps=10",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="'auto' (default): continue from the last checkpoint of the run directory; "
        "'never': start over; or a checkpoint path",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        run_dir = train(config, resume=args.resume)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir} (adapter in {run_dir / 'adapter'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
