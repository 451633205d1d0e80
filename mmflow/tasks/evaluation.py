"""What the training tasks share around evaluation: a model applied to a held-out tensor in
chunks (memory stays bounded whatever ``eval_samples`` is), and the harness's final metrics
renamed into a stage's metrics (what the manifest and ``mmflow status`` show).

Metric names a stage gets from :func:`stage_metrics`:

- ``final_loss``: the last logged training loss (``train/loss``);
- ``{eval_prefix}_<name>``: each held-out metric of the final model (``eval/<name>``);
- ``samples_seen`` and ``skipped_<reason>``: the training samples the ranks read and those
  they skipped (``data/*``, summed over ranks by the harness; see :mod:`mmflow.tasks.data`),
  with ``skipped_total`` always there (0 when nothing was skipped);
- ``heldout_samples_seen``, ``heldout_skipped_<reason>`` and ``heldout_skipped_total``: the
  same for the loading of the held-out set, when the task reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

EVAL_CHUNK = 256


def chunked(
    fn: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    device: Any = None,
    size: int | None = None,
) -> Any:
    """``fn`` over ``x`` in chunks of ``size`` rows (``EVAL_CHUNK`` by default), each moved to
    ``device`` first, the results concatenated along the first dimension; ``fn`` may return a
    tensor or a tuple of them."""
    import torch

    size = size or EVAL_CHUNK
    outs = [fn(x[i : i + size].to(device) if device is not None else x[i : i + size])
            for i in range(0, len(x), size)]  # fmt: skip
    if outs and isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


def stage_metrics(final: dict[str, float], eval_prefix: str) -> dict[str, float]:
    """The harness's final metrics (``train/loss``, ``eval/*``, ``data/*``) as a stage's;
    ``eval/x`` becomes ``{eval_prefix}_x``, or ``x`` with an empty prefix."""
    out: dict[str, float] = {}
    if "train/loss" in final:
        out["final_loss"] = final["train/loss"]
    for k, v in final.items():
        if k.startswith("eval/"):
            name = k[len("eval/") :]
            out[f"{eval_prefix}_{name}" if eval_prefix else name] = v
    data = {k[len("data/") :]: v for k, v in final.items() if k.startswith("data/")}
    out.update(data)
    for prefix in ("", "heldout_"):
        if prefix == "" or f"{prefix}samples_seen" in data:
            skipped = (v for k, v in data.items() if k.startswith(f"{prefix}skipped_"))
            out[f"{prefix}skipped_total"] = float(sum(skipped))
    return out
