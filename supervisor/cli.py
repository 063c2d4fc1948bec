"""The ``cnisup`` command (click only: every action lives in its module)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
import zmq

from cnisup.protocol import envelope, exitcodes
from cnisup.protocol.envelope import ProtocolError
from cnisup.protocol.subscriber import STARTED, CurveClient, Gap, Subscriber
from cnisup.supervisor import __version__, answers, config, control, probes, render
from cnisup.supervisor.history import Filters, Match, Stitch

EX_START_FAILED = 1

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="YAML configuration file (see config_example.yaml).")
preset_option = click.option("--preset", type=click.Choice(config.PRESETS),
                             help="Preset under the file's keys (overrides the file's 'preset').")


def _load(config_path: str | None, preset: str | None = None, log_level: str | None = None) -> config.Config:
    try:
        return config.load(config_path, preset=preset, log_level=log_level)
    except config.ConfigError as exc:
        click.echo(f"cnisup: configuration error: {exc}", err=True)
        sys.exit(exitcodes.EX_CONFIG)


@click.group()
@click.version_option(__version__, prog_name="cnisup")
def main() -> None:
    """cnisup: a node-local observer of container networking."""


@main.command()
@config_option
@preset_option
@click.option("--log-level", type=click.Choice(config.LOG_LEVELS, case_sensitive=False))
def start(config_path: str | None, preset: str | None, log_level: str | None) -> None:
    """Run the supervisor in the foreground until SIGTERM/SIGINT (SIGHUP reloads)."""
    cfg = _load(config_path, preset, log_level)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Here, not at the top: the commands that only read (history, explain) start faster without it.
    from cnisup.supervisor.supervisor import StartError, Supervisor

    sup = Supervisor(cfg, config_path=config_path, preset=preset, log_level=log_level)
    try:
        code = sup.run()
    except StartError as exc:
        click.echo(f"cnisup: {exc}", err=True)
        sys.exit(EX_START_FAILED)
    sys.exit(code)


@main.command()
@config_option
@preset_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(config_path: str | None, preset: str | None, as_json: bool) -> None:
    """Which worker each monitor family would run, and why. Changes nothing."""
    cfg = _load(config_path, preset)
    report = probes.check(cfg)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    ident = report["workers_identity"]
    click.echo(f"node: {report['node']}   running as uid {report['euid']}")
    click.echo(f"unprivileged workers run as {ident['user']} (uid {ident['uid']}, gid {ident['gid']})"
               + (f" - {ident['note']}" if ident["note"] else ""))
    click.echo(f"events: {', '.join(report['publish'])}   control: {report['control']}")
    for fam in report["families"]:
        state = fam["worker"] or "none"
        click.echo(f"\n[{fam['family']}] -> {state}: {fam['reason']}")
        for name, p in fam["probes"].items():
            mark = "ok  " if p["ok"] else "FAIL"
            click.echo(f"  {mark} {name}: {p['reason']}")
            for key, value in p.items():
                if key not in ("ok", "reason"):
                    click.echo(f"       {key}: {value}")


def _fmt_age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


@main.command()
@config_option
@preset_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for the answer.")
def status(config_path: str | None, preset: str | None, as_json: bool, timeout: float) -> None:
    """Ask the running supervisor for each worker's state."""
    cfg = _load(config_path, preset)
    try:
        reply = control.request(cfg.control.endpoint, "status", timeout_ms=int(timeout * 1000))
    except TimeoutError as exc:
        click.echo(f"cnisup: {exc}", err=True)
        sys.exit(EX_START_FAILED)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    sup = reply["supervisor"]
    click.echo(f"supervisor pid {sup['pid']} ({sup['state']}), node {sup['node']}, up {sup['uptime_s']:.0f}s, "
               f"version {sup['version']}")
    header = f"{'FAMILY':8} {'WORKER':13} {'STATE':11} {'PID':>7} {'RESTARTS':>8} {'SENT':>8} {'DROPPED':>7}  HB"
    click.echo(header)
    for w in reply["workers"]:
        click.echo(f"{w['family']:8} {w.get('worker') or '-':13} {w['state']:11} {w.get('pid') or '-':>7} "
                   f"{w.get('restarts', 0):>8} {w.get('events_sent', 0):>8} {w.get('events_dropped', 0):>7}  "
                   f"{_fmt_age(w.get('heartbeat_age_s'))}")
        if w.get("fallback_reason"):
            click.echo(f"{'':8} fallback because: {w['fallback_reason']}")
        if (info := w.get("info") or {}).get("capture"):  # what the kernel capture costs other processes
            click.echo(f"{'':8} capture {info['capture']}: {info.get('tax', '')}")
        if w.get("last_exit"):
            click.echo(f"{'':8} last exit: {w['last_exit']['reason']}")
        if w["state"] in ("unavailable", "disabled", "failed") and w.get("reason"):
            click.echo(f"{'':8} {w['reason']}")


