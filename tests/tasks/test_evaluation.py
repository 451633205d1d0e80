"""tasks.evaluation: chunked evaluation matches one pass, and the final metrics' stage names."""

from __future__ import annotations

import torch

from mmflow.tasks.evaluation import chunked, stage_metrics


def test_chunked_matches_one_pass_for_tensors_and_tuples():
    x = torch.arange(1000, dtype=torch.float32).reshape(500, 2)
    sizes = []

    def double(chunk):
        sizes.append(len(chunk))
        return chunk * 2

    assert torch.equal(chunked(double, x, size=128), x * 2)
    assert sizes == [128, 128, 128, 116]
    sums, firsts = chunked(lambda c: (c.sum(1), c[:, 0]), x, device="cpu")
    assert torch.equal(sums, x.sum(1)) and torch.equal(firsts, x[:, 0])
    assert torch.equal(chunked(double, x[:3]), x[:3] * 2)  # one chunk (default size 256)


def test_stage_metrics_renames_and_totals_the_skips():
    final = {
        "step": 10.0,
        "train/loss": 0.5,
        "eval/psnr": 30.0,
        "eval/num_samples": 32.0,
        "data/samples_seen": 100.0,
        "data/skipped_undecodable_image": 2.0,
        "data/skipped_empty_caption": 1.0,
        "data/heldout_samples_seen": 40.0,
        "data/heldout_skipped_missing_image": 3.0,
    }
    assert stage_metrics(final, "val") == {
        "final_loss": 0.5,
        "val_psnr": 30.0,
        "val_num_samples": 32.0,
        "samples_seen": 100.0,
        "skipped_undecodable_image": 2.0,
        "skipped_empty_caption": 1.0,
        "skipped_total": 3.0,
        "heldout_samples_seen": 40.0,
        "heldout_skipped_missing_image": 3.0,
        "heldout_skipped_total": 3.0,
    }
    # nothing counted (a task without data_counters): still a skipped_total, of 0
    assert stage_metrics({"train/loss": 1.0, "eval/r1": 0.2}, "heldout") == {
        "final_loss": 1.0,
        "heldout_r1": 0.2,
        "skipped_total": 0.0,
    }
