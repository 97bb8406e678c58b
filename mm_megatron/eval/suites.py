"""The table of evaluation suites that ``tools/evaluate.py`` exposes as subcommands.

A suite is one module, registered below by name, with:

* ``DESCRIPTION``: one line for ``--help``;
* ``add_args(parser)``: its options (the model options and ``--out``, ``--seed``,
  ``--quiet`` are added by the CLI);
* optionally ``validate(args)``: check its options before the model loads, raising
  :class:`~mm_megatron.eval.loading.EvalError` with a message naming the option or file;
* ``run(model, tokenizer, args) -> dict``: evaluate; ``model`` is the loaded Hugging Face
  model (eval mode, on ``--device``), ``tokenizer`` its fast tokenizer, and ``args.loaded``
  the :class:`~mm_megatron.eval.loading.LoadedModel` (BOS/EOS ids, the HF directory, ...).
  It returns ``{"rows": [...], "details": {...}}`` (rows as in
  :mod:`mm_megatron.eval.results`).

Registering a suite is one line in ``SUITES``; a module that is not installed is listed by
``--help`` as not available and refused with a clear error.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from mm_megatron.eval.loading import EvalError

# subcommand -> module
SUITES: dict[str, str] = {
    "ruler": "mm_megatron.eval.suite_ruler",
    "icl": "mm_megatron.eval.suite_icl",
    "lm-eval": "mm_megatron.eval.lm_eval_wrapper",
}


def load_suite(name: str) -> ModuleType | None:
    """The suite's module, or None when it is not installed."""
    try:
        return importlib.import_module(SUITES[name])
    except ModuleNotFoundError as err:
        if err.name == SUITES[name]:
            return None
        raise


_SIZE = re.compile(r"^(\d+)([kKmM]?)$")


def parse_int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    """``"4k,8k,16384"`` -> [4096, 8192, 16384] (k = 1024, m = 1024²); errors name the option."""
    out: list[int] = []
    for item in text.split(","):
        match = _SIZE.match(item.strip())
        if not match:
            raise EvalError(f"{option}: {item.strip()!r} is not a whole number (e.g. 4096 or 4k)")
        value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
        if value < minimum:
            raise EvalError(f"{option}: {value} is below the minimum {minimum}")
        if value in out:
            raise EvalError(f"{option}: {value} is given twice")
        out.append(value)
    if not out:
        raise EvalError(f"{option}: empty list")
    return out


def parse_name_list(text: str, option: str, known: list[str]) -> list[str]:
    """A comma-separated list of names, each from ``known``; errors name the option."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise EvalError(f"{option}: empty list")
    for name in names:
        if name not in known:
            raise EvalError(f"{option}: unknown {name!r} (choose from {', '.join(known)})")
    return list(dict.fromkeys(names))
