"""Streaming readers for corpus files: jsonl (plain, .gz, .zst), parquet and plain text.

The readers never hold a whole file in memory (except a plain-text file read as one
document). They yield ``Chunk``s of raw records in input order, and ``InputError``s for
problems found while reading (an unreadable or truncated file); per-record problems
(invalid JSON, a missing key, non-UTF-8 bytes, documents without tokens) are found by the workers
that decode the records, see ``decode_record``.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TEXT_UNITS = ("file", "line", "paragraph")


@dataclass(frozen=True)
class InputFile:
    """One input file with its format and compression."""

    path: str
    format: str  # jsonl | parquet | text
    compression: str | None  # gzip | zstd | None
    size: int


@dataclass
class InputError:
    """A bad record or file, reported with file and line (1-based; 0 when not known)."""

    path: str
    line: int
    kind: str  # invalid_json | missing_key | not_utf8 | empty (no tokens) | encode_error | bad_file
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class Chunk:
    """Raw records of consecutive input lines/rows, in input order.

    ``records`` holds ``(file_index, line, payload)``; the payload is bytes (a jsonl line or
    a piece of text) or, for parquet, the cell value. ``kind`` says how to decode it.
    """

    kind: str  # json | text | value
    records: list[tuple[int, int, object]] = field(default_factory=list)
    nbytes: int = 0
    position: int = 0  # bytes of the input file list consumed so far (for progress/ETA)


def detect_format(path: str) -> tuple[str, str | None] | None:
    """Return ``(format, compression)`` from the file name, or None if unknown."""
    name = path.lower()
    compression = None
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            if fmt == "parquet" and compression:
                return None
            return fmt, compression
    return None


def expand_inputs(specs: list[str], input_format: str = "auto") -> list[InputFile]:
    """Expand files, directories (recursively) and globs into an ordered, de-duplicated list.

    Each argument is expanded in sorted order and arguments keep their order, so every rank
    of a multi-node run computes the same list. Directory entries with an unknown suffix are
    ignored; a file named explicitly with an unknown suffix is an error unless
    ``input_format`` is given.
    """
    out: list[InputFile] = []
    seen: set[str] = set()
    for spec in specs:
        if os.path.isdir(spec):
            paths = sorted(
                os.path.join(root, name) for root, _dirs, names in os.walk(spec) for name in names
            )
            explicit = False
        elif os.path.isfile(spec):
            paths, explicit = [spec], True
        else:
            paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            explicit = False
            if not paths:
                raise FileNotFoundError(f"input {spec!r} matches no file")
        for path in paths:
            real = os.path.realpath(path)
            if real in seen:
                continue
            detected = detect_format(path)
            if input_format != "auto":
                comp = detected[1] if detected else _compression_of(path)
                detected = (input_format, comp)
            if detected is None:
                if explicit:
                    raise ValueError(
                        f"{path}: unknown input format; name it .jsonl[.gz|.zst], "
                        ".parquet or .txt, or pass --input-format"
                    )
                continue
            seen.add(real)
            out.append(InputFile(path, detected[0], detected[1], os.path.getsize(path)))
    if not out:
        raise FileNotFoundError(f"no input files found in {specs}")
    return out


def _compression_of(path: str) -> str | None:
    for suffix, comp in COMPRESSIONS.items():
        if path.lower().endswith(suffix):
            return comp
    return None


class _ZstdRaw(io.RawIOBase):
    """A raw zstd stream that, unlike ``zstandard``'s reader, notices a truncated frame."""

    def __init__(self, raw: io.BufferedReader) -> None:
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # noqa: ANN001
        while not self._pending:
            data = self._raw.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd stream ended in the middle of a frame (truncated file)")
                return 0
            while data:
                self._in_frame = True
                self._pending += self._dobj.decompress(data)
                if self._dobj.eof:
                    data = self._dobj.unused_data
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
                else:
                    data = b""
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _open_binary(f: InputFile) -> tuple[io.BufferedIOBase, io.BufferedReader]:
    """Return (decompressed stream, raw file) for a jsonl or text input."""
    raw = open(f.path, "rb")  # noqa: SIM115
    if f.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if f.compression == "zstd":
        return io.BufferedReader(_ZstdRaw(raw), buffer_size=1 << 20), raw
    return raw, raw


_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile)


