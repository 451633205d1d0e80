"""Tiny stages for runner tests: a sharded source and a reducer, both doing real Ray work."""

from __future__ import annotations

import json
import os
import time

from mmflow.data.shards import map_shards, stats_uri
from mmflow.stage import Params, Resources, Stage, StageContext, register
from mmflow.storage import join


class NumbersParams(Params):
    n: int = 4
    offset: int = 0


def _write_number(shard: int, folder: str, offset: int, storage) -> dict:
    storage.write_json(join(folder, f"{shard:05d}.json"), {"value": shard + offset})
    stats = {"count": 1, "successes": 1}
    storage.write_json(stats_uri(folder, shard), stats)
    return stats


@register
class ToyNumbers(Stage):
    type = "toy_numbers"
    Params = NumbersParams
    outputs = {"numbers": "table"}
    resources = Resources(cpus=1, workers=0)
    resumable = True

    def run(self, ctx: StageContext) -> None:
        folder = ctx.outputs["numbers"]
        stats = map_shards(
            _write_number,
            list(range(ctx.params.n)),
            folder,
            args=(folder, ctx.params.offset, ctx.storage),
            desc=ctx.stage,
            storage=ctx.storage,
        )
        ctx.record_output("numbers", num_rows=len(stats))


class SumParams(Params):
    scale: int = 1
    fail_once_marker: str = ""  # when set and the file is absent: create it and fail


def _sum(folder: str, storage) -> int:
    return sum(
        storage.read_json(f.uri)["value"]
        for f in storage.ls(folder)
        if f.name.endswith(".json") and not f.name.endswith("_stats.json")
    )


@register
class ToySum(Stage):
    type = "toy_sum"
    Params = SumParams
    inputs = {"numbers": "table"}
    outputs = {"total": "table"}

    def run(self, ctx: StageContext) -> None:
        import ray

        marker = ctx.params.fail_once_marker
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("injected failure")
        total = (
            ray.get(ray.remote(_sum).remote(ctx.inputs["numbers"].uri, ctx.storage))
            * ctx.params.scale
        )
        ctx.storage.write_atomic(
            join(ctx.outputs["total"], "total.json"),
            json.dumps({"total": total, "written_at": time.time()}).encode(),
        )
        # a kill point for tests: the output is written, the commit not yet made
        time.sleep(float(os.environ.get("MMFLOW_TOY_SUM_SLEEP", "0")))
        ctx.log_metrics({"total": total})
