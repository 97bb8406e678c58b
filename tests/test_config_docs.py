"""Every field of every YAML-settable config dataclass has a docstring under it.

A field is documented where it is declared, as a string literal on the line after the
annotation (the form documentation tools and editors read). The dataclasses are found from
the two entry points :class:`pretrain.config.Config` and :class:`mm_megatron.config.ModelConfig`
(what :func:`mm_megatron.config_loading.from_mapping` fills), following nested sections
and base classes, so a new section or field is covered without editing this test.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

import pytest

from mm_megatron.config import ModelConfig
from pretrain.config import Config


def _config_classes() -> list[type]:
    """The dataclasses reachable from the entry points through field types and bases."""
    seen: list[type] = []
    todo: list[typing.Any] = [Config, ModelConfig]
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp in seen:
                continue
            seen.append(tp)
            todo += [b for b in tp.__mro__[1:] if dataclasses.is_dataclass(b)]
            todo += list(typing.get_type_hints(tp).values())
        else:
            todo += list(typing.get_args(tp))
    return seen


def _undocumented(cls: type) -> list[str]:
    """Fields declared in ``cls``'s own body without a string literal right after them."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    missing = []
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        nxt = body[i + 1] if i + 1 < len(body) else None
        value = nxt.value if isinstance(nxt, ast.Expr) else None
        doc = value.value if isinstance(value, ast.Constant) else None
        if not (isinstance(doc, str) and doc.strip()):
            missing.append(stmt.target.id)
    return missing


CLASSES = _config_classes()


def test_the_config_classes_are_found():
    names = {f"{c.__module__}.{c.__qualname__}" for c in CLASSES}
    assert {
        "pretrain.config.TrainConfig",
        "pretrain.config_run.ProfileConfig",
        "mm_megatron.config.ModelConfig",
        "mm_megatron.config.ParallelConfig",
    } <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_config_field_has_a_docstring(cls):
    missing = _undocumented(cls)
    where = f"{cls.__module__}.{cls.__qualname__}"
    assert not missing, f"{where}: document each of these fields with a string under it: {missing}"
