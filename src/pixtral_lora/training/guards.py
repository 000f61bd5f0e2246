"""Stop a run that has stopped learning: a logged loss of exactly 0.0, or a non-finite loss or
gradient norm, for `training.stop_after_bad_logs` logging steps in a row.

The symptom is what a broken setup looks like from the outside: float16 weights without loss scaling,
FSDP with 4-bit weights in uint8 storage (accelerate#3983), a learning rate that overflows. The
Trainer would go on and save checkpoints of NaN weights; here no checkpoint is saved once a bad step
is logged, the run stops, and `DivergedError` names the step, what was seen, the likely causes and
the last good checkpoint (a rerun resumes from it).
"""

from __future__ import annotations

import math
from pathlib import Path

from pixtral_lora.errors import UserError


class DivergedError(UserError):
    pass


def _bad(logs: dict) -> str | None:
    loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
    if loss is not None and not math.isfinite(loss):
        return f"loss {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"loss {loss}, grad-norm {grad_norm}"
    if loss == 0.0:
        return "loss exactly 0.0"
    return None


def divergence_guard(limit: int, model_dtype: str):
    """A TrainerCallback that stops training after `limit` bad logging steps in a row."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def __init__(self):
            self.in_a_row = 0
            self.first: tuple[int, str] | None = None
            self.stopped: str | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            seen = _bad(logs)
            if seen is None:
                self.in_a_row, self.first = 0, None
                return
            control.should_save = False  # never a checkpoint of these weights
            self.in_a_row += 1
            self.first = self.first or (state.global_step, seen)
            if self.in_a_row >= limit:
                control.should_training_stop = True
                self.stopped = self._message(args, state)

        def _message(self, args, state) -> str:
            step, seen = self.first
            checkpoints = sorted(
                Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
            )
            good = [p for p in checkpoints if int(p.name.split("-")[-1]) < step]
            kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved before it"
            causes = "a learning rate too high for this model"
            if model_dtype == "float16":
                causes = "float16 weights overflow without loss scaling (use bfloat16 or float32)"
            return (
                f"training stopped at step {state.global_step}: {seen} from step {step} on, {limit} logging "
                f"steps in a row (training.stop_after_bad_logs); likely {causes}, or 4-bit "
                f"weights sharded in uint8 storage; {kept}, no adapter was written"
            )

    return DivergenceGuard()
