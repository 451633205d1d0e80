"""GPU figures for the model side of ``clip_filter`` and ``pretokenize``, next to JPEG decoding.

The stages themselves need Ray and MLflow, which a bare GPU machine without a network may not
have; this script needs only torch, open_clip and Pillow (and mmflow's model code on the
path), so it runs anywhere a GPU is. On one device, in one run, it measures:

- ``decode``: JPEG decode + CLIP preprocessing (224 px) of 256 px JPEGs, images/s on one core
  and on all cores (a process pool), the work ``clip_filter``'s readers do;
- ``clip``: image and text towers plus the cosine score of an open_clip model (random weights:
  speed does not depend on them) on pre-decoded batches, bf16 autocast, images/s;
- ``vqgan``: ``model.tokenize`` of the named VQ-GAN architectures on pre-decoded batches,
  fp32 and bf16 autocast, images/s, and the share of codes on which bf16 agrees with fp32.

``clip_bound`` says which side limits ``clip_filter`` on this machine: ``decoding`` when all
cores decode fewer images per second than the GPU scores.

    python tests/benchmarks/bench_gpu_models.py [--clip ViT-B-32,ViT-L-14] [--seconds 5]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

DEVICE = "cuda"  # --device cpu: a smoke test of this script without a GPU
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _jpegs(n: int, size: int = 256) -> list[bytes]:
    """``n`` JPEGs of smooth gradients with noise (decode cost close to photos of that size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        base = np.stack([yy * rng.random(), xx * rng.random(), (xx + yy) / 2], -1) * 255
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _decode_chunk(blobs: list[bytes]) -> int:
    import torch
    from PIL import Image
    from torchvision import transforms as T

    torch.set_num_threads(1)
    pre = T.Compose(
        [T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.48, 0.46, 0.41], [0.27, 0.26, 0.28])]
    )  # fmt: skip
    for b in blobs:
        with Image.open(io.BytesIO(b)) as img:
            pre(img.convert("RGB"))
    return len(blobs)


def bench_decode(blobs: list[bytes], workers: int) -> dict[str, float]:
    _decode_chunk(blobs[:20])  # imports
    start = time.perf_counter()
    _decode_chunk(blobs[:500])
    one = 500 / (time.perf_counter() - start)
    chunks = [blobs[i : i + 100] for i in range(0, len(blobs), 100)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_chunk, chunks[:workers]))  # warm the workers
        start = time.perf_counter()
        n = sum(pool.map(_decode_chunk, chunks))
        every = n / (time.perf_counter() - start)
    return {"decode_sps_1core": round(one, 1), "decode_sps_all": round(every, 1), "cores": workers}


def _timed(fn, seconds: float) -> float:
    """Calls per second of ``fn`` (CUDA-synchronised), after warm-up, over about ``seconds``."""
    import torch

    sync = torch.cuda.synchronize if DEVICE == "cuda" else lambda: None
    for _ in range(3):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    sync()
    return calls / (time.perf_counter() - start)


def bench_clip(name: str, batch: int, seconds: float) -> dict[str, float]:
    import open_clip
    import torch

    model = open_clip.create_model(name, pretrained=None).to(DEVICE).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    images = torch.randn(batch, 3, size, size, device=DEVICE)
    texts = torch.randint(1, 49000, (batch, 77), device=DEVICE)

    @torch.inference_mode()
    def score():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            a = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            b = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
            return (a * b).sum(-1).float()

    return {
        f"clip_{name}_sps": round(batch * _timed(score, seconds), 1),
        f"clip_{name}_batch": batch,
    }


def bench_vqgan(arch: str, batch: int, seconds: float) -> dict[str, float]:
    import torch

    from mmflow.models.vqgan import create_vqgan

    torch.manual_seed(0)
    model, _ = create_vqgan(arch)
    model = model.to(DEVICE).eval()
    size = model.cfg.image_size
    x = torch.rand(batch, 3, size, size, device=DEVICE) * 2 - 1
    out: dict[str, float] = {}
    with torch.inference_mode():
        fp32 = model.tokenize(x)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            bf16 = model.tokenize(x)
        out[f"vqgan_{arch}_bf16_agree"] = round(float((fp32 == bf16).float().mean()), 4)
        out[f"vqgan_{arch}_fp32_sps"] = round(batch * _timed(lambda: model.tokenize(x), seconds), 1)

        def half():
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return model.tokenize(x)

        out[f"vqgan_{arch}_bf16_sps"] = round(batch * _timed(half, seconds), 1)
    out[f"vqgan_{arch}_batch"] = batch
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", default="ViT-B-32,ViT-L-14", help="open_clip architectures")
    ap.add_argument("--clip-batch", type=int, default=512)
    ap.add_argument("--vqgan", default="vqgan-f16-256:64,vqgan-tiny-f4:2048", help="ARCH:BATCH,...")
    ap.add_argument("--images", type=int, default=4000, help="JPEGs decoded on all cores")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per figure")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)

    import torch

    global DEVICE
    DEVICE = args.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
    }
    result.update(bench_decode(_jpegs(args.images), os.cpu_count() or 1))
    print(json.dumps(result), flush=True)
    for name in filter(None, args.clip.split(",")):
        result.update(bench_clip(name, args.clip_batch, args.seconds))
        print(json.dumps(result), flush=True)
    for spec in filter(None, args.vqgan.split(",")):
        arch, _, batch = spec.partition(":")
        result.update(bench_vqgan(arch, int(batch or 64), args.seconds))
        print(json.dumps(result), flush=True)
    fastest = max(v for k, v in result.items() if k.startswith("clip_") and k.endswith("_sps"))
    slowest = min(v for k, v in result.items() if k.startswith("clip_") and k.endswith("_sps"))
    result["clip_bound"] = {
        name: "decoding" if result["decode_sps_all"] < result[f"clip_{name}_sps"] else "model"
        for name in filter(None, args.clip.split(","))
    }
    result["clip_model_over_decode"] = [
        round(slowest / result["decode_sps_all"], 2),
        round(fastest / result["decode_sps_all"], 2),
    ]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
