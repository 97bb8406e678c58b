"""Check that every marked copy of a library definition still equals its source.

The files shipped in a Hugging Face export (``mm_megatron/hf/*_memory_mosaics.py``) must run
with torch and transformers only, so they restate some of the library's math. Each such
restatement is marked on the line above it::

    # Copied from mm_megatron.ops.naive.l2_normalize
    def l2_normalize(...): ...

    # Copied from mm_megatron.ops.gated_scan.gated_key_scan_torch
    #     with gated_key_scan_torch->gated_key_scan
    def gated_key_scan(...): ...

The marked definition (a function, a class, or an assignment to one name; at module level or
in a class) must equal the definition the dotted path names in ``mm_megatron/`` (or any module
under the repository root), after the declared renames ``old->new`` (whole words, applied in
order to the source text). Code and docstrings count; comments, blank lines and formatting do
not: both sides are compared as ``ast.unparse`` writes them, so the formatter may rewrap one
side alone. A marker whose source does not exist, or that sits above no definition, is an
error. ``--fix`` overwrites each differing copy with its source (renamed and re-indented,
comments included).

    python tools/check_copies.py [--fix] [FILE ...]   (default: every file under mm_megatron/)
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(?P<indent>\s*)# Copied from (?P<source>[\w.]+)(?: with (?P<renames>.+))?$")
# a marker's renames may go on below it, on comment lines of renames only ("#     a->b, c->d")
_RENAME = r"[\w.]+->[\w.]+"
MORE_RENAMES = re.compile(rf"^\s*#\s+(?:with\s+)?(?P<renames>{_RENAME}(?:,\s*{_RENAME})*),?$")
MARKER_LINE = re.compile(r"^\s*# Copied from", re.M)


class CopyError(ValueError):
    """A marker that cannot be checked: malformed, above no definition, or a missing source."""


@dataclass(frozen=True)
class MarkedCopy:
    """One ``# Copied from`` marker and the definition below it."""

    path: Path
    marker_line: int  # 1-based line of the marker comment
    source: str  # dotted path of the source definition
    renames: tuple[tuple[str, str], ...]
    first: int  # 1-based first line of the copy (its first decorator, if any)
    last: int  # 1-based last line of the copy
    indent: str


def parse_renames(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"a->b, c->d"`` as ``(("a", "b"), ("c", "d"))``."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        old, sep, new = item.strip().partition("->")
        if not sep or not old.strip() or not new.strip():
            raise CopyError(f"malformed rename {item.strip()!r}: expected old->new")
        pairs.append((old.strip(), new.strip()))
    return tuple(pairs)


def apply_renames(text: str, renames: tuple[tuple[str, str], ...]) -> str:
    """Replace each ``old`` by ``new`` where it stands as a whole word (or dotted name)."""
    for old, new in renames:
        text = re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, text)
    return text


def _name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        return target.id if isinstance(target, ast.Name) else None
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def _first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno, *(d.lineno for d in decorators)])


def _definitions(body: list[ast.stmt]) -> list[ast.stmt]:
    """Named definitions of a module body and, recursively, of its class bodies."""
    found = []
    for node in body:
        if _name(node) is not None:
            found.append(node)
        if isinstance(node, ast.ClassDef):
            found.extend(_definitions(node.body))
    return found


