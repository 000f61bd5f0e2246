"""The run directory's file names, in one place: what train.py writes and every other command reads.

RUN/config.yaml        the validated config, as trained
RUN/split.json         class names and every split's image ids (and the unreadable ones)
RUN/environment.json   library versions, device
RUN/data_report.json   samples skipped and why
RUN/adapter/           the final LoRA adapter (+ base_model.json: the base it was trained on)
RUN/checkpoints/       the trainer's checkpoints, for resuming (each with its base_model.json)
RUN/calibration.json   score mode's temperature (`pixtral-lora calibrate`)
RUN/train_summary.json the last step, best checkpoint and the settings the adapter was trained with
"""

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
ENVIRONMENT_FILE = "environment.json"
DATA_REPORT_FILE = "data_report.json"
ADAPTER_DIR = "adapter"
BASE_MODEL_FILE = "base_model.json"  # inside ADAPTER_DIR and each checkpoint
CHECKPOINTS_DIR = "checkpoints"
CALIBRATION_FILE = "calibration.json"
TRAIN_SUMMARY_FILE = "train_summary.json"
