"""Benchmark: ``joint_train``'s training throughput against a bare PyTorch loop, and the
KV-cache sampler against a loop that recomputes the whole sequence at every step.

One run, side by side, the same model (``--arch``, random weights: speed does not depend on
them), batch and torch threads:

- stage (DDP and DeepSpeed ZeRO-2): the ``joint_train`` stage run by the runner on a local
  Ray, the token table streaming through Ray Data; its steady-state tokens/s is the harmonic
  mean of the ``train/tokens_per_s`` the harness logged after the first ``--warmup`` steps
  (windows of equal steps: the tokens over the time, as for the bare loop, so a slow window,
  an epoch boundary say, counts as it does in wall time; a median hid it);
- bare: a fresh process (Ray stopped), the same model and AdamW, sequences built beforehand
  and kept in memory, timed after the same warm-up; run before, between and after the two
  stage runs, each stage compared with the mean of the bare runs on either side of it (on a
  shared machine the speed drifts over minutes: one bare run at the end once put DDP at 0.66
  and ZeRO-2 at 0.82 although their whole runs took the same time);
- sampling: ``--prompts`` pictures drawn with classifier-free guidance by the KV-cache sampler
  and by the no-cache loop (``mmflow.generate.sampling.sample_no_cache``).

    python tests/benchmarks/bench_joint.py [--steps 120] [--warmup 40] [--batch-size 32] [--threads 2]

The last line printed is one JSON object with train_ratio_ddp, train_ratio_zero2 (stage /
bare tokens/s) and sample_speedup (cached / no-cache images/s), and the figures behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PIPELINE = """
name: bench
storage: {work}/store
tracking_uri: sqlite:///{work}/mlflow.db
stages:
  synth:
    type: synth_shapes
    params: {{num_samples: 2048, samples_per_shard: 512, image_size: 32}}
  vq:
    type: tests.stages.test_joint_train:RandomVqgan
  tok:
    type: pretokenize
    inputs: {{shards: synth, model: vq}}
    params: {{vocab_size: 512, preview: 0}}
  joint:
    type: joint_train
    inputs: {{tokens: tok.tokens, vqgan: vq}}
    params:
      arch: {arch}
      val_rows: 0
      train: {{strategy: {strategy}, zero_stage: 2, max_steps: {steps}, batch_size: {batch},
              log_every: 10, checkpoint_every: 0, warmup_steps: 10}}
    resources: {{cpus: {threads}, workers: 1}}
