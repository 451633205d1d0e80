"""Params: the base of every typed param block rejects unknown keys and validates assignments."""

from __future__ import annotations

import pytest
from pydantic import Field, ValidationError

from mmflow.params import Params


class Inner(Params):
    depth: int = Field(2, ge=1)


class Block(Params):
    lr: float = Field(1e-3, gt=0)
    name: str = "tiny"
    inner: Inner = Inner()


def test_unknown_keys_are_rejected_with_their_name():
    with pytest.raises(ValidationError, match="lrr") as err:
        Block(lrr=0.1)  # a typo, not silently ignored
    assert err.value.errors()[0]["type"] == "extra_forbidden"
    with pytest.raises(ValidationError, match="inner.depht"):
        Block(inner={"depht": 3})  # nested blocks forbid them too
    with pytest.raises(ValidationError, match="lrr"):
        Block.model_validate({"lr": 0.1, "lrr": 0.2})


def test_known_keys_are_validated_and_coerced_at_construction():
    b = Block(lr="0.5", inner={"depth": "4"})
    assert (b.lr, b.inner.depth) == (0.5, 4)
    with pytest.raises(ValidationError, match="lr"):
        Block(lr=0)
    with pytest.raises(ValidationError, match="depth"):
        Block(inner={"depth": 0})


def test_assignment_is_validated():
    b = Block()
    b.lr = "0.25"  # coerced, like at construction
    assert b.lr == 0.25
    with pytest.raises(ValidationError, match="greater than 0"):
        b.lr = -1.0
    assert b.lr == 0.25  # a rejected value leaves the old one
    with pytest.raises(ValidationError, match="name"):
        b.name = ["not", "a", "string"]
    with pytest.raises(ValidationError, match="depth"):
        b.inner.depth = 0
    with pytest.raises(ValidationError, match="no attribute 'lrr'"):
        b.lrr = 0.1  # an unknown attribute cannot be set either
