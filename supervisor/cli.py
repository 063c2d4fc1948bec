"""The ``cnisup`` command (click only: every action lives in its module)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
import zmq

from cnisup.protocol import envelope, exitcodes, reach
from cnisup.protocol.envelope import ProtocolError
from cnisup.protocol.subscriber import STARTED, CurveClient, Gap, Subscriber
from cnisup.protocol.untrusted import one_line
from cnisup.supervisor import answers, config, control, fleet, probes, render, service, version
from cnisup.supervisor.history import Filters, Match, Stitch
from cnisup.workers import logs

EX_START_FAILED = 1

# Plain strings, checked by config.load like every other configuration input
# (a bad value is one line and exit 78, as for the file).
config_option = click.option("--config", "config_path", metavar="FILE", envvar="CNISUP_CONFIG",
                             help=f"YAML configuration file (see config_example.yaml); default $CNISUP_CONFIG, "
                                  f"else {config.INSTALLED_CONFIG} when it exists and no --preset is given.")
preset_option = click.option("--preset", metavar="|".join(config.PRESETS),
                             help="Preset under the file's keys (overrides the file's 'preset').")
log_level_option = click.option("--log-level", metavar="|".join(config.LOG_LEVELS),
                                help="Overrides log_level and $LOG_LEVEL.")


def _load(config_path: str | None, preset: str | None = None, log_level: str | None = None) -> config.Config:
    if config_path is None and preset is None and os.path.exists(config.INSTALLED_CONFIG):
        config_path = config.INSTALLED_CONFIG  # a packaged node: the service's sockets and journal
    try:
        return config.load(config_path, preset=preset, log_level=log_level)
    except config.ConfigError as exc:
        click.echo(one_line(f"cnisup: configuration error: {exc}"), err=True)
        sys.exit(exitcodes.EX_CONFIG)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """click's version_option wants the version when the command is defined, at every start."""
    if value and not ctx.resilient_parsing:
        click.echo(f"cnisup, version {version()}")
        ctx.exit()


@click.group()
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
def main() -> None:
    """cnisup: a node-local observer of container networking."""


@main.command()
@config_option
@preset_option
@log_level_option
def start(config_path: str | None, preset: str | None, log_level: str | None) -> None:
    """Run the supervisor in the foreground until SIGTERM/SIGINT (SIGHUP reloads)."""
    cfg = _load(config_path, preset, log_level)
    logs.setup(cfg.log_level, "%(name)s")
    # Here, not at the top: the commands that only read (history, explain) start faster without it.
    from cnisup.supervisor.supervisor import StartError, Supervisor

    sup = Supervisor(cfg, config_path=config_path, preset=preset, log_level=log_level)
    try:
        code = sup.run()
    except StartError as exc:
        click.echo(f"cnisup: {exc}", err=True)
        sys.exit(exc.code)
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
        if down := probes.unrunnable(report):
            click.echo(f"cnisup check: no worker can run for: {', '.join(down)}", err=True)
            sys.exit(EX_START_FAILED)
        return
    ident = report["workers_identity"]
    click.echo(f"node: {report['node']}   running as uid {report['euid']}")
    click.echo(f"unprivileged workers run as {ident['user']} (uid {ident['uid']}, gid {ident['gid']})"
               + (f" - {ident['note']}" if ident["note"] else ""))
    click.echo(f"events: {', '.join(report['publish'])}   control: {report['control']}")
    _echo_families(report["families"], details=True)
    if (unit := report["service"]) is not None:
        caps = "not limited" if unit["capabilities"] is None else " ".join(unit["capabilities"]) or "none"
        click.echo(f"\nas {service.UNIT} will run ({unit['unit']}{''.join(', ' + d for d in unit['dropins'])}): "
                   f"user {unit['user']}, NoNewPrivileges={'yes' if unit['no_new_privs'] else 'no'}, "
                   f"capabilities {caps}")
        if "error" in unit:
            click.echo(f"  {unit['error']}")
        _echo_families(unit.get("families", []), details=False)
    if down := probes.unrunnable(report):
        click.echo(f"\ncnisup check: no worker can run for: {', '.join(down)}", err=True)
        sys.exit(EX_START_FAILED)


def _echo_families(families: list[dict[str, Any]], *, details: bool) -> None:
    for fam in families:
        state = fam["worker"] or ("idle" if fam.get("idle") else "none")
        click.echo(f"\n[{fam['family']}] -> {state}: {fam['reason']}")
        for name, p in {**fam["probes"], **fam["audits"]}.items():
            mark = "ok  " if p["ok"] else "FAIL"
            click.echo(f"  {mark} {name}: {p['reason']}")
            for key, value in p.items():
                if not details or key in ("ok", "reason"):
                    continue
                for item in value if isinstance(value, list) else [value]:  # a list: one line each
                    click.echo(f"       {key}: {item}")


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
    except (TimeoutError, ConnectionError) as exc:
        click.echo(f"cnisup status: {exc}", err=True)
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
        if w["state"] in ("unavailable", "idle", "disabled", "failed") and w.get("reason"):
            click.echo(f"{'':8} {w['reason']}")
        if isinstance((w.get("info") or {}).get("summary"), str):
            click.echo(f"{'':8} {w['info']['summary'][:500]}")


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
@click.option("--wait", is_flag=True, help="Wait for an endpoint that does not exist yet (cnisup not started).")
@click.option("--count", type=int, default=0, help="Exit after this many events (0: never).")
@click.option("--timeout", type=float, default=0.0, help="Exit after this many seconds without events (0: never).")
@click.option("--curve-server-key", type=click.Path(exists=True, dir_okay=False),
              help="Public certificate of the publisher (CURVE endpoints).")
