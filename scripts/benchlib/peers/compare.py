"""The comparison arithmetic: throughput per server at each load and the three targets against the best peer.

Targets (issue 17):
  1. at every closed-loop concurrency level swept, our goodput >= 1.5x the best peer's at that same level
     (best = the peer with the highest goodput there): ahead at every load, not only at the best one;
  2. our saturation throughput >= 2x the best peer's (best-of-sweep: each server's highest goodput over
     the levels, wherever it reached it);
  3. our p99 at half of our saturation rate <= the best peer's p50 at that same offered rate (open loop;
     best = lowest p50 among the peers that answered nearly every request at that rate, else among all).
Each is met, not met, or not judged (a side missing). Target 1 is met only when every level was judged.

Phases are the ``run_loadtest`` phase dicts with ``server`` added; goodput counts 200 responses only.
"""

from __future__ import annotations

LEVEL_TARGET = 1.5
SATURATION_TARGET = 2.0
HALF = 0.5
KEPT_UP = 0.99  # share of requests answered 200 for a peer's p50 to count as "keeping up"


def saturation(phases: list[dict], server: str) -> dict | None:
    """``{"rps", "level"}`` of the server's best closed-loop goodput; None when it never answered."""
    best = None
    for phase in phases:
        if phase["server"] != server or phase["mode"] != "closed" or not phase.get("goodput_rps"):
            continue
        if best is None or phase["goodput_rps"] > best["rps"]:
            best = {"rps": phase["goodput_rps"], "level": phase["level"]}
    return best


def closed_goodput(phases: list[dict], server: str, level: float) -> float | None:
    """The server's goodput in its closed-loop phase at ``level``; None when it has no such phase."""
    for phase in phases:
        if phase["server"] == server and phase["mode"] == "closed" and phase["level"] == level:
            return phase.get("goodput_rps") or 0.0
    return None


def equal_concurrency(phases: list[dict], servers: list[str], ours: str = "ours") -> dict:
    """Ours / best peer at each closed-loop level: the ratio at equal load, and whether every level met it."""
    levels = sorted({p["level"] for p in phases if p["mode"] == "closed" and p["server"] in servers})
    rows = []
    for level in levels:
        ours_rps = closed_goodput(phases, ours, level)
        peers = {p: rps for p in servers if p != ours and (rps := closed_goodput(phases, p, level)) is not None}
        row: dict = {"concurrency": level, "ours_rps": ours_rps, "peers_rps": peers, "best_peer": None,
                     "best_peer_rps": None, "ratio": None, "passed": None}
        if ours_rps is not None and peers:
            best = max(peers, key=lambda p: peers[p])
            ratio = ours_rps / peers[best] if peers[best] > 0 else None  # no peer answered: ours ahead if it did
            row.update(best_peer=best, best_peer_rps=peers[best], ratio=ratio,
                       passed=ratio >= LEVEL_TARGET if ratio is not None else ours_rps > 0)
        rows.append(row)
    judged = [r for r in rows if r["passed"] is not None]
    if any(not r["passed"] for r in judged):
        passed = False
    elif judged and len(judged) == len(rows):
        passed = True
    else:
        passed = None  # nothing judged, or a level without ours or without any peer: not every level was seen
    return {"levels": rows, "target": LEVEL_TARGET, "passed": passed}


def ok_share(phase: dict) -> float:
    return phase["ok"] / phase["requests"] if phase["requests"] else 0.0


def open_phase(phases: list[dict], server: str, rate: float, tolerance: float = 1e-6) -> dict | None:
    for phase in phases:
        if phase["server"] == server and phase["mode"] == "open" and abs(phase["level"] - rate) <= tolerance * rate:
            return phase
    return None


def _ms(phase: dict | None, q: str) -> float | None:
    return phase["latency"][f"{q}_ms"] if phase and phase["latency"]["count"] else None


