"""The rows of a CSV as spreadsheets export them, for the CSV loader and `data validate` alike.

Excel and LibreOffice write "CSV UTF-8" with a byte-order mark, use `;` where the decimal separator
is a comma, end lines with CRLF and often append empty rows. All of those are read as the file
means them; what cannot be (another encoding, a row with more fields than the header) is a
`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from pathlib import Path

from pixtral_lora.errors import DataError

DELIMITERS = ",;\t"
MAX_HEADER_CHARS = 1 << 16


def csv_records(path: str | Path, required: set[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) of every non-blank row of the CSV at `path`.

    The header must name every column of `required` (surrounding spaces ignored). Blank rows (every
    field empty, as spreadsheets append them) are not samples and are passed over.
    """
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        try:
            header = handle.readline(MAX_HEADER_CHARS)
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        try:
            delimiter = csv.Sniffer().sniff(header, delimiters=DELIMITERS).delimiter
        except csv.Error:
            delimiter = ","
        reader = csv.reader(itertools.chain([header], handle), delimiter=delimiter)
        try:
            columns = [name.strip() for name in next(reader, [])]
            if not required <= set(columns):
                raise DataError(f"{path}:1: header must contain {sorted(required)}, got {columns}")
            for fields in reader:
                line_no = reader.line_num
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) > len(columns):
                    raise DataError(
                        f"{path}:{line_no}: {len(fields)} fields but the header has {len(columns)} "
                        f"(a {delimiter!r} inside a field that is not quoted?)"
                    )
                yield (
                    line_no,
                    dict(zip(columns, [*fields, *[""] * (len(columns) - len(fields))], strict=True)),
                )
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: not a well-formed CSV row ({err})") from None


def _not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8, naming its first such line (text is decoded in
    chunks, so the decoder's own position is not the line's)."""
    line_no, byte = 1, 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                line_no, byte = number, line[err.start]
                break
    return DataError(
        f"{path}:{line_no}: not UTF-8 (byte {byte:#04x}); save it as 'CSV UTF-8' from the spreadsheet"
    )
