"""Benchmark: ``llava_instruct``'s training throughput (DeepSpeed ZeRO-2) against a bare PyTorch
loop over the same model, batch and threads on pre-loaded tensors.

One run, side by side:

- stage: a small pipeline (synth_shapes, a few clip_train steps for a vision tower,
  synth_instructions, lm_train, llava_align) then ``llava_instruct`` for ``--steps`` steps run
  by the runner on a local Ray; its steady-state samples/s is the median of the
  ``train/samples_per_s`` the harness logged after the first ``--warmup`` steps;
- bare: one process, the stage-1 model ``llava_instruct`` starts from, the same trainable
  parts (projector and LM) and AdamW, every batch built beforehand and kept in memory, timed
  after the same warm-up.

    python tests/benchmarks/bench_llava.py [--steps 300] [--warmup 110] [--batch-size 32] [--threads 2]

The last line printed is one JSON object with ``ratio`` (stage / bare samples/s) and the
figures behind it.
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
  clip:
    type: clip_train
    inputs: {{shards: synth}}
    params: {{train: {{max_steps: 5, batch_size: 64}}, eval_samples: 0}}
    resources: {{cpus: {threads}, workers: 1}}
  instructions:
    type: synth_instructions
    inputs: {{shards: synth}}
  lm:
    type: lm_train
    inputs: {{instructions: instructions}}
    params: {{val_rows: 0, train: {{max_steps: 10}}}}
    resources: {{cpus: {threads}, workers: 1}}
  align:
    type: llava_align
    inputs: {{instructions: instructions, lm: lm, clip: clip}}
    params: {{val_rows: 0, train: {{max_steps: 10}}}}
    resources: {{cpus: {threads}, workers: 1}}
  instruct:
    type: llava_instruct
    inputs: {{instructions: instructions, align: align}}
    params:
      val_rows: 0
      vqa_images: 0
      train: {{strategy: deepspeed, zero_stage: 2, max_steps: {steps}, batch_size: {batch},
              log_every: 10, checkpoint_every: 0, warmup_steps: 10}}
    resources: {{cpus: {threads}, workers: 1}}
"""


def stage_samples_per_s(work: str, a) -> tuple[float, dict]:
    from mlflow import MlflowClient

    from mmflow.config import load_pipeline
    from mmflow.runner import Runner

    path = os.path.join(work, "bench.yaml")
    with open(path, "w") as f:
        f.write(
            textwrap.dedent(
                PIPELINE.format(work=work, steps=a.steps, batch=a.batch_size, threads=a.threads)
            )
        )
    runner = Runner(load_pipeline(path))
    runner.run()
    rows = {r.name: r for r in runner.status()}
    history = MlflowClient(runner.p.tracking_uri).get_metric_history(rows["instruct"].mlflow_run_id,
                                                                     "train/samples_per_s")  # fmt: skip
    steady = [m.value for m in history if m.step > a.warmup]
    return statistics.median(steady), {n: r.outputs for n, r in rows.items()}


def bare_samples_per_s(outputs: dict, a) -> float:
    """The stage's model (from the stage-1 folder), batch and threads, batches made beforehand."""
    import numpy as np
    import torch
    from transformers import AutoConfig

    from mmflow.data.instruction_rows import joined_rows, table_pairs
    from mmflow.models.llava import VisionLayout, next_token_loss, pad_batch
    from mmflow.storage import Storage
    from mmflow.tasks.llava import LlavaTask
    from mmflow.tasks.llava_setup import pixels_of_export, tokenizer_json
    from mmflow.train.config import TrainConfig

    torch.set_num_threads(a.threads)
    align = outputs["align"]["model"]
    config = AutoConfig.from_pretrained(align)
    pairs = table_pairs(Storage(), outputs["instructions"]["instructions"])
    task = LlavaTask(
        mode="instruct", sources={"llava": align}, layout=VisionLayout(), image_processor=pixels_of_export(align),
        image_tokens=VisionLayout().image_tokens(config.vision_config),
        data={"pairs": pairs, "kinds": ("conversation",), "holdout_fraction": 0.05, "images": True},
        train=TrainConfig(batch_size=a.batch_size), tokenizer_json=tokenizer_json(align),
        max_len=config.text_config.max_position_embeddings, shuffle_buffer=1, threads=a.threads, save_meta={},
    )  # fmt: skip
    rows = [
        r
        for p in pairs
        for r in joined_rows(p, kinds=("conversation",), split="train", holdout_fraction=0.05)
    ]
    examples = [e for e in map(task.example, rows) if e is not None]
    batches = []
    for i in range(0, len(examples) - a.batch_size + 1, a.batch_size):
        group = examples[i : i + a.batch_size]
        b = pad_batch([(e["ids"], e["labels"]) for e in group], task.chat_ids.pad)
        b["pixel_values"] = torch.from_numpy(np.stack([e["pixels"] for e in group]))
        batches.append(b)
    torch.manual_seed(0)
    model = task.build_model()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    start = None
    for step in range(a.steps):
        if step == a.warmup:
            start = time.perf_counter()
        b = batches[step % len(batches)]
        logits = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                       attention_mask=b["attention_mask"]).logits  # fmt: skip
        loss, _ = next_token_loss(logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (a.steps - a.warmup) * a.batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=110)  # past epoch 1 (~98 steps)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bare-from", help=argparse.SUPPRESS)  # internal: the bare loop alone
    a = p.parse_args()
    if a.bare_from:
        print(json.dumps({"bare_samples_per_s": bare_samples_per_s(json.loads(a.bare_from), a)}))
        return
    import subprocess

    import ray

    from mmflow.ray_env import ensure_ray

    ensure_ray()  # the runner's own local Ray
    with tempfile.TemporaryDirectory(prefix="bench-llava-") as work:
        stage, outputs = stage_samples_per_s(work, a)
        ray.shutdown()
        time.sleep(5)  # Ray's processes gone: the bare loop gets the machine to itself,
        # in a fresh process (one that ran Ray and the runner measured half as fast)
        args = [sys.executable, __file__, "--bare-from", json.dumps(outputs), "--steps", str(a.steps),
                "--warmup", str(a.warmup), "--batch-size", str(a.batch_size), "--threads", str(a.threads)]  # fmt: skip
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        bare = json.loads(out.strip().splitlines()[-1])["bare_samples_per_s"]
    print(json.dumps({"batch_size": a.batch_size, "threads": a.threads, "steps": a.steps,
                      "stage_zero2_samples_per_s": stage, "bare_samples_per_s": bare,
                      "ratio": stage / bare}))  # fmt: skip


if __name__ == "__main__":
    main()
