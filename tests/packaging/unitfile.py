"""Reading packaging/deb/debian/cnisup.service (shared by the packaging tests)."""

from __future__ import annotations

from pathlib import Path

UNIT_SRC = Path(__file__).resolve().parents[2] / "packaging" / "deb" / "debian" / "cnisup.service"


def unit_settings(path: Path = UNIT_SRC) -> dict[str, list[str]]:
    """``"[Section]Key"`` -> every value it is given (a repeated key keeps them all)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}{key}", []).append(value)
    return out
