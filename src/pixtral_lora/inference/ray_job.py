"""`predict --ray-address ADDRESS --num-processes N`: the inputs as a Ray Data job over N replicas.

The inputs are a Ray dataset; `map_batches` runs them through N actors, each holding one engine
(`RunClassifier`: transformers here, the same class every process of `predict` uses), and the
driver writes each batch of rows to its journal as it comes back. What makes it exactly once:

- an actor that dies (a SIGKILLed process) is restarted by Ray and its unfinished batch run again;
  a batch's rows reach the driver once, from the attempt that finished;
- a driver that dies leaves its journal: the rerun skips every input already written with the same
  content (path + sha256, as without Ray), and the final file holds each input once, in input order
  (`predict._finalise`).

`ray.data.llm`'s vLLM processor is not used: it builds its own prompts from OpenAI messages and has
no score mode, and its API has moved between Ray releases (ray#53873, ray#64275, ray#57978); an
actor class holding our engine keeps the rows, modes and calibration of the one-process path.
ADDRESS: `local` starts a cluster in this process; `auto` or HOST:PORT joins a running one
(`ray start --head`, then `ray start --address HEAD:6379` on the other machines).
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

logger = logging.getLogger(__name__)


class _Replica:
    """One engine: a `RunClassifier` of the run, loaded once per actor."""

    def __init__(
        self,
        classifier_args: tuple,
        predict_batch,
        done_sha: dict,
        mode: str,
        batch_size: int,
        model: str,
        warning,
    ):
        import ray

        from pixtral_lora.inference.classifier import RunClassifier

        self.classify = RunClassifier(*classifier_args)
        done_sha = ray.get(done_sha) if isinstance(done_sha, ray.ObjectRef) else done_sha  # put once, shared
        self.predict_batch, self.done_sha, self.mode, self.batch_size = (
            predict_batch,
            done_sha,
            mode,
            batch_size,
        )
        self.model, self.warning = model, warning

    def __call__(self, batch: dict) -> dict:
        import json

        rows, skipped = self.predict_batch(
            self.classify,
            list(batch["item"]),
            self.done_sha,
            self.mode,
            self.batch_size,
            self.model,
            self.warning,
        )
        # one output row per batch: the rows as JSON (column types stay plain), and the skipped count
        return {
            "rows": [json.dumps(rows, ensure_ascii=False)],
            "skipped": [skipped],
            "inputs": [len(batch["item"])],
        }


def _connect(address: str, replicas: int) -> None:
    import ray

    if ray.is_initialized():
        return
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


def predict_on_ray(
    classify,
    classifier_args: tuple,
    items: list,
    done_sha: dict,
    writer,
    predict_batch,
    options,
    model: str,
    warning,
) -> tuple[int, float]:
    """Every input of `items` predicted by `options.replicas` Ray actors, each building its own
    `RunClassifier(*classifier_args)` (each batch through
    `predict_batch`, predict's own) into `writer` (FILE's journal); the number skipped as done, and
    the seconds it took. `predict_archive` then writes FILE."""
    import json

    import ray

    batch_size = options.batch_size or classify.config.eval.batch_size
    _connect(options.ray_address, options.replicas)
    dataset = ray.data.from_items(
        [{"item": item} for item in items], override_num_blocks=max(1, len(items) // batch_size)
    )
    results = dataset.map_batches(
        _Replica,
        fn_constructor_args=(
            classifier_args,
            predict_batch,
            ray.put(done_sha),
            options.mode,
            batch_size,
            model,
            warning,
        ),
        batch_size=batch_size,
        concurrency=options.replicas,
        num_cpus=1,
        batch_format="default",
        max_restarts=-1,  # an actor that dies is started again, its batch retried
        max_task_retries=-1,
    )
    skipped = 0
    started = time.perf_counter()
    progress = tqdm(total=len(items), desc=f"predicting ({options.mode}, Ray, {options.replicas} replicas)",
                    unit="img", disable=None)  # fmt: skip
    try:
        for batch in results.iter_rows():
            writer.write(json.loads(batch["rows"]))
            skipped += int(batch["skipped"])
            progress.update(int(batch["inputs"]))
    finally:
        progress.close()
        writer.close()
    return skipped, time.perf_counter() - started
