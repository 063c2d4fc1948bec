"""The commands that answer from the journal (``history``, ``explain``) and
describe the stream (``kinds``). Click only: the work is in ``history``,
``explain`` and ``render``. They read the journal file directly, so they work
while cnisup is stopped or crashed."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from cnisup.protocol import kinds as catalogue
from cnisup.protocol.settings import Config
from cnisup.supervisor import explain as explaining
from cnisup.supervisor import render
from cnisup.supervisor.history import Filters, Journal, JournalError, parse_time
from cnisup.workers.journal.schema import normal_ip

#: Exit code when the journal cannot be read.
EX_NO_JOURNAL = 1


class TimeParam(click.ParamType):
    """RFC 3339, a clock time today (03:12) or a relative time (-10m) -> ns."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class PodParam(click.ParamType):
    name = "NAMESPACE/NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        ns, sep, name = str(value).partition("/")
        if not sep or not ns or not name or "/" in name:
            self.fail(f"{value!r} is not NAMESPACE/NAME", param, ctx)
        return ns, name


class IpParam(click.ParamType):
    """An IPv4 or IPv6 address (``/prefix`` allowed), normalised as the journal stores it."""

    name = "ADDR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        ip = normal_ip(str(value))
        if ip is None:
            self.fail(f"{value!r} is not an IP address", param, ctx)
        return ip


TIME = TimeParam()
POD = PodParam()
IP = IpParam()

journal_option = click.option(
    "--journal", "journal_files", multiple=True, type=click.Path(dir_okay=False),
    help="Read this journal file (repeatable) instead of the configured ones.")


#: ``load(config_path, preset)``: the CLI's configuration loader (exits 78 on a bad file).
Load = Callable[[str | None, str | None], Config]
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def open_journal(load: Callable[[], Config], files: tuple[str, ...]) -> Journal:
    try:
        return Journal(list(files)) if files else Journal.of(load())
    except JournalError as exc:
        click.echo(f"cnisup: {exc}", err=True)
        sys.exit(EX_NO_JOURNAL)


