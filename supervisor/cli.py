"""The ``cnisup`` command (click only: every action lives in its module)."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from cnisup.protocol import exitcodes, reach
from cnisup.protocol.envelope import ProtocolError
from cnisup.protocol.subscriber import CurveClient, Subscriber
from cnisup.supervisor import __version__, config, control, probes, service
from cnisup.supervisor.supervisor import StartError, Supervisor
from cnisup.workers import logs

EX_START_FAILED = 1

# Plain strings, checked by config.load like every other configuration input
# (a bad value is one line and exit 78, as for the file).
config_option = click.option("--config", "config_path", metavar="FILE",
                             help="YAML configuration file (see config_example.yaml).")
preset_option = click.option("--preset", metavar="|".join(config.PRESETS),
                             help="Preset under the file's keys (overrides the file's 'preset').")
log_level_option = click.option("--log-level", metavar="|".join(config.LOG_LEVELS),
                                help="Overrides log_level and $LOG_LEVEL.")


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
@log_level_option
def start(config_path: str | None, preset: str | None, log_level: str | None) -> None:
    """Run the supervisor in the foreground until SIGTERM/SIGINT (SIGHUP reloads)."""
    cfg = _load(config_path, preset, log_level)
    logs.setup(cfg.log_level, "%(name)s")
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
        for name, p in fam["probes"].items():
            mark = "ok  " if p["ok"] else "FAIL"
            click.echo(f"  {mark} {name}: {p['reason']}")
            for key, value in p.items():
                if details and key not in ("ok", "reason"):
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
        if w.get("last_exit"):
            click.echo(f"{'':8} last exit: {w['last_exit']['reason']}")
        if w["state"] in ("unavailable", "idle", "disabled", "failed") and w.get("reason"):
            click.echo(f"{'':8} {w['reason']}")


def _human(env: dict[str, Any]) -> str:
    ts = datetime.datetime.fromtimestamp(env["ts"] / 1e9, tz=datetime.UTC)
    data = env["data"]
    parts = []
    for key, value in data.items():
        if isinstance(value, str) and len(value) == 64 and key.endswith("sha256"):
            value = value[:12]
        parts.append(f"{key}={json.dumps(value, separators=(',', ':')) if not isinstance(value, str) else value}")
    return f"{ts:%H:%M:%S}.{ts.microsecond // 1000:03d} {env['source']:12} {env['kind']:34} {' '.join(parts)}"


@main.command()
@config_option
@preset_option
@click.option("--endpoint", "endpoints", multiple=True, help="Connect here instead of the config's endpoints.")
@click.option("--topic", "topics", multiple=True, help="Topic prefix to subscribe to (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON envelope per line.")
@click.option("--count", type=int, default=0, help="Exit after this many events (0: never).")
@click.option("--timeout", type=float, default=0.0, help="Exit after this many seconds without events (0: never).")
@click.option("--curve-server-key", type=click.Path(exists=True, dir_okay=False),
              help="Public certificate of the publisher (CURVE endpoints).")
@click.option("--curve-key", type=click.Path(exists=True, dir_okay=False),
              help="This subscriber's secret certificate (CURVE endpoints).")
def tail(config_path: str | None, preset: str | None, endpoints: tuple[str, ...], topics: tuple[str, ...],
         as_json: bool, count: int, timeout: float, curve_server_key: str | None, curve_key: str | None) -> None:
    """Subscribe and print events; reports sequence gaps (lost events)."""
    eps = list(endpoints) or _load(config_path, preset).publish.endpoints
    curve = None
    if curve_server_key or curve_key:
        if not (curve_server_key and curve_key):
            raise click.UsageError("--curve-server-key and --curve-key go together")
        import zmq.auth
        server_public, _ = zmq.auth.load_certificate(curve_server_key)
        public, secret = zmq.auth.load_certificate(curve_key)
        if secret is None:
            raise click.UsageError(f"{curve_key} holds no secret key")
        curve = CurveClient(server_public, public, secret)
    for ep in eps:  # ZeroMQ would wait silently for a socket that is not there or not ours
        if (exc := reach.unreachable(ep)) is not None:
            click.echo(f"cnisup tail: {reach.describe(ep, exc)}", err=True)
            sys.exit(EX_START_FAILED)
    seen = 0
    with Subscriber(eps, topics=list(topics), curve=curve) as sub:
        if not sub.detect_gaps:
            click.echo("cnisup tail: topic filter set, so sequence gaps are not loss; gap detection off",
                       err=True)
        try:
            while True:
                try:
                    got = sub.recv(int(timeout * 1000) if timeout else None)
                except ProtocolError as exc:
                    click.echo(f"! malformed message: {exc}", err=True)
                    continue
                if got is None:
                    break
                env, gap = got
                if gap is not None:
                    click.echo(f"! lost {gap.lost} event(s) from {gap.source} incarnation {gap.incarnation} "
                               f"(seq {gap.expected}..{gap.got - 1})", err=True)
                click.echo(json.dumps(env, separators=(",", ":")) if as_json else _human(env))
                seen += 1
                if count and seen >= count:
                    break
        except KeyboardInterrupt:
            pass
    if timeout and not seen:
        click.echo(f"cnisup tail: no event from {', '.join(eps)} within {timeout:g} s", err=True)
        sys.exit(EX_START_FAILED)


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