def find_copies(path: Path) -> list[MarkedCopy]:
    """The marked copies of ``path``; a marker above no definition raises :class:`CopyError`."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    by_first = {_first_line(n): n for n in _definitions(ast.parse(text, str(path)).body)}
    copies = []
    for i, line in enumerate(lines, start=1):
        if not line.lstrip().startswith("# Copied from"):
            continue
        match = MARKER.match(line.rstrip())
        if match is None:
            raise CopyError(f"{path}:{i}: malformed marker: {line.strip()!r}")
        renames, last = [match["renames"] or ""], i
        while last < len(lines) and (more := MORE_RENAMES.match(lines[last])):
            renames.append(more["renames"])
            last += 1
        node = by_first.get(last + 1)
        if node is None:
            raise CopyError(f"{path}:{i}: '# Copied from' is not directly above a definition")
        try:
            pairs = parse_renames(",".join(r.strip().rstrip(",") for r in renames if r))
        except CopyError as err:
            raise CopyError(f"{path}:{i}: {err}") from None
        copies.append(
            MarkedCopy(
                Path(path), i, match["source"], pairs, last + 1, node.end_lineno, match["indent"]
            )
        )
    return copies


def source_text(dotted: str, root: Path = ROOT) -> str:
    """The text of the definition ``package.module.Name[.attr]`` under ``root``, dedented."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = root.joinpath(*parts[:cut]).with_suffix(".py")
        if module.is_file():
            break
    else:
        raise CopyError(f"no module of {dotted!r} under {root}")
    text = module.read_text(encoding="utf-8")
    body = ast.parse(text, str(module)).body
    node: ast.stmt | None = None
    for name in parts[cut:]:
        node = next((n for n in body if _name(n) == name), None)
        if node is None:
            raise CopyError(f"{dotted!r}: {module} defines no {name!r} there")
        body = node.body if isinstance(node, ast.ClassDef) else []
    lines = text.splitlines()[_first_line(node) - 1 : node.end_lineno]
    return textwrap.dedent("\n".join(lines)) + "\n"


def _copy_text(copy: MarkedCopy) -> str:
    lines = copy.path.read_text(encoding="utf-8").splitlines()[copy.first - 1 : copy.last]
    return textwrap.dedent("\n".join(lines)) + "\n"


def normalized(code: str) -> str:
    """The code as ``ast.unparse`` writes it: no comments, one formatting."""
    return ast.unparse(ast.parse(code))


def check_copy(copy: MarkedCopy, root: Path = ROOT) -> str | None:
    """None when the copy equals its renamed source, else a report with a unified diff."""
    expected = normalized(apply_renames(source_text(copy.source, root), copy.renames))
    actual = normalized(_copy_text(copy))
    if expected == actual:
        return None
    diff = difflib.unified_diff(
        expected.splitlines(),
        actual.splitlines(),
        copy.source,
        f"{copy.path}:{copy.first}",
        lineterm="",
    )
    return f"{copy.path}:{copy.marker_line}: differs from {copy.source}\n" + "\n".join(diff)


def fix_copy(copy: MarkedCopy, root: Path = ROOT) -> None:
    """Overwrite the copy with its renamed source, indented as the marker."""
    new = apply_renames(source_text(copy.source, root), copy.renames)
    new_lines = [copy.indent + line if line else line for line in new.splitlines()]
    lines = copy.path.read_text(encoding="utf-8").splitlines()
    lines[copy.first - 1 : copy.last] = new_lines
    copy.path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def check_file(path: Path, root: Path = ROOT, fix: bool = False) -> list[str]:
    """Problems of the marked copies of ``path`` (an empty list when all match). With ``fix``,
    differing copies are rewritten from their sources (last first, so line numbers hold)."""
    try:
        copies = find_copies(path)
    except CopyError as err:
        return [str(err)]
    problems = []
    for copy in reversed(copies):
        try:
            report = check_copy(copy, root)
        except CopyError as err:
            problems.append(f"{path}:{copy.marker_line}: {err}")
            continue
        if report is not None:
            problems.append(report)
            if fix:
                fix_copy(copy, root)
    return problems[::-1]


def default_files(root: Path = ROOT) -> list[Path]:
    """Every Python file under ``root/mm_megatron`` that holds a marker."""
    return sorted(
        p
        for p in (root / "mm_megatron").rglob("*.py")
        if MARKER_LINE.search(p.read_text(encoding="utf-8"))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="files to check (default: all)")
    parser.add_argument("--fix", action="store_true", help="overwrite differing copies")
    args = parser.parse_args(argv)
    files = args.files or default_files()
    problems = [p for f in files for p in check_file(f, fix=args.fix)]
    if args.fix and problems:
        for problem in problems:
            print(f"rewritten or unfixable: {problem.splitlines()[0]}", file=sys.stderr)
        problems = [p for f in files for p in check_file(f)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} marked copies do not match their sources", file=sys.stderr)
        return 1
    count = sum(len(find_copies(f)) for f in files)
    print(f"{count} marked copies in {len(files)} files match their sources")
    return 0


if __name__ == "__main__":
    sys.exit(main())