@main.command()
@config_option
@preset_option
@click.option("--endpoint", "endpoints", multiple=True, help="Connect here instead of the config's endpoints.")
@click.option("--topic", "topics", multiple=True, help="Topic prefix to subscribe to (repeatable; turns off "
                                                       "gap detection: prefer --kind).")
@answers.filter_options
@click.option("-o", "--output", type=click.Choice(["long", "compact", "json"]), default="long", show_default=True,
              help="compact: one line per finished CNI plugin run; json: one envelope per line.")
@click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
@click.option("--since", type=answers.TIME, help="Replay from the journal from this time, then go on live "
                                                 "(no gap, no duplicate).")
@click.option("--count", type=int, default=0, help="Exit after this many events (0: never).")
@click.option("--timeout", type=float, default=0.0, help="Exit after this many seconds without events (0: never).")
@click.option("--curve-server-key", type=click.Path(exists=True, dir_okay=False),
              help="Public certificate of the publisher (CURVE endpoints).")
@click.option("--curve-key", type=click.Path(exists=True, dir_okay=False),
              help="This subscriber's secret certificate (CURVE endpoints).")
def tail(config_path: str | None, preset: str | None, endpoints: tuple[str, ...], topics: tuple[str, ...],
         kinds: tuple[str, ...], pod: tuple[str, str] | None, namespace: str | None, container: str | None,
         failed: bool, output: str, as_json: bool, since: int | None, count: int, timeout: float,
         curve_server_key: str | None, curve_key: str | None) -> None:
    """Subscribe and print events; reports every loss (sequence gaps, and what
    supervisor.progress says was published but never arrived)."""
    cfg = None if endpoints else _load(config_path, preset)
    eps = list(endpoints) or (cfg.publish.endpoints if cfg else [])
    filters = Filters(kinds=kinds, pod=pod, namespace=namespace, container=container, failed=failed)
    out = _Printer("json" if as_json else output)
    with Subscriber(eps, topics=list(topics), curve=_curve_client(curve_server_key, curve_key)) as sub:
        follow = _Follow(sub, out, cfg.control.endpoint if cfg else None, Match(filters))
        if since is not None:
            follow.stitch = Stitch(answers.open_journal(lambda: _load(config_path, preset), ()),
                                   dataclasses.replace(filters, since_ns=since))
            for env in follow.stitch.replay():
                out(env)
        follow.seed()
        try:
            follow.run(count=count, timeout_s=timeout)
        except KeyboardInterrupt:
            pass


