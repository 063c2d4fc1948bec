"""Bring the wheel RECORD files of a relocated virtualenv up to date.

debian/rules rewrites the console script's shebang (build path -> install
path) and deletes ``direct_url.json``; pip's RECORD still lists the old hash
and the deleted file. This recomputes the hash and size of every file a
RECORD lists and drops the ones that are gone, so ``pip check``-style tools
and reproducible builds see a consistent, build-path-free record.

Usage: fix_record.py SITE_PACKAGES_DIR
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
from pathlib import Path


def _hash(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def fix(record: Path) -> None:
    site = record.parent.parent
    rows = []
    for row in csv.reader(io.StringIO(record.read_text())):
        if not row:
            continue
        name = row[0]
        target = site / name
        if target == record:
            rows.append([name, "", ""])
        elif target.is_file():
            rows.append([name, _hash(target), str(target.stat().st_size)])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())


def main(site_packages: str) -> None:
    for record in sorted(Path(site_packages).glob("*.dist-info/RECORD")):
        fix(record)


if __name__ == "__main__":
    main(sys.argv[1])