"""


def _runner(work: str, a, strategy: str):
    from mmflow.config import load_pipeline
    from mmflow.runner import Runner

    path = os.path.join(work, f"{strategy}.yaml")
    with open(path, "w") as f:
        f.write(textwrap.dedent(PIPELINE.format(work=work, arch=a.arch, strategy=strategy,
                                                steps=a.steps, batch=a.batch_size,
                                                threads=a.threads)))  # fmt: skip
    return Runner(load_pipeline(path))


def stage_tokens_per_s(work: str, a, strategy: str) -> tuple[float, dict]:
    from mlflow import MlflowClient

    runner = _runner(work, a, strategy)
    runner.run()
    row = {r.name: r for r in runner.status()}["joint"]
    history = MlflowClient(runner.p.tracking_uri).get_metric_history(
        row.mlflow_run_id, "train/tokens_per_s"
    )
    steady = [m.value for m in history if m.step > a.warmup]
    return statistics.harmonic_mean(steady), row.outputs


def bare_tokens_per_s(tokens_uri: str, a) -> float:
    """The same model, batch and threads, on sequences built beforehand, in one process."""
    import pyarrow.parquet as pq
    import torch

    from mmflow.data.token_table import read_metadata, table_files
    from mmflow.models.joint import create_joint
    from mmflow.stages.joint_train import _longest_caption

    torch.set_num_threads(a.threads)
    files = table_files(tokens_uri)
    meta = read_metadata(pq.read_schema(files[0]))
    t = pq.read_table(files[0], columns=["text_ids", "image_tokens"])
    torch.manual_seed(0)
    model, vocab = create_joint(a.arch, int(meta["text_vocab_size"]), int(meta["codebook_size"]),
                                int(meta["grid_h"]) * int(meta["grid_w"]),
                                _longest_caption(files))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    texts, images = t["text_ids"].to_pylist(), t["image_tokens"].to_pylist()
    batches = []
    for i in range(0, len(texts) - a.batch_size + 1, a.batch_size):
        seq = vocab.batch(texts[i : i + a.batch_size], images[i : i + a.batch_size],
                          i2t_share=0.3, cond_dropout=0.1, generator=gen)  # fmt: skip
        batches.append(seq.inputs_targets())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = None
    for step in range(a.steps):
        if step == a.warmup:
            start = time.perf_counter()
        inputs, targets = batches[step % len(batches)]
        _, losses = model(inputs, targets)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return (a.steps - a.warmup) * a.batch_size * vocab.seq_len / elapsed


def sampling_speedup(model_dir: str, a) -> dict:
    import torch

    from mmflow.generate.sampling import SamplingConfig, sample, sample_no_cache
    from mmflow.models.joint import load_joint

    torch.set_num_threads(a.threads)
    model, vocab, _ = load_joint(model_dir)
    prompts = torch.stack([vocab.t2i_prefix([1, 2, 3]) for _ in range(a.prompts)])
    uncond = vocab.t2i_prefix(drop_text=True)[None]
    cfg = SamplingConfig(guidance_scale=3.0, seed=0)
    out = {}
    for name, fn in (("cached", sample), ("no_cache", sample_no_cache)):
        start = time.perf_counter()
        with torch.no_grad():
            fn(model, prompts, vocab.image_tokens, cfg, allowed=vocab.image_range,
               uncond_prefix=uncond)  # fmt: skip
        out[f"{name}_images_per_s"] = a.prompts / (time.perf_counter() - start)
    out["sample_speedup"] = out["cached_images_per_s"] / out["no_cache_images_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="joint-small")  # the 3.6M model of the recorded figures
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--bare-from", help=argparse.SUPPRESS)  # internal: the bare loop alone
    a = p.parse_args()
    if a.bare_from:
        print(json.dumps({"bare_tokens_per_s": bare_tokens_per_s(a.bare_from, a)}))
        return
    import subprocess

    import ray

    def bare(tokens: str) -> float:
        """The bare loop in a fresh process, Ray stopped meanwhile (the next stage run starts
        it again): the bare loop gets the machine to itself."""
        ray.shutdown()
        args = [sys.executable, __file__, "--bare-from", tokens, "--arch", a.arch,
                "--steps", str(a.steps), "--warmup", str(a.warmup),
                "--batch-size", str(a.batch_size), "--threads", str(a.threads)]  # fmt: skip
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["bare_tokens_per_s"]

    with tempfile.TemporaryDirectory(prefix="bench-joint-") as work:
        # The machine's speed drifts over minutes: each stage run is compared with the bare
        # loop run right before and right after it (their mean), not with one run at the end.
        _runner(work, a, "ddp").run(only=["synth", "vq", "tok"])
        tokens = os.path.join(work, _tokens_folder(work))
        bares = [bare(tokens)]
        ddp, outputs = stage_tokens_per_s(work, a, "ddp")
        bares.append(bare(tokens))
        zero2, _ = stage_tokens_per_s(work, a, "deepspeed")
        bares.append(bare(tokens))  # Ray stopped: the sampler gets the machine to itself
        sampling = sampling_speedup(outputs["model"], a)
    result = {
        "arch": a.arch, "batch_size": a.batch_size, "threads": a.threads, "steps": a.steps,
        "stage_ddp_tokens_per_s": ddp, "stage_zero2_tokens_per_s": zero2,
        "bare_tokens_per_s": bares, "train_ratio_ddp": ddp / statistics.mean(bares[:2]),
        "train_ratio_zero2": zero2 / statistics.mean(bares[1:]), **sampling,
    }  # fmt: skip
    print(json.dumps(result))


def _tokens_folder(work: str) -> str:
    import glob

    [folder] = glob.glob(os.path.join(work, "store", "bench", "tok", "*", "tokens"))
    return os.path.relpath(folder, work)


if __name__ == "__main__":
    main()
