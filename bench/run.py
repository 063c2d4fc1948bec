"""``make bench``: run every comparison, write bench/results.json and
docs/BENCHMARKS.md with one plot per comparison.

Each comparison runs the primary and the fallback worker under the same load
in the same run; numbers are ratios measured side by side, so they mean
something on a noisy machine. ``--quick`` shortens every phase (< 3 min)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import bus, config_family, startup
from .common import machine

ROOT = Path(__file__).resolve().parents[1]

Comparison = Callable[[bool], tuple[list[dict[str, Any]], dict[str, Any]]]
COMPARISONS: dict[str, Comparison] = {
    "config": config_family.run,
    "bus": bus.run,
    "startup": startup.run,
}


def _fmt(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "n/a"
    if unit == "bytes":
        return f"{v / 2**20:.1f} MiB"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def plot(details: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """One PNG per comparison; returns name -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    if "config" in details:
        d = details["config"]
        fig, ax = plt.subplots(figsize=(7, 4))
        for worker in ("inotify", "file-poll"):
            lat = sorted(d[worker]["latencies_ms"])
            if lat:
                ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=worker)
        ax.set_xscale("log")
        ax.set_xlabel("detection latency, file operation -> subscriber (ms, log)")
        ax.set_ylabel("fraction of changes")
        ax.set_title("Config family: inotify vs file-poll")
        ax.legend()
        ax.grid(True, alpha=0.3)
        files["config"] = "bench-config-latency.png"
        fig.savefig(out_dir / files["config"], dpi=90, bbox_inches="tight")
        plt.close(fig)
    if "bus" in details:
        d = details["bus"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        steps = d["steps"]
        a1.plot([s["achieved"] for s in steps], [s["lost"] for s in steps], marker="o")
        a1.set_xlabel("events/s achieved")
        a1.set_ylabel("events lost in the step")
        a1.set_title("Loss vs rate")
        a1.grid(True, alpha=0.3)
        a2.hist(d["latencies_ms"], bins=50)
        a2.set_xlabel("latency at 1k events/s (ms)")
        a2.set_title("Bus latency")
        files["bus"] = "bench-bus.png"
        fig.savefig(out_dir / files["bus"], dpi=90, bbox_inches="tight")
        plt.close(fig)
    if "startup" in details:
        d = details["startup"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot([d["primary_s"], d["fallback_s"]], labels=["inotify", "file-poll"])
        ax.set_ylabel("cnisup start -> supervisor.ready (s)")
        ax.set_title("Start-up")
        files["startup"] = "bench-startup.png"
        fig.savefig(out_dir / files["startup"], dpi=90, bbox_inches="tight")
        plt.close(fig)
    return files


def report(results: dict[str, Any], plots: dict[str, str]) -> str:
    m = results["machine"]
    lines = [
        "# cnisup benchmarks",
        "",
        f"Measured {results['date']} on {m['os']}, kernel {m['kernel']}, {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_bytes'] / 2**30:.0f} GiB, Python {m['python']}, libzmq {m['zmq']}; "
        f"mode: {'quick' if results['quick'] else 'full'}; {results['duration_s']:.0f} s in all.",
        "",
        "Regenerate with `make bench` (full) or `make bench QUICK=1`. Primary and fallback run under the same",
        "load in the same run; the ratio is fallback / primary. Absolute times are from a small shared VM",
        "and are noisy; the ratios are the point.",
        "",
        "| comparison | metric | primary | fallback | ratio | unit |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["comparisons"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3g}"
        lines.append(f"| {r['name']} | {r['metric']} | {_fmt(r['primary'], r['unit'])} | "
                     f"{_fmt(r['fallback'], r['unit'])} | {ratio} | {r['unit']} |")
        if r.get("note"):
            lines.append(f"| | *{r['note']}* | | | | |")
    lines += ["", "## Plots", ""]
    for name, file in plots.items():
        lines += [f"### {name}", "", f"![{name}]({file})", ""]
    lines += [
        "## What each comparison does",
        "",
        "- **config**: the same change workload for each worker (new files, atomic replaces via rename,",
        "  rewrites with identical bytes that must emit nothing, deletions), spread over one poll interval,",
        "  timed from the file operation to the event at an external raw SUB socket. Idle syscalls are",
        "  counted with `strace -c -f` on the worker over the idle period and scaled to an hour.",
        "- **bus**: a publisher using the workers' own `Bus` connects to the supervisor's private socket like",
        "  a worker; an external subscriber measures latency at 1,000 events/s, then the rate is stepped up",
        "  until events are lost (sequence holes or counted drops) or the publisher cannot go faster.",
        "- **startup**: `cnisup start` until `supervisor.ready` arrives at a subscriber, median of several",
        "  runs, with the inotify worker and with file-poll.",
        "- Families whose workers this version does not ship yet (kernel, k8s) have no rows.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated comparisons: " + ",".join(COMPARISONS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    chosen = [c for c in (args.only.split(",") if args.only else COMPARISONS) if c]
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    for name in chosen:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        r, d = COMPARISONS[name](args.quick)
        rows += r
        details[name] = d
    results = {"machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "quick": args.quick, "duration_s": time.monotonic() - t0, "comparisons": rows}
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    plots = plot(details, docs)
    (docs / "BENCHMARKS.md").write_text(report(results, plots))
    print(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
