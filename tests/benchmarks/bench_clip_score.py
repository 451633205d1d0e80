"""Benchmark: clip_filter's scoring throughput against a bare open_clip loop.

Scores the same N synthetic pairs twice, with the same model (random weights: speed does not depend
on them), batch size and torch threads:

- stage: the ``clip_filter`` stage, run by the runner on a local Ray: the whole stage, reading the
  shards, decoding, preprocessing and scoring on Ray Data, the Parquet table, the filter decision,
  the resharded output and the logged pictures (the stage's ``duration_s``);
- bare: one process, a plain loop of ``encode_image`` / ``encode_text`` / cosine over images and
  captions decoded, preprocessed and tokenized beforehand (not timed).

The default model is ViT-B-32 at 224 px, the usual small filtering CLIP, where inference is most
of the work as in real filtering. The stage's fixed costs (starting two actors, each importing
torch and open_clip, about 20 s on two idle cores; writing the output; the pictures) weigh less
as N grows: the defaults take about 10 minutes on two cores, half of it in each loop.

    python tests/benchmarks/bench_clip_score.py [--n 1024] [--arch ViT-B-32] [--batch-size 32] [--threads 1]

The last line printed is one JSON object: n, arch, batch_size, threads, stage_s, stage_sps,
bare_s, bare_sps, ratio (stage_sps / bare_sps).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import textwrap
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from mmflow.stage import Resources, Stage, StageContext  # noqa: E402


class RandomClip(Stage):
    """A model output holding a randomly initialised open_clip architecture (``--arch``)."""

    type = "bench_random_clip"
    outputs = {"model": "model"}
    resources = Resources(workers=0)
    arch = "ViT-B-32"

    def run(self, ctx: StageContext) -> None:
        import open_clip
        import torch

        from mmflow.models.clip import model_config, save_clip

        torch.manual_seed(0)
        model = open_clip.create_model(self.arch)
        with tempfile.TemporaryDirectory() as tmp:
            save_clip(model, self.arch, model_config(self.arch), tmp, source="bench")
            ctx.storage.upload_dir(tmp, ctx.outputs["model"])


def bare_loop(model_dir: str, shards_dir: str, batch_size: int, threads: int) -> tuple[int, float]:
    """(pairs, seconds) of a plain single-process scoring loop over pre-decoded inputs."""
    import torch
    from PIL import Image

    from mmflow.data.shards import list_shards
    from mmflow.data.webdataset_io import iter_shard
    from mmflow.models.clip import load_clip, resolve
    from mmflow.storage import Storage

    torch.set_num_threads(threads)
    clip = load_clip(resolve(None, model_uri=model_dir))
    images, captions = [], []
    for uri in list_shards(Storage(), shards_dir):
        for s in iter_shard(Storage(), uri):
            images.append(clip.preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")))
            captions.append(s.caption)
    batches = [
        (torch.stack(images[i : i + batch_size]), clip.tokenizer(captions[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    scores = []
    start = time.perf_counter()
    with torch.inference_mode():
        for x, t in batches:
            img = clip.model.encode_image(x, normalize=True)
            txt = clip.model.encode_text(t, normalize=True)
            scores.append((img * txt).sum(-1))
    return len(torch.cat(scores)), time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="pairs to score")
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for inference, both ways")
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args(argv)

    import ray

    from mmflow.config import load_pipeline
    from mmflow.runner import Runner

    RandomClip.arch = args.arch
    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False,
             configure_logging=False, log_to_driver=False)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        path = os.path.join(tmp, "pipeline.yaml")
        with open(path, "w") as f:
            f.write(
                textwrap.dedent(f"""\
                name: bench
                storage: {tmp}/store
                tracking_uri: sqlite:///{tmp}/mlflow.db
                stages:
                  synth:
                    type: synth_shapes
                    params: {{num_samples: {args.n}, samples_per_shard: {args.shard_size}}}
                  model:
                    type: __main__:RandomClip
                  filter:
                    type: clip_filter
                    inputs: {{shards: synth, model: model}}
                    params: {{batch_size: {args.batch_size}, threshold: null, samples_per_shard: {args.n}}}
                    resources: {{cpus: {args.threads}, workers: 1}}
                """)
            )
        runner = Runner(load_pipeline(path))
        runner.run()
        stage_s = runner.manifest("filter")["duration_s"]
        model_dir = runner.manifest("model")["outputs"]["model"]["uri"]
        shards_dir = runner.manifest("synth")["outputs"]["shards"]["uri"]
        ray.shutdown()  # the bare loop gets the machine to itself, as the stage had
        n, bare_s = bare_loop(model_dir, shards_dir, args.batch_size, args.threads)
    assert n == args.n, (n, args.n)
    result = {
        "n": args.n,
        "arch": args.arch,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "stage_s": round(stage_s, 2),
        "stage_sps": round(args.n / stage_s, 2),
        "bare_s": round(bare_s, 2),
        "bare_sps": round(args.n / bare_s, 2),
    }
    result["ratio"] = round(result["stage_sps"] / result["bare_sps"], 3)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
