"""JSON lines, the format every stage reads and writes: one object per line, read lazily; a malformed line named
by file and line (DataError, which the scripts print as one line); written through a temporary file, so an
interrupted writer never leaves half a file. Standard library only: importing it pulls in nothing else."""

import json
import os


class DataError(ValueError):
    """Bad input data: the message names the file and line."""


def read_jsonl(path, fields=(), skip_bad=False, counts=None):
    """Yield the JSON objects of a .jsonl file one by one (memory stays flat). A malformed line or a missing
    field raises DataError naming file:line, or with skip_bad=True is skipped and counted in counts["bad_lines"]."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    # utf-8-sig: a file saved by a Windows editor starts with a byte-order mark, which json refuses in line 1
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                missing = [k for k in fields if k not in row]
                if missing:
                    raise ValueError(f"missing field(s) {missing}")
            except ValueError as e:
                if not skip_bad:
                    raise DataError(f"{path}:{n}: {e} (pass --skip-bad to skip and count such lines)") from None
                if counts is not None:
                    counts["bad_lines"] += 1
                continue
            yield row


def write_jsonl(path, rows):
    """Write rows to path through a temporary file, so an interrupted stage never leaves a half-written output."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp, n = path + ".tmp", 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def append_jsonl(path, rows):
    """Add rows to the end of a log (a run resumed goes on writing where it stopped)."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