def filter_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The filters ``history`` and ``tail`` share."""
    for option in reversed((
        click.option("--kind", "kinds", multiple=True, metavar="PREFIX",
                     help="Kinds under PREFIX, in whole tokens (repeatable): cni.plugin, k8s.pod, supervisor."),
        click.option("--pod", type=POD, help="A pod's events, and those of its containers."),
        click.option("--namespace", help="Events of pods in this namespace."),
        click.option("--container", metavar="ID", help="A container's events (its id or a prefix of it)."),
        click.option("--failed", is_flag=True, help="Failed plugin runs, invalid configs, Warning pod events."),
    )):
        f = option(f)
    return f


def history_command(load: Load, config_options: Decorator) -> click.Command:
    @click.command("history")
    @config_options
    @click.option("--since", type=TIME, help="From this time: RFC 3339, 03:12 (today) or -10m.")
    @click.option("--until", type=TIME, help="Up to this time (same forms).")
    @filter_options
    @click.option("--ip", type=IP, help="Events that carry this IP address.")
    @click.option("--path", metavar="FILE", help="Events about this file (a CNI config or plugin binary).")
    @click.option("-o", "--output", type=click.Choice(["compact", "long", "json"]), default="compact",
                  show_default=True, help="json: the stored envelopes exactly as published, one per line.")
    @click.option("--limit", type=click.IntRange(min=1), help="Only the newest N matching events.")
    @journal_option
    def history(config_path: str | None, preset: str | None, since: int | None, until: int | None,
                kinds: tuple[str, ...], pod: tuple[str, str] | None,
                namespace: str | None, container: str | None, failed: bool, ip: str | None, path: str | None,
                output: str, limit: int | None, journal_files: tuple[str, ...]) -> None:
        """Events from the local journal, oldest first (works while cnisup is stopped)."""
        f = Filters(since_ns=since, until_ns=until, kinds=kinds, pod=pod, namespace=namespace, container=container,
                    ip=ip, path=path, failed=failed, limit=limit)
        with open_journal(lambda: load(config_path, preset), journal_files) as journal:
            try:
                rows = journal.query(f)
            except JournalError as exc:
                click.echo(f"cnisup: {exc}", err=True)
                sys.exit(EX_NO_JOURNAL)
        color = render.use_color(sys.stdout)
        compact, clock = render.Compact(color=color), render.Clock()
        for s in rows:
            if output == "json":
                click.echo(s.text)
            elif output == "long":
                click.echo(render.long_line(s.envelope, clock))
            else:
                for line in compact.feed(s.envelope):
                    click.echo(line, color=color)
    return history


def explain_group(load: Load, config_options: Decorator) -> click.Group:
    @click.group("explain")
    def explain() -> None:
        """The network story of a pod, a container or an IP address on this node."""

    json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/EXPLAIN.md).")

    def show(story: dict[str, Any], as_json: bool, lines: Callable[..., list[str]]) -> None:
        if as_json:
            click.echo(json.dumps(story, indent=2, default=str))
            return
        color = render.use_color(sys.stdout)
        for line in lines(story, color=color):
            click.echo(line, color=color)

    @explain.command("pod")
    @click.argument("pod", type=POD)
    @json_option
    @journal_option
    @config_options
    def pod(pod: tuple[str, str], as_json: bool, journal_files: tuple[str, ...], config_path: str | None,
            preset: str | None) -> None:
        """NAMESPACE/NAME: its CNI runs, config changes, IPs and kubelet events, then a verdict."""
        with open_journal(lambda: load(config_path, preset), journal_files) as journal:
            story = explaining.explain_pod(journal, *pod).to_json()
        show(story, as_json, render.story_lines)

    @explain.command("container")
    @click.argument("container_id")
    @json_option
    @journal_option
    @config_options
    def container(container_id: str, as_json: bool, journal_files: tuple[str, ...], config_path: str | None,
                  preset: str | None) -> None:
        """CONTAINER_ID (or a prefix): the same story, for runtimes without Kubernetes."""
        with open_journal(lambda: load(config_path, preset), journal_files) as journal:
            story = explaining.explain_container(journal, container_id).to_json()
        show(story, as_json, render.story_lines)

    @explain.command("ip")
    @click.argument("address", type=IP)
    @click.option("--at", type=TIME, help="Who held it at this time.")
    @json_option
    @journal_option
    @config_options
    def ip(address: str, at: int | None, as_json: bool, journal_files: tuple[str, ...], config_path: str | None,
           preset: str | None) -> None:
        """ADDRESS: who held it, when, from which CNI run or pod."""
        with open_journal(lambda: load(config_path, preset), journal_files) as journal:
            report = explaining.explain_ip(journal, address, at_ns=at)
        show(report, as_json, render.ip_lines)

    return explain


@click.command("kinds")
@click.option("--json", "as_json", is_flag=True, help="Every kind with its meaning and the JSON Schema of its data.")
def kinds_command(as_json: bool) -> None:
    """Every event kind with its fields and meaning (as in the JSON Schema)."""
    if as_json:
        click.echo(json.dumps({k: {"meaning": doc, "data": schema}
                               for k, (doc, schema) in sorted(catalogue.KINDS.items())}, indent=2))
        return
    for kind, (doc, schema) in sorted(catalogue.KINDS.items()):
        click.echo(f"{kind}\n    {doc}")
        required = set(schema.get("required", []))
        for name, spec in schema.get("properties", {}).items():
            typ = spec.get("type") or ("enum " + "|".join(map(str, spec["enum"])) if "enum" in spec else "")
            typ = "|".join(typ) if isinstance(typ, list) else typ
            click.echo(f"    {'*' if name in required else ' '} {name}: {typ}")
