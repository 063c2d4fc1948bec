"""Write the packaged /etc/cnisup/config.yaml to stdout.

Generated at package build time from the configuration contract itself
(the ``Config`` dataclasses, their one-line docs and the production preset),
so every key the installed version knows is listed, commented out, with the
value it has under ``preset: production``: a key added to the contract needs
no edit here. ``tests/packaging/test_conffile.py`` checks that uncommenting
every key changes nothing.

Format: prose is ``# text`` (``#``, one space, then not a space) or a bare
``#``; any other line that starts with ``#`` is a commented YAML line, the
``#`` immediately followed by the line (``#log_level: info``,
``#  conf_dirs:``), so a reader or a test uncomments it by removing the
``#`` (``uncomment()``).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
import typing
from typing import Any

import yaml

from cnisup.supervisor import config

HEADER = """\
# /etc/cnisup/config.yaml: the configuration of cnisup.service.
#
# Every key is listed below, commented out, with its value under the
# production preset: remove the leading '#' of a key (and of the section it
# is in) to change it. Precedence: built-in defaults < preset < this file <
# environment ($LOG_LEVEL, $NODE_NAME, $KUBECONFIG, read by the service from
# /etc/default/cnisup when that file exists) < command-line flags.
#
# 'cnisup config show --config /etc/cnisup/config.yaml' prints the effective
# values; 'cnisup check --config /etc/cnisup/config.yaml' says which monitors
# can run here and why. 'systemctl reload cnisup' re-reads this file; changes
# to runtime_dir, publish and control need 'systemctl restart cnisup'.
#
# A bad key or value stops the service with exit code 78 and systemd does
# not restart it; 'journalctl -u cnisup' names the key.
#
# Under systemd the file system is read-only for cnisup except runtime_dir,
# and /home, /root and /run/user are hidden: a kubeconfig must live elsewhere
# (for example /etc/cnisup/kubeconfig) and be readable by workers.user.
# Subscribers in the cnisup group may connect to the ipc endpoints.
"""

WIDTH = 78


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000)
    return text.removesuffix("\n...\n").strip()


def _doc_lines(doc: str, indent: str) -> list[str]:
    prefix = f"#{indent}# " if indent else "# "
    return [prefix + line for line in textwrap.wrap(doc, WIDTH - len(prefix))] if doc else []


def _entries(cls: type[Any], values: dict[str, Any], depth: int) -> list[str]:
    indent = "  " * depth
    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        if depth == 0 and f.name == "preset":
            continue
        if depth == 0 and lines:
            lines.append("")
        lines += _doc_lines(f.metadata.get("doc", ""), indent)
        value = values[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"#{indent}{f.name}:")
            lines += _entries(hints[f.name], value, depth + 1)
        elif isinstance(value, list) and value:
            lines.append(f"#{indent}{f.name}:")
            lines += [f"#{indent}  - {_scalar(item)}" for item in value]
        else:
            lines.append(f"#{indent}{f.name}: {_scalar(value)}")
    return lines


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) else value
    return out


def uncomment(text: str) -> str:
    """``text`` with every commented YAML line uncommented, prose left alone."""
    return "".join(line[1:] if _COMMENTED.match(line) else line for line in text.splitlines(keepends=True))


_COMMENTED = re.compile(r"#(?! \S|\n|$)")


def render() -> str:
    values = _merge(dataclasses.asdict(config.Config()), config.preset_values("production"))
    body = "\n".join(_entries(config.Config, values, 0))
    return f"{HEADER}\npreset: production\n\n{body}\n"


if __name__ == "__main__":
    sys.stdout.write(render())
