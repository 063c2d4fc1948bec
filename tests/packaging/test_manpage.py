"""The man page (packaging/deb/cnisup.1) against the command as it is: every
command has a SYNOPSIS entry and a subsection of COMMANDS, both name every
one of its options, neither names an option the command lacks, and EXIT
STATUS lists exactly the codes the code uses. Read from click's own command
objects, so an option added to the CLI without a word in the page fails here.
Rendering is checked with groff (and mandoc) when they are installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from cnisup.protocol import exitcodes
from cnisup.supervisor import answers, cli, fleet

PAGE = Path(__file__).resolve().parents[2] / "packaging" / "deb" / "cnisup.1"

Path_ = tuple[str, ...]

_ESCAPES = {r"\-": "-", r"\~": " ", r"\&": "", r"\(dq": '"', r"\(aq": "'", r"\(em": "-", r"\(ti": "~", r"\e": "\\"}
_FONT = re.compile(r"\\f(?:[BIRP]|\[[A-Z]*\])")
_LONG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_SHORT = re.compile(r"(?<![\w-])(-[a-zA-Z])(?![\w-])")


def _plain(line: str) -> str:
    """A troff line as text: no macro name, no font changes, escapes resolved."""
    if line.startswith(('.\\"', "'\\\"")):
        return ""
    if line.startswith("."):
        line = line.split(" ", 1)[1] if " " in line else ""
        line = line.replace('"', "")
    for esc, text in _ESCAPES.items():
        line = line.replace(esc, text)
    return _FONT.sub("", line)


def _sections() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in PAGE.read_text().splitlines():
        if line.startswith(".SH "):
            current = _plain(line).strip()
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def _commands(group: click.Group = cli.main, path: Path_ = ()) -> Iterator[tuple[Path_, click.Command]]:
    """Every command that runs something (groups only hold commands)."""
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


COMMANDS = dict(_commands())


def _option_names(cmd: click.Command) -> set[str]:
    return {name for p in cmd.params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts)}


def _command_of(heading: str) -> Path_ | None:
    """The command a SYNOPSIS entry or subsection is about (the longest that
    fits its heading: "cnisup explain pod NAMESPACE/NAME"), () for bare cnisup."""
    words = heading.split()
    if not words or words[0] != "cnisup":
        return None
    words = words[1:]
    for n in range(len(words), 0, -1):
        if tuple(words[:n]) in COMMANDS:
            return tuple(words[:n])
    return ()


def _blocks(lines: list[str], macro: str) -> dict[Path_, str]:
    """The text under each ``macro`` heading (.SY, .SS), by the command it names."""
    out: dict[Path_ | None, str] = {}
    key: Path_ | None = None
    for line in lines:
        if line.startswith(macro + " "):
            key = _command_of(_plain(line))
            out.setdefault(key, "")
        elif line.startswith(".SS ") or line == ".YS":
            key = None
        elif key is not None:
            out[key] += _plain(line) + "\n"
    return {k: v for k, v in out.items() if k is not None}


def _named(text: str) -> set[str]:
    return set(_LONG.findall(text)) | set(_SHORT.findall(text))


@pytest.fixture(scope="module")
def sections() -> dict[str, list[str]]:
    return _sections()


def test_page_has_the_sections(sections: dict[str, list[str]]) -> None:
    for name in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "CONFIGURATION", "EXIT STATUS", "ENVIRONMENT",
                 "FILES", "EXAMPLES", "SEE ALSO"):
        assert name in sections, f"no {name} section"


def test_synopsis_names_every_command_and_each_of_its_options(sections: dict[str, list[str]]) -> None:
    entries = _blocks(sections["SYNOPSIS"], ".SY")
    for path, cmd in COMMANDS.items():
        name = " ".join(("cnisup", *path))
        assert path in entries, f"SYNOPSIS has no entry for {name}"
        missing = _option_names(cmd) - _named(entries[path])
        assert not missing, f"SYNOPSIS of {name} lacks {sorted(missing)}"
    assert {"--version", "--help"} <= _named(entries.get((), "")), "SYNOPSIS lacks cnisup --version | --help"


def test_synopsis_names_no_option_a_command_lacks(sections: dict[str, list[str]]) -> None:
    for path, text in _blocks(sections["SYNOPSIS"], ".SY").items():
        known = _option_names(COMMANDS[path]) if path else _option_names(cli.main) | {"--help"}
        extra = _named(text) - known - {"--help"}
        assert not extra, f"SYNOPSIS of cnisup {' '.join(path)} names {sorted(extra)}, which it does not take"


def test_each_command_has_a_subsection_documenting_every_option(sections: dict[str, list[str]]) -> None:
    subsections = _blocks(sections["COMMANDS"], ".SS")
    for path, cmd in COMMANDS.items():
        name = " ".join(("cnisup", *path))
        assert path in subsections, f'COMMANDS has no subsection ".SS {name}"'
        missing = _option_names(cmd) - _named(subsections[path])
        assert not missing, f"the subsection of {name} does not mention {sorted(missing)}"
        extra = set(_LONG.findall(subsections[path])) - _option_names(cmd)
        assert not extra, f"the subsection of {name} names {sorted(extra)}, which it does not take"


def test_every_long_option_in_the_page_exists() -> None:
    every = set().union(*(_option_names(c) for c in COMMANDS.values()), _option_names(cli.main), {"--help"})
    text = "\n".join(_plain(line) for line in PAGE.read_text().splitlines())
    unknown = set(_LONG.findall(text)) - every
    assert not unknown, f"the page names {sorted(unknown)}, which no command takes"


def test_exit_status_lists_the_codes_in_use(sections: dict[str, list[str]]) -> None:
    lines = sections["EXIT STATUS"]
    listed = {int(lines[i + 1].split()[1]) for i, line in enumerate(lines)
              if line == ".TP" and re.fullmatch(r"\.B \d+", lines[i + 1])}
    used = {exitcodes.OK, exitcodes.EX_SOFTWARE, exitcodes.EX_NOPERM, exitcodes.EX_CONFIG,
            cli.EX_START_FAILED, answers.EX_NO_JOURNAL, fleet.EX_NO_STREAM, click.UsageError.exit_code}
    assert listed == used


def test_renders_without_warnings() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    out = subprocess.run(["groff", "-man", "-ww", "-z", str(PAGE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and not out.stderr, out.stderr


def test_mandoc_lint_is_clean() -> None:
    if shutil.which("mandoc") is None:
        pytest.skip("mandoc is not installed")
    out = subprocess.run(["mandoc", "-Tlint", "-W", "all", str(PAGE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and not out.stdout and not out.stderr, out.stdout + out.stderr
