"""Side-by-side outputs: ``side_by_side.json`` (everything), ``side_by_side.md`` (the tables) and
``side_by_side.png`` (throughput, p50 and p99 against offered load, one line per server)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import FuncFormatter, NullFormatter

from scripts.benchlib.peers.compare import verdict, verdict_lines
from scripts.benchlib.report import plt, save_figure, write_json

KNOBS = ("max_batch_size", "max_wait_ms", "workers", "engine_workers", "instances", "replicas", "threads")


def _fmt(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _phase_cell(phase: dict | None) -> str:
    """``req/s · p50/p99 ms`` (and the non-200 count) of one phase."""
    if phase is None:
        return "-"
    lat = phase["latency"]
    failed = phase["requests"] - phase["ok"]
    cell = f"{_fmt(phase['goodput_rps'])} · {_fmt(lat['p50_ms'])}/{_fmt(lat['p99_ms'])}"
    return cell + (f" · {failed} failed" if failed else "") + (" †" if phase.get("disturbed") else "")


def _find(phases: list[dict], server: str, mode: str, level: float) -> dict | None:
    for phase in phases:
        if phase["server"] == server and phase["mode"] == mode and phase["level"] == level:
            return phase
    return None


def settings_cell(settings: dict) -> str:
    shown = [f"{k}={settings[k]}" for k in KNOBS if k in settings]
    shown += [f"{k}={v}" for k, v in settings.items() if k not in KNOBS]
    return ", ".join(shown)


def overall_accuracy(phases: list[dict], server: str) -> float | None:
    """Accuracy over every text the server answered in all its phases."""
    scored = [(p["accuracy"], p.get("scored_texts", 0)) for p in phases
              if p["server"] == server and p["accuracy"] is not None]
    total = sum(n for _, n in scored)
    return sum(a * n for a, n in scored) / total if total else None


def markdown(report: dict) -> str:
    """The comparison as markdown: verdicts, servers (versions, settings), then one table per mode."""
    servers, phases = report["servers"], report["phases"]
    names = [n for n, s in servers.items() if s.get("status") == "measured"]
    sat = report["comparison"]["saturation"]
    lines = ["# Side by side", "", f"{report['started']} · {report['environment']['cpu']} "
             f"({report['environment']['usable_cpus']} CPUs usable) · data `{report['config']['data']}` · "
             f"model `{report['config']['checkpoint']}` (max length {report['config']['max_length']})", ""]
    if report.get("interrupted"):
        lines += [f"**Interrupted** ({report['interrupted']}): partial results.", ""]
    lines += [f"- {line}" for line in verdict_lines(report["comparison"])]
    lines += equal_concurrency_lines(report["comparison"], phases)
    lines += ["", "## Servers", "", "| server | status | versions | settings | saturation req/s (at c) | "
              "idle CPU % | accuracy (all phases) |", "|---|---|---|---|---|---|---|"]
    for name, info in servers.items():
        versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
        s = sat.get(name)
        saturated = f"{s['rps']:.1f} (c={s['level']:g})" if s else "-"
        accuracy = _fmt(overall_accuracy(phases, name), ".3f")
        lines.append(f"| {name} | {info.get('status')} | {versions or '-'} | {settings_cell(info.get('settings', {}))} "
                     f"| {saturated} | {_fmt(info.get('idle_cpu_percent'))} | {accuracy} |")
    for mode, title, key in (("closed", "Closed loop: goodput req/s · p50/p99 ms, by concurrency", "concurrency"),
                             ("open", "Open loop (Poisson): goodput req/s · p50/p99 ms, by offered rate", "rate")):
        levels = sorted({p["level"] for p in phases if p["mode"] == mode})
        if not levels:
            continue
        lines += ["", f"## {title}", "", "| server | " + " | ".join(f"{key} {lv:g}" for lv in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for name in names:
            cells = [_phase_cell(_find(phases, name, mode, lv)) for lv in levels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    disturbed = [p for p in phases if p.get("disturbed")]
    if disturbed:
        lines += ["", "† disturbed phases (their numbers are not the server's own; rerun on a quiet machine):", ""]
        lines += [f"- {p['server']} {p['mode']} {p['level']:g}: {p['disturbed']}" for p in disturbed]
    lines += start_retry_lines(servers)
    failed = {n: s for n, s in servers.items() if s.get("status") != "measured"}
    if failed:
        lines += ["", "## Not measured", ""]
        lines += [f"- {n}: {s.get('status')}: {s.get('error', '')}" for n, s in failed.items()]
    lines += perf_analyzer_lines(report.get("perf_analyzer") or {})
    gen = report.get("generator")
    if gen and gen.get("throughput_rps"):
        lines += ["", f"Generator ceiling: {gen['throughput_rps']:.0f} req/s on GET {gen['path']} "
                  f"({gen['client_cpu_ms_per_request']:.2f} ms client CPU per request); the generator shares the CPUs."]
    return "\n".join(lines) + "\n"


def _ratio_cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}×"


def _disturbed(phases: list[dict], level: float, *servers: str | None) -> str:
    hit = any((found := _find(phases, name, "closed", level)) and found.get("disturbed") for name in servers if name)
    return " †" if hit else ""


def equal_concurrency_lines(comparison: dict, phases: list[dict]) -> list[str]:
    """Ours against the best peer at each concurrency level, then the best-of-sweep (saturation) ratio; † where
    either side's phase was disturbed."""
    eq, t = comparison.get("equal_concurrency"), comparison.get("throughput")
    if not eq or not eq["levels"]:
        return []
    lines = ["", "## Ours / best peer, at equal concurrency and at saturation", "",
             "| closed loop | ours req/s | best peer req/s | ours / best peer | target |", "|---|---|---|---|---|"]
    for row in eq["levels"]:
        peer = f"{row['best_peer']} {row['best_peer_rps']:.1f}" if row["best_peer"] else "-"
        mark = _disturbed(phases, row["concurrency"], "ours", row["best_peer"])
        lines.append(f"| concurrency {row['concurrency']:g} | {_fmt(row['ours_rps'])} | {peer} | "
                     f"{_ratio_cell(row['ratio'])}{mark} | ≥ {eq['target']:g}×: {verdict(row['passed'])} |")
    if t:
        mark = _disturbed(phases, t["ours_level"], "ours") or _disturbed(phases, t["best_peer_level"], t["best_peer"])
        lines.append(f"| saturation (best of sweep) | {t['ours_rps']:.1f} (c={t['ours_level']:g}) | {t['best_peer']} "
                     f"{t['best_peer_rps']:.1f} (c={t['best_peer_level']:g}) | {_ratio_cell(t['ratio'])}{mark} | "
                     f"≥ {t['target']:g}×: {verdict(t['passed'])} |")
    return lines


