"""The joint-stream transformer's configs, without torch: :class:`JointConfig` and the named
architectures in ``configs/joint/*.json``, checked when a pipeline loads (which imports no
torch). :mod:`mmflow.models.joint` builds the model from them and re-exports them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mmflow.models.common.transformer_config import TransformerConfig

CONFIG_DIR = Path(__file__).parent / "configs" / "joint"


@dataclass(frozen=True, kw_only=True)
class JointConfig(TransformerConfig):
    z_loss: float = 0.0  # weight of mean(logsumexp(logits) ** 2); Chameleon used 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.z_loss < 0:
            raise ValueError(f"JointConfig.z_loss must be >= 0, got {self.z_loss}")

    def num_params(self, vocab_size: int) -> int:
        """Parameter count from the config alone (no model is built)."""
        embeddings = vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.block_params() + embeddings

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JointConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown JointConfig keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)


def list_archs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def joint_config(arch: str, overrides: Mapping[str, Any] | None = None) -> JointConfig:
    """A named architecture, with fields replaced by ``overrides``."""
    path = CONFIG_DIR / f"{arch}.json"
    if not path.exists():
        raise ValueError(f"unknown joint architecture {arch!r} (known: {', '.join(list_archs())})")
    return JointConfig.from_dict({**json.loads(path.read_text()), **(overrides or {})})