@click.option("--curve-key", type=click.Path(exists=True, dir_okay=False),
              help="This subscriber's secret certificate (CURVE endpoints).")
def tail(config_path: str | None, preset: str | None, endpoints: tuple[str, ...], topics: tuple[str, ...],
         kinds: tuple[str, ...], pod: tuple[str, str] | None, namespace: str | None, container: str | None,
         failed: bool, output: str, as_json: bool, since: int | None, wait: bool, count: int, timeout: float,
         curve_server_key: str | None, curve_key: str | None) -> None:
    """Subscribe and print events; reports every loss (sequence gaps, and what
    supervisor.progress says was published but never arrived)."""
    cfg = None if endpoints else _load(config_path, preset)
    eps = list(endpoints) or (cfg.publish.endpoints if cfg else [])
    filters = Filters(kinds=kinds, pod=pod, namespace=namespace, container=container, failed=failed)
    out = render.Printer("json" if as_json else output)
    began = time.time()
    _reachable_or_exit(eps, wait=wait)
    with Subscriber(eps, topics=list(topics), curve=_curve_client(curve_server_key, curve_key)) as sub:
        if wait:
            sub.subscribed_at = began  # what was published while we waited was meant for us too
        follow = _Follow(sub, out, cfg.control.endpoint if cfg else None, Match(filters))
        if since is not None:
            follow.stitch = Stitch(answers.open_journal(lambda: _load(config_path, preset), ()),
                                   dataclasses.replace(filters, since_ns=since))
            for env in follow.stitch.replay():
                out(env)
                if count and out.seen >= count:
                    return
        follow.seed()
        try:
            follow.run(count=count, timeout_s=timeout)
        except KeyboardInterrupt:
            pass
    if timeout and not out.seen:
        click.echo(f"cnisup tail: no event from {', '.join(eps)} within {timeout:g} s", err=True)
        sys.exit(EX_START_FAILED)


def _reachable_or_exit(endpoints: list[str], *, wait: bool) -> None:
    """ZeroMQ would wait silently for a socket that is not there or not ours: say so
    (a socket not there yet is waited for with --wait; one we may not open never)."""
    while True:
        problems = [(ep, exc) for ep in endpoints if (exc := reach.unreachable(ep)) is not None]
        if not problems:
            return
        ep, exc = problems[0]
        if not wait or not isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            click.echo(f"cnisup tail: {reach.describe(ep, exc)}", err=True)
            sys.exit(EX_START_FAILED)
        time.sleep(0.1)


class _Follow:
    """The live part of ``tail``: print what matches, report every loss, and
    fetch the supervisor's own events it missed at the start (``replay``)."""

    #: Seconds between looks at what progress events promised.
    LOSS_CHECK_S = 1.0

    def __init__(self, sub: Subscriber, out: render.Printer, control_endpoint: str | None,
                 match: Match) -> None:
        self.sub, self.out, self.control, self.match = sub, out, control_endpoint, match
        self.stitch: Stitch | None = None
        self.seen: set[str] = set()
        #: Seqs of the supervisor's events shown from its replay buffer, per incarnation:
        #: the subscription took effect at some moment after ``subscribed_at``, so some
        #: of them also arrive live and must not be shown twice.
        self.recovered: dict[str, set[int]] = {}

    def seed(self) -> None:
        """Where every incarnation stands now: what follows must be contiguous."""
        if self.control is None:
            return
        time.sleep(0.2)  # our subscription reaches the proxy first
        try:
            reply = control.request(self.control, "progress", timeout_ms=1000)
        except (TimeoutError, ConnectionError, zmq.ZMQError, ValueError):
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
            if env["source"] == "supervisor" and env["seq"] in self.recovered.get(env["incarnation"], ()):
                self.recovered[env["incarnation"]].discard(env["seq"])  # each arrives live at most once
                continue
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
        except (TimeoutError, ConnectionError, zmq.ZMQError, ValueError):
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
        self.recovered.setdefault(incarnation, set()).update(e["seq"] for e in missed)
        for env in missed:
            if env["kind"] == STARTED and isinstance(env["data"].get("incarnation"), str):
                self.sub.gaps.started(env["data"]["incarnation"])
            self._show(env)
        return len(envs) == last - first + 1


def _parse(text: str) -> dict[str, Any] | None:
    try:
        return envelope.decode_payload(text)
    except ProtocolError:
        return None


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
@log_level_option
def config_show(config_path: str | None, preset: str | None, log_level: str | None) -> None:
    """The effective configuration: defaults < preset < file < environment < flags."""
    cfg = _load(config_path, preset, log_level)
    click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="cnisup", show_default=True, help="Base name of the certificate files.")
@click.option("--force", is_flag=True, help="Replace an existing key pair of that name.")
def keygen(directory: str, name: str, force: bool) -> None:
    """Create a CURVE key pair (NAME.key public, NAME.key_secret secret) in DIRECTORY."""
    import zmq.auth
    existing = [p for p in (Path(directory) / f"{name}.key", Path(directory) / f"{name}.key_secret") if p.exists()]
    if existing and not force:
        click.echo(f"cnisup keygen: {existing[0]} exists; not overwriting it (--force replaces the pair)", err=True)
        sys.exit(EX_START_FAILED)
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(secret).chmod(0o600)
    click.echo(f"public: {public}\nsecret: {secret}")


def _config_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return config_option(preset_option(f))


main.add_command(answers.history_command(_load, _config_options))
main.add_command(answers.explain_group(_load, _config_options))
main.add_command(answers.kinds_command)
main.add_command(fleet.fleet_group(_load, _config_options))