class ChunkReader:
    """Iterate over all input files, yielding ``Chunk``s and ``InputError``s in order."""

    def __init__(
        self,
        files: list[InputFile],
        json_key: str = "text",
        text_unit: str = "file",
        chunk_bytes: int = 1 << 20,
        chunk_records: int = 1024,
    ) -> None:
        if text_unit not in TEXT_UNITS:
            raise ValueError(f"text unit must be one of {TEXT_UNITS}, not {text_unit!r}")
        self.files = files
        self.json_key = json_key
        self.text_unit = text_unit
        self.chunk_bytes = chunk_bytes
        self.chunk_records = chunk_records
        self.total_bytes = sum(f.size for f in files)

    def __iter__(self) -> Iterator[Chunk | InputError]:
        offset = 0
        for index, f in enumerate(self.files):
            if f.format == "parquet":
                yield from self._parquet(index, f, offset)
            else:
                yield from self._lines(index, f, offset)
            offset += f.size

    def _lines(self, index: int, f: InputFile, offset: int) -> Iterator[Chunk | InputError]:
        kind = "json" if f.format == "jsonl" else "text"
        chunk = Chunk(kind)
        lineno = 0
        try:
            stream, raw = _open_binary(f)
        except OSError as exc:
            yield InputError(f.path, 0, "bad_file", f"cannot open: {exc}")
            return
        try:
            with stream, raw:
                if kind == "text" and self.text_unit == "file":
                    data = stream.read()
                    lineno = 1
                    chunk.records.append((index, 1, data))
                    chunk.nbytes += len(data)
                else:
                    records = (
                        self._paragraphs(stream)
                        if kind == "text" and self.text_unit == "paragraph"
                        else enumerate(stream, 1)
                    )
                    for lineno, line in records:
                        if line.isspace() or not line:
                            continue
                        if kind == "text":
                            line = line.rstrip(b"\r\n")
                        chunk.records.append((index, lineno, line))
                        chunk.nbytes += len(line)
                        if (
                            chunk.nbytes >= self.chunk_bytes
                            or len(chunk.records) >= self.chunk_records
                        ):
                            chunk.position = offset + raw.tell()
                            yield chunk
                            chunk = Chunk(kind)
        except _READ_ERRORS as exc:
            if chunk.records:
                yield chunk
            yield InputError(
                f.path,
                lineno + 1,
                "bad_file",
                f"unreadable or truncated ({type(exc).__name__}: {exc}); "
                "the rest of the file is lost",
            )
            return
        if chunk.records:
            chunk.position = offset + f.size
            yield chunk

    @staticmethod
    def _paragraphs(stream: io.BufferedIOBase) -> Iterator[tuple[int, bytes]]:
        """Blank-line separated paragraphs as (first line number, bytes)."""
        parts: list[bytes] = []
        start = 0
        for lineno, line in enumerate(stream, 1):
            if line.isspace():
                if parts:
                    yield start, b"".join(parts)
                    parts = []
                continue
            if not parts:
                start = lineno
            parts.append(line)
        if parts:
            yield start, b"".join(parts)

    def _parquet(self, index: int, f: InputFile, offset: int) -> Iterator[Chunk | InputError]:
        import pyarrow
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(f.path)
            if self.json_key not in pf.schema_arrow.names:
                yield InputError(
                    f.path,
                    0,
                    "missing_key",
                    f"no column {self.json_key!r} (columns: {pf.schema_arrow.names[:20]})",
                )
                return
            total_rows = max(pf.metadata.num_rows, 1)
            for batch in pf.iter_batches(batch_size=self.chunk_records, columns=[self.json_key]):
                column = batch.column(0)
                values = column.to_pylist()
                chunk = Chunk("value", [(index, row + i + 1, v) for i, v in enumerate(values)])
                try:
                    chunk.nbytes = int(pc.sum(pc.binary_length(column)).as_py() or 0)
                except pyarrow.ArrowNotImplementedError:
                    chunk.nbytes = sum(len(v) for v in values if isinstance(v, str | bytes))
                row += len(values)
                chunk.position = offset + int(f.size * min(row / total_rows, 1.0))
                yield chunk
        except (OSError, pyarrow.ArrowException) as exc:
            yield InputError(
                f.path,
                row + 1,
                "bad_file",
                f"unreadable or truncated parquet ({exc}); the rest is lost",
            )


def decode_record(kind: str, payload: object, json_key: str) -> tuple[str | None, str, str]:
    """Turn a raw record into text.

    Returns ``(text, error_kind, message)``; ``text`` is None when the record is bad.
    """
    if kind == "value":
        if payload is None:
            return None, "missing_key", f"{json_key!r} is null"
        if isinstance(payload, bytes):
            kind = "text"
        elif not isinstance(payload, str):
            return None, "missing_key", f"{json_key!r} is a {type(payload).__name__}, not text"
        else:
            text = payload
    if kind in ("json", "text"):
        assert isinstance(payload, bytes)
        try:
            decoded = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, "not_utf8", f"invalid UTF-8 at byte {exc.start} of the record"
        if kind == "json":
            try:
                obj = json.loads(decoded)
            except json.JSONDecodeError as exc:
                return None, "invalid_json", f"{exc.msg} (column {exc.colno})"
            if not isinstance(obj, dict) or json_key not in obj:
                keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
                return None, "missing_key", f"no key {json_key!r} (found {keys})"
            text = obj[json_key]
            if not isinstance(text, str):
                return (
                    None,
                    "missing_key",
                    (f"{json_key!r} is a {type(text).__name__}, not a string"),
                )
        else:
            text = decoded
    # Whitespace is text (it tokenizes to tokens); a document is dropped only when it has no
    # tokens at all, which the tokenizing worker decides (counted, never fatal).
    return text, "", ""