def start_retry_lines(servers: dict) -> list[str]:
    """Servers that needed more than one start: each failed attempt's last error line and its kept log."""
    lines = []
    for name, info in servers.items():
        failures = info.get("failed_starts") or []
        if not failures:
            continue
        outcome = f"started on attempt {len(failures) + 1}" if info.get("status") != "start failed" else "start failed"
        lines.append(f"- {name}: {outcome}; " + "; ".join(
            f"failed attempt {f['attempt']}: {f['log']} ({_last_line(f['error'])})" for f in failures))
    return ["", "## Start retries", "", *lines] if lines else []


def _last_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[-1][-200:] if stripped else "-"


def perf_analyzer_lines(section: dict) -> list[str]:
    """Triton's perf_analyzer on the OIP v2 servers: infer/s · p50/p99 ms per server and protocol, by concurrency."""
    if section.get("error"):
        return ["", "## perf_analyzer", "", f"Not run: {section['error']}"]
    results = section.get("results") or []
    if not results:
        return []
    levels = sorted({r["concurrency"] for r in results})
    rows = list(dict.fromkeys((r["server"], r["protocol"]) for r in results))
    lines = ["", f"## perf_analyzer ({section.get('tool')}): infer/s · p50/p99 ms, one text per request, by "
             "concurrency", "", "| server | protocol | " + " | ".join(f"concurrency {lv}" for lv in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    for server, protocol in rows:
        cells = []
        for level in levels:
            found = next((r for r in results if (r["server"], r["protocol"], r["concurrency"]) == (server, protocol,
                                                                                                  level)), None)
            if found is None:
                cells.append("-")
            elif found["error"]:
                cells.append("failed")
            else:
                cells.append(f"{found['throughput_rps']:.1f} · {found['p50_ms']:.1f}/{found['p99_ms']:.1f}")
        lines.append(f"| {server} | {protocol} | " + " | ".join(cells) + " |")
    failures = [r for r in results if r["error"]]
    lines += [f"- {r['server']} {r['protocol']} c={r['concurrency']} failed: {r['error']}" for r in failures]
    return lines


def _series(phases: list[dict], server: str, mode: str) -> list[dict]:
    return sorted((p for p in phases if p["server"] == server and p["mode"] == mode), key=lambda p: p["level"])


def plot(report: dict, path: Path) -> Path:
    """Three panels: goodput, p50 and p99 against concurrency (closed loop); open-loop points as a fourth."""
    phases = report["phases"]
    names = [n for n, s in report["servers"].items() if s.get("status") == "measured"]
    has_open = any(p["mode"] == "open" for p in phases)
    fig, axes = plt.subplots(1, 4 if has_open else 3, figsize=(19 if has_open else 15, 4.3))
    for index, name in enumerate(names):
        color = f"C{index}"
        closed = _series(phases, name, "closed")
        levels = [p["level"] for p in closed]
        axes[0].plot(levels, [p["goodput_rps"] or 0 for p in closed], marker="o", color=color, label=name)
        axes[1].plot(levels, [p["latency"]["p50_ms"] for p in closed], marker="o", color=color, label=name)
        axes[2].plot(levels, [p["latency"]["p99_ms"] for p in closed], marker="o", color=color, label=name)
        if has_open:
            opened = _series(phases, name, "open")
            rates = [p["level"] for p in opened]
            axes[3].plot(rates, [p["latency"]["p50_ms"] for p in opened], marker="o", color=color, label=f"{name} p50")
            axes[3].plot(rates, [p["latency"]["p99_ms"] for p in opened], marker="x", linestyle="--", color=color,
                         label=f"{name} p99")
    axes[0].set(title="throughput (200s)", xlabel="concurrency (closed loop)", ylabel="requests / s")
    axes[1].set(title="p50 latency", xlabel="concurrency (closed loop)", ylabel="ms")
    axes[2].set(title="p99 latency", xlabel="concurrency (closed loop)", ylabel="ms")
    if has_open:
        axes[3].set(title="open loop latency", xlabel="offered rate, requests/s (Poisson)", ylabel="ms")
    concurrencies = sorted({p["level"] for p in phases if p["mode"] == "closed"})
    for ax in axes[:3]:
        ax.set_xscale("log", base=2)
        if concurrencies:
            ax.set_xticks(concurrencies)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in axes[1:]:
        ax.set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle("side by side: same model, same load, same machine")
    return save_figure(fig, path)


def write_outputs(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "side_by_side.md"
    md.write_text(markdown(report))
    return [write_json(report, out_dir / "side_by_side.json"), md, plot(report, out_dir / "side_by_side.png")]