def compare(phases: list[dict], servers: list[str], ours: str = "ours", half_rate: float | None = None) -> dict:
    """Saturation per server, ours against the best peer at each level, and the three targets.

    ``passed`` of a target is ``None`` (not judged) when a side is missing; ``targets`` sums them up.
    """
    sat = {name: saturation(phases, name) for name in servers}
    peers = [name for name in servers if name != ours]
    result: dict = {"saturation": sat, "equal_concurrency": equal_concurrency(phases, servers, ours),
                    "throughput": None, "latency": None}
    ours_sat = sat.get(ours)
    measured = [p for p in peers if sat[p]]
    if ours_sat and measured:
        best = max(measured, key=lambda p: sat[p]["rps"])
        ratio = ours_sat["rps"] / sat[best]["rps"]
        result["throughput"] = {
            "ours_rps": ours_sat["rps"], "ours_level": ours_sat["level"], "best_peer": best,
            "best_peer_rps": sat[best]["rps"], "best_peer_level": sat[best]["level"], "ratio": ratio,
            "target": SATURATION_TARGET, "passed": ratio >= SATURATION_TARGET,
        }
    if ours_sat and half_rate is None:
        half_rate = HALF * ours_sat["rps"]
    ours_open = open_phase(phases, ours, half_rate) if half_rate else None
    peer_open = {p: open_phase(phases, p, half_rate) for p in peers} if half_rate else {}
    peer_p50 = {p: _ms(ph, "p50") for p, ph in peer_open.items() if _ms(ph, "p50") is not None}
    if ours_open and _ms(ours_open, "p99") is not None and peer_p50:
        kept_up = [p for p in peer_p50 if ok_share(peer_open[p]) >= KEPT_UP]
        best = min(kept_up or list(peer_p50), key=lambda p: peer_p50[p])
        ours_p99 = _ms(ours_open, "p99")
        result["latency"] = {
            "rate_rps": half_rate, "ours_p99_ms": ours_p99, "ours_p50_ms": _ms(ours_open, "p50"),
            "ours_ok_share": ok_share(ours_open), "best_peer": best, "best_peer_p50_ms": peer_p50[best],
            "best_peer_ok_share": ok_share(peer_open[best]), "best_peer_kept_up": best in kept_up,
            "peers_p50_ms": peer_p50, "passed": ours_p99 <= peer_p50[best],
        }
    result["targets"] = targets(result)
    return result


def verdict(passed: bool | None) -> str:
    """A target's (or one level's) outcome in words."""
    return "not judged" if passed is None else "met" if passed else "not met"


def targets(result: dict) -> dict:
    """The three targets, each ``{"target": what, "met": True | False | None (not judged), "verdict"}``."""
    sections = {
        "equal_concurrency": (result["equal_concurrency"],
                              f"ours >= {LEVEL_TARGET:g}x the best peer at every concurrency level"),
        "saturation": (result["throughput"], f"our saturation throughput >= {SATURATION_TARGET:g}x the best peer's"),
        "latency": (result["latency"], "our p99 at half our saturation rate <= the best peer's p50 there"),
    }
    return {name: {"target": what, "met": (section or {}).get("passed"),
                   "verdict": verdict((section or {}).get("passed"))}
            for name, (section, what) in sections.items()}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def verdict_lines(comparison: dict) -> list[str]:
    """The three targets, one line each: the figures and met / not met (or why it could not be judged)."""
    verdicts = comparison["targets"]
    eq = comparison["equal_concurrency"]
    judged = [r for r in eq["levels"] if r["best_peer"] is not None]
    if judged:
        per_level = ", ".join(f"c={r['concurrency']:g} {_ratio(r['ratio'])} vs {r['best_peer']}" for r in judged)
        missing = [f"{r['concurrency']:g}" for r in eq["levels"] if r["best_peer"] is None]
        note = f" (no comparison at c={', '.join(missing)}: ours or every peer missing there)" if missing else ""
        lines = [f"equal concurrency: ours / best peer at the same level: {per_level} (target >= {eq['target']:g}x "
                 f"at every level): {verdicts['equal_concurrency']['verdict']}{note}"]
    else:
        lines = ["equal concurrency: not judged (needs closed-loop phases of ours and a peer at the same level)"]
    t = comparison["throughput"]
    if t:
        lines.append(f"saturation: ours {t['ours_rps']:.1f} req/s (c={t['ours_level']:g}) vs best peer "
                     f"{t['best_peer']} {t['best_peer_rps']:.1f} req/s (c={t['best_peer_level']:g}) = "
                     f"{t['ratio']:.2f}x, best of sweep (target >= {t['target']:g}x): "
                     f"{verdicts['saturation']['verdict']}")
    else:
        lines.append("saturation: not judged (needs ours and at least one peer with a saturation throughput)")
    lat = comparison["latency"]
    if lat:
        note = "" if lat["best_peer_kept_up"] else " (no peer answered >= 99% of requests at this rate)"
        lines.append(f"latency at {lat['rate_rps']:.1f} req/s (half our saturation): "
                     f"ours p99 {lat['ours_p99_ms']:.1f} ms "
                     f"vs best peer {lat['best_peer']} p50 {lat['best_peer_p50_ms']:.1f} ms "
                     f"(target: ours p99 <= peer p50): {verdicts['latency']['verdict']}{note}")
    else:
        lines.append("latency: not judged (needs open-loop phases of ours and a peer at half our saturation rate)")
    return lines
