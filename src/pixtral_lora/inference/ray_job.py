"""`predict`/`map --num-processes N [--ray-address ADDRESS]`: the inputs as a Ray Data job over N replicas.

The inputs (predict's images, map's tile windows) are a Ray dataset; `map_batches` runs them
through N actors, each holding one engine (`RunClassifier`, the same class every process of
`predict` and `map` uses: transformers or a vLLM engine, by `--backend`), and the driver writes
each batch of rows to its journal as it comes back. What makes it exactly once:

- an actor that dies (a SIGKILLed process) is restarted by Ray and its unfinished batch run again;
  a batch's rows reach the driver once, from the attempt that finished;
- a driver that dies leaves its journal: the rerun skips every input already written (predict:
  path + sha256, as without Ray; map: the tile's key), and the final file holds each input once, in
  input order.

`ray.data.llm`'s vLLM processor is not used: it builds its own prompts from OpenAI messages and has
no score mode, and its API has moved between Ray releases (ray#53873, ray#64275, ray#57978); an
actor class holding our engine keeps the rows, modes and calibration of the one-process path.
ADDRESS: `local` (the default) starts a cluster in this process, stopped when the job ends; `auto`
or HOST:PORT joins a running one (`ray start --head`, then `ray start --address HEAD:6379` on the
other machines). This replaced predict's own launcher of N processes over gloo.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from tqdm import tqdm

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray job runs."""

    address: str  # "local" (a cluster in this process), "auto" or HOST:PORT
    replicas: int  # actors, each holding one engine
    batch_size: int  # inputs per batch (one call of `work`)


class _Replica:
    """One engine: a `RunClassifier` of the run, loaded once per actor, and the work done per batch."""

    def __init__(self, classifier_args: tuple, work):
        from pixtral_lora.inference.classifier import RunClassifier

        self.classify, self.work = RunClassifier(*classifier_args), work

    def __call__(self, batch: dict) -> dict:
        rows, skipped = self.work(self.classify, list(batch["item"]))
        # one output row per batch: the rows as JSON (column types stay plain), and the skipped count
        return {
            "rows": [json.dumps(rows, ensure_ascii=False)],
            "skipped": [skipped],
            "inputs": [len(batch["item"])],
        }


def _connect(address: str, replicas: int) -> bool:
    """Ray connected; True when this call started it (and the job's end shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        # on this machine's loopback only: nothing listens on another interface
        ray.init(
            num_cpus=max(replicas, 1),
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    else:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return True


def run_on_ray(
    classifier_args: tuple, items: list, work, writer, options: RayOptions, desc: str
) -> tuple[int, float]:
    """Every input of `items` through `options.replicas` Ray actors, each building its own
    `RunClassifier(*classifier_args)` and calling `work(classify, batch) -> (rows, skipped)` per
    batch; each batch's rows go to `writer.write` as they come back (then `writer.close()`). The
    number skipped (as already done) and the seconds it took."""
    import ray

    started_ray = _connect(options.address, options.replicas)
    try:
        return _run(classifier_args, items, work, writer, options, desc)
    finally:
        if started_ray:  # a local cluster stops with its job; a joined one only loses this driver
            ray.shutdown()


def _run(
    classifier_args: tuple, items: list, work, writer, options: RayOptions, desc: str
) -> tuple[int, float]:
    import ray

    dataset = ray.data.from_items(
        [{"item": item} for item in items], override_num_blocks=max(1, len(items) // options.batch_size)
    )
    # a GPU each where the cluster has them (Ray sets CUDA_VISIBLE_DEVICES per actor), else a CPU each
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    results = dataset.map_batches(
        _Replica,
        fn_constructor_args=(classifier_args, work),
        batch_size=options.batch_size,
        # a fixed pool, one batch at a time per replica: the batches spread over every replica. Ray
        # Data's actor pool restarts an actor that dies and retries its batch (max_restarts and
        # max_task_retries -1 by default; tests/inference/test_ray_predict.py kills one)
        compute=ray.data.ActorPoolStrategy(size=options.replicas, max_tasks_in_flight_per_actor=1),
        num_cpus=0 if gpus else 1,
        num_gpus=gpus,
        batch_format="default",
    )
    skipped = 0
    started = time.perf_counter()
    progress = tqdm(
        total=len(items), desc=f"{desc} (Ray, {options.replicas} replicas)", unit="input", disable=None
    )
    try:
        for batch in results.iter_rows():
            writer.write(json.loads(batch["rows"]))
            skipped += int(batch["skipped"])
            progress.update(int(batch["inputs"]))
    finally:
        progress.close()
        writer.close()
    return skipped, time.perf_counter() - started