class _Follow:
    """The live part of ``tail``: print what matches, report every loss, and
    fetch the supervisor's own events it missed at the start (``replay``)."""

    #: Seconds between looks at what progress events promised.
    LOSS_CHECK_S = 1.0

    def __init__(self, sub: Subscriber, out: _Printer, control_endpoint: str | None, match: Match) -> None:
        self.sub, self.out, self.control, self.match = sub, out, control_endpoint, match
        self.stitch: Stitch | None = None
        self.seen: set[str] = set()

    def seed(self) -> None:
        """Where every incarnation stands now: what follows must be contiguous."""
        if self.control is None:
            return
        time.sleep(0.2)  # our subscription reaches the proxy first
        try:
            reply = control.request(self.control, "progress", timeout_ms=1000)
        except (TimeoutError, zmq.ZMQError, ValueError):
            return  # no supervisor yet: its first events will be replayed on sight
        if not (reply.get("ok") and isinstance(reply.get("incarnations"), list)):
            return
        entries = [e for e in reply["incarnations"] if isinstance(e, dict) and isinstance(e.get("incarnation"), str)]
        self.sub.seed(entries)
        self.seen |= {e["incarnation"] for e in entries}
        for e in entries:  # the supervisor's events since we subscribed, before our subscription took
            if e.get("source") == "supervisor" and isinstance(e.get("seq"), int) and e["seq"] > 0:
                self._recover(e["incarnation"], 1, e["seq"])

    def run(self, *, count: int, timeout_s: float) -> None:
        quiet_since = time.monotonic()
        while not (count and self.out.seen >= count):
            wait = self.LOSS_CHECK_S if not timeout_s else min(self.LOSS_CHECK_S, timeout_s)
            try:
                got = self.sub.recv(int(wait * 1000))
            except ProtocolError as exc:
                click.echo(f"! malformed message: {exc}", err=True)
                continue
            for overdue in self.sub.losses():
                self._lost(overdue)
            if got is None:
                if timeout_s and time.monotonic() - quiet_since >= timeout_s:
                    return
                continue
            quiet_since = time.monotonic()
            env, gap = got
            if env["incarnation"] not in self.seen:
                self.seen.add(env["incarnation"])
                if env["source"] == "supervisor" and env["seq"] > 1:
                    self._recover(env["incarnation"], 1, env["seq"] - 1)
            if gap is not None:
                self._lost(gap)
            self._show(env)

    def _show(self, env: dict[str, Any]) -> None:
        if self.stitch is not None:
            shown, lost = self.stitch.live(env)
            if lost:
                click.echo(f"! lost {lost} event(s) from {env['source']} incarnation {env['incarnation']} "
                           "between the journal and the live stream", err=True)
            for e in shown:
                self.out(e)
        elif self.match(env):
            self.out(env)

    def _lost(self, gap: Gap) -> None:
        if gap.source == "supervisor" and gap.kind is None and self._recover(gap.incarnation, gap.expected,
                                                                             gap.got - 1, all_of_it=True):
            return
        what = f"kind {gap.kind}, kseq" if gap.kind else "seq"
        click.echo(f"! lost {gap.lost} event(s) from {gap.source} incarnation {gap.incarnation} "
                   f"({what} {gap.expected}..{gap.got - 1})", err=True)

    def _recover(self, incarnation: str, first: int, last: int, *, all_of_it: bool = False) -> bool:
        """The supervisor's own events ``first..last`` from its replay buffer:
        those published after we subscribed were lost to us, so show them.
        True when every one of them could be shown (or did not concern us)."""
        if self.control is None:
            return False
        try:
            reply = control.request(self.control, "replay", timeout_ms=1000, incarnation=incarnation,
                                    from_seq=first, to_seq=min(last, first + 999))
        except (TimeoutError, zmq.ZMQError, ValueError):
            return False
        texts = reply.get("envelopes") if reply.get("ok") else None
        if not isinstance(texts, list):
            return False
        since_ns = int(self.sub.subscribed_at * 1e9)
        envs = sorted((e for t in texts if isinstance(t, str) and (e := _parse(t)) is not None),
                      key=lambda e: e["seq"])
        missed = [e for e in envs if all_of_it or e["ts"] >= since_ns]
        if missed:
            click.echo(f"! recovered {len(missed)} event(s) of the supervisor published before they "
                       "reached us", err=True)
        for env in missed:
            if env["kind"] == STARTED and isinstance(env["data"].get("incarnation"), str):
                self.sub.gaps.started(env["data"]["incarnation"])
            self._show(env)
        return len(envs) == last - first + 1


def _parse(text: str) -> dict[str, Any] | None:
    try:
        env: dict[str, Any] = json.loads(text)
        return envelope.decode([str(env["kind"]).encode(), text.encode()])
    except (ValueError, KeyError, TypeError, ProtocolError):
        return None


class _Printer:
    def __init__(self, output: str) -> None:
        self.output = output
        self.color = render.use_color(sys.stdout)
        self.compact = render.Compact(color=self.color)
        self.clock = render.Clock()
        self.seen = 0

    def __call__(self, env: dict[str, Any]) -> None:
        self.seen += 1
        if self.output == "json":
            click.echo(json.dumps(env, separators=(",", ":"), ensure_ascii=False))
        elif self.output == "compact":
            for line in self.compact.feed(env):
                click.echo(line, color=self.color)
        else:
            click.echo(render.long_line(env, self.clock))


def _curve_client(curve_server_key: str | None, curve_key: str | None) -> CurveClient | None:
    if not (curve_server_key or curve_key):
        return None
    if not (curve_server_key and curve_key):
        raise click.UsageError("--curve-server-key and --curve-key go together")
    import zmq.auth
    server_public, _ = zmq.auth.load_certificate(curve_server_key)
    public, secret = zmq.auth.load_certificate(curve_key)
    if secret is None:
        raise click.UsageError(f"{curve_key} holds no secret key")
    return CurveClient(server_public, public, secret)


@main.group("config")
def config_group() -> None:
    """Configuration helpers."""


@config_group.command("show")
@config_option
@preset_option
@click.option("--log-level", type=click.Choice(config.LOG_LEVELS, case_sensitive=False))
def config_show(config_path: str | None, preset: str | None, log_level: str | None) -> None:
    """The effective configuration: defaults < preset < file < environment < flags."""
    cfg = _load(config_path, preset, log_level)
    click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="cnisup", show_default=True, help="Base name of the certificate files.")
def keygen(directory: str, name: str) -> None:
    """Create a CURVE key pair (NAME.key public, NAME.key_secret secret) in DIRECTORY."""
    import zmq.auth
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(secret).chmod(0o600)
    click.echo(f"public: {public}\nsecret: {secret}")


def _config_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return config_option(preset_option(f))


main.add_command(answers.history_command(_load, _config_options))
main.add_command(answers.explain_group(_load, _config_options))
main.add_command(answers.kinds_command)
