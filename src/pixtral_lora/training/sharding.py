"""Sharded training (FSDP through `accelerate launch`): the layers it wraps, and the CPU rehearsal.

accelerate reads an FSDP launch config into environment variables (`ACCELERATE_USE_FSDP`, `FSDP_*`)
and builds its plugin from them inside the Trainer. Two things are ours:

- the blocks FSDP wraps come from the model's family (`Family.shard_layers`), unless the launch
  config names them (`fsdp_transformer_layer_cls_to_wrap`);
- accelerate 1.x applies FSDP to accelerator launches only: on a machine without a GPU the same
  launch trains plain data parallel, each process holding the whole model. `train/fsdp_cpu.yaml`
  rehearses sharding on CPU (gloo) by setting the Trainer's Accelerator to FSDP before it prepares
  the model (`rehearse_on_cpu`); torch's FSDP1 and FSDP2 both run on CPU with gloo. `check_sharded` then
  proves the model really was sharded, so no launch trains unsharded while calling itself FSDP.
"""

from __future__ import annotations

import logging
import os

import torch

from pixtral_lora.errors import UserError
from pixtral_lora.families import Family

logger = logging.getLogger(__name__)


def fsdp_launch(env=os.environ) -> bool:
    """Whether `accelerate launch` was given an FSDP config."""
    return env.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def fsdp_version(env=os.environ) -> int:
    return int(env.get("FSDP_VERSION", "1"))


def _world_size(env) -> int:
    return int(env.get("WORLD_SIZE", "1"))


def prepare_sharding(family: Family, saved_config: dict, env=os.environ) -> None:
    """Before the Trainer exists: under an FSDP launch, the family's layers to wrap (unless the config names them)."""
    if fsdp_launch(env) and not env.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        env["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(family.shard_layers(saved_config))
        env.setdefault("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")


def rehearse_on_cpu(accelerator, env=os.environ) -> bool:
    """On a CPU FSDP launch, set the Trainer's just-built Accelerator to FSDP; whether it did.

    Called after the Accelerator exists and before it prepares the model. accelerate's state is
    shared by the process (TrainingArguments resets and rebuilds it, so earlier is too early): the
    FSDP plugin it built from the launch's variables and dropped on CPU is built again and installed.
    """
    if not fsdp_launch(env) or torch.cuda.is_available() or _world_size(env) < 2:
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    # FSDP1 compares its `device_id` (accelerate's device: "cpu:0" on every rank) with the device of
    # the parameters ("cpu"); CPU tensors carry no index, so neither does the device here.
    PartialState().device = state.device = torch.device("cpu")
    logger.info(
        "FSDP%d on CPU (gloo), %d processes: a rehearsal of sharding",
        state.fsdp_plugin.fsdp_version,
        _world_size(env),
    )
    return True


def sharded_modules(model) -> int:
    """How many modules of `model` FSDP (1 or 2) wraps."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return sum(isinstance(module, FSDPModule | FullyShardedDataParallel) for module in model.modules())


def check_sharded(model, env=os.environ) -> None:
    """Under an FSDP launch, raise unless the prepared model is sharded (never train unsharded silently)."""
    if fsdp_launch(env) and _world_size(env) > 1 and sharded_modules(model) == 0:
        raise UserError(
            "accelerate launch with an FSDP config prepared a model that is not sharded (this accelerate "
            "applied data parallel instead): nothing trained; see the README's launch table"
        )


def parameters_sharded(trainer) -> bool:
    """Whether no process holds the whole trained model (FSDP, DeepSpeed ZeRO-3): saving gathers it
    on every process, and nothing runs the model on the main process alone."""
    if trainer.is_fsdp_enabled:
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def calibrate_alone(run_dir) -> None:
    """`pixtral-lora calibrate RUN` in a fresh single process, from the saved adapter.

    After sharded training no process holds the model, and this one cannot load it alone either:
    under ZeRO-3 transformers builds every model inside DeepSpeed's partitioned init (a collective),
    and its patched module classes outlive the run. A process without the launch's variables can.
    """
    import subprocess
    import sys

    launch = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    )
    env = {
        k: v for k, v in os.environ.items() if k not in launch and not k.startswith(("ACCELERATE_", "FSDP_"))
    }
    result = subprocess.run([sys.executable, "-m", "pixtral_lora.cli", "calibrate", str(run_dir)], env=env)
    if result.returncode != 0:
        raise RuntimeError(f"calibrating {run_dir} failed (exit {result.returncode}): see the lines above")


def peak_memory_per_process() -> list[float] | None:
    """Each process's peak CUDA memory allocated by torch, in GiB (every process must call it)."""
    if not torch.cuda.is_available():
        return None
    from accelerate.utils import gather_object

    return gather_object([torch.cuda.max_memory_allocated() / 2**30])


def full_state_dict(trainer) -> dict:
    """The whole trained model's state dict on the main process (every process must call it)."""
    return separate_storage(trainer.accelerator.get_state_dict(trainer.model_wrapped))


def separate_storage(state_dict: dict | None) -> dict | None:
    """Each tensor in its own storage. FSDP1's gathered state dict holds views of one flat buffer per
    wrapped block, and safetensors' writers (peft's `save_pretrained`) keep one tensor per storage as
    "shared": a 32-tensor adapter was saved as 4. Cloning costs the adapter's size."""
    if state_dict is None:
        return None
    return {
        name: tensor.clone() if isinstance(tensor, torch.Tensor) else tensor
        for name, tensor in state_dict.items()
    }
