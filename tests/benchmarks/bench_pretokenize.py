"""Benchmark: pretokenize's encoding throughput against a bare loop over the VQ-GAN encoder.

Encodes the same N synthetic images twice, with the same model (random weights: speed does not
depend on them), batch size and torch threads:

- stage: the ``pretokenize`` stage, run by the runner on a local Ray: the whole stage, training
  the BPE tokenizer on the captions, reading the shards, decoding and preprocessing the images,
  encoding them on Ray Data, writing the Parquet table (the stage's ``duration_s``);
- bare: one process, a plain loop of ``model.tokenize`` over image batches decoded and
  preprocessed beforehand (not timed).

The default model is ``vqgan-f16-256`` at 256 px, the architecture real token data is made with,
where the encoder is most of the work as in real pre-tokenization. The stage's fixed costs
(starting the actors, each importing torch; the tokenizer task; writing) weigh less as N grows:
the defaults take about 8 minutes on two cores. With the quickstart's tiny model the encoder is so
cheap that fixed costs dominate unless N is in the tens of thousands.

    python tests/benchmarks/bench_pretokenize.py [--n 96] [--arch vqgan-f16-256] [--batch-size 8] [--threads 1]

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


class RandomVqgan(Stage):
    """A model output holding a randomly initialised VQ-GAN architecture (``--arch``)."""

    type = "bench_random_vqgan"
    outputs = {"model": "model"}
    resources = Resources(workers=0)
    arch = "vqgan-f16-256"

    def run(self, ctx: StageContext) -> None:
        import torch

        from mmflow.models.vqgan import create_vqgan, save_vqgan

        torch.manual_seed(0)
        model, _ = create_vqgan(self.arch)
        with tempfile.TemporaryDirectory() as tmp:
            save_vqgan(model, tmp, self.arch, source="bench")
            ctx.storage.upload_dir(tmp, ctx.outputs["model"])


def bare_loop(model_dir: str, shards_dir: str, batch_size: int, threads: int) -> tuple[int, float]:
    """(images, seconds) of a plain single-process encoding loop over pre-decoded inputs."""
    import torch
    from PIL import Image

    from mmflow.data.shards import list_shards
    from mmflow.data.webdataset_io import iter_shard
    from mmflow.models.vqgan import load_vqgan
    from mmflow.storage import Storage

    torch.set_num_threads(threads)
    model, preprocess, _ = load_vqgan(model_dir)
    images = [
        preprocess(Image.open(io.BytesIO(s.image)))
        for uri in list_shards(Storage(), shards_dir)
        for s in iter_shard(Storage(), uri)
    ]
    batches = [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    tokens = []
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            tokens.append(model.tokenize(x))
    return len(torch.cat(tokens)), time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="images to encode")
    ap.add_argument("--arch", default="vqgan-f16-256", help="VQ-GAN architecture (random weights)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for encoding, both ways")
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args(argv)

    import ray

    from mmflow.config import load_pipeline
    from mmflow.models.vqgan import vqgan_config
    from mmflow.runner import Runner

    RandomVqgan.arch = args.arch
    size = vqgan_config(args.arch).image_size
    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False,
             configure_logging=False, log_to_driver=False)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-pretok-") as tmp:
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
                    params: {{num_samples: {args.n}, samples_per_shard: {args.shard_size}, image_size: {size}}}
                  model:
                    type: __main__:RandomVqgan
                  tokens:
                    type: pretokenize
                    inputs: {{shards: synth, model: model}}
                    params: {{batch_size: {args.batch_size}, preview: 0, vocab_size: 1000}}
                    resources: {{cpus: {args.threads}, workers: 1}}
                """)
            )
        runner = Runner(load_pipeline(path))
        runner.run()
        stage_s = runner.manifest("tokens")["duration_s"]
        rows = runner.manifest("tokens")["outputs"]["tokens"]["num_rows"]
        model_dir = runner.manifest("model")["outputs"]["model"]["uri"]
        shards_dir = runner.manifest("synth")["outputs"]["shards"]["uri"]
        ray.shutdown()  # the bare loop gets the machine to itself, as the stage had
        n, bare_s = bare_loop(model_dir, shards_dir, args.batch_size, args.threads)
    assert n == rows == args.n, (n, rows, args.n)
    result = {
        "n": args.n,
        "arch": args.arch,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "stage_s": round(stage_s, 2),
        "stage_sps": round(args.n / stage_s, 3),
        "bare_s": round(bare_s, 2),
        "bare_sps": round(args.n / bare_s, 3),
    }
    result["ratio"] = round(result["stage_sps"] / result["bare_sps"], 3)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
