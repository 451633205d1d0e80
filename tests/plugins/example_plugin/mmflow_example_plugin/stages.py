"""``word_count``: counts the words of every caption in a shards folder, in one Ray task per shard."""

from __future__ import annotations

from pydantic import Field

from mmflow.data.shards import list_shards
from mmflow.data.webdataset_io import iter_shard
from mmflow.stage import Params, Resources, Stage, StageContext
from mmflow.storage import join


class WordCountParams(Params):
    min_length: int = Field(1, ge=1, description="words shorter than this are not counted")


def _count(uri: str, min_length: int, storage) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in iter_shard(storage, uri):
        for word in (s.caption or "").lower().split():
            if len(word) >= min_length:
                counts[word] = counts.get(word, 0) + 1
    return counts


class WordCount(Stage):
    type = "word_count"
    version = "1"
    description = "Count caption words (an example third-party stage type)."
    Params = WordCountParams
    inputs = {"shards": "shards"}
    outputs = {"counts": "table"}
    resources = Resources(cpus=1, workers=0)

    def run(self, ctx: StageContext) -> None:
        import ray

        task = ray.remote(_count).options(num_cpus=ctx.resources.cpus)
        uris = list_shards(ctx.storage, ctx.inputs["shards"].uri)
        total: dict[str, int] = {}
        for counts in ray.get([task.remote(u, ctx.params.min_length, ctx.storage) for u in uris]):
            for word, n in counts.items():
                total[word] = total.get(word, 0) + n
        ctx.storage.write_json(join(ctx.outputs["counts"], "counts.json"), total)
        ctx.record_output("counts", num_words=len(total))
        ctx.log_metrics({"num_distinct_words": len(total)})
