"""The comparison arithmetic: saturation throughput per server and the two targets against the best peer.

Targets (issue 6):
  1. our saturation throughput >= 1.5x the best peer's (best = highest saturation throughput);
  2. our p99 at half of our saturation rate <= the best peer's p50 at that same offered rate (open loop;
     best = lowest p50 among the peers that answered nearly every request at that rate, else among all).

Saturation throughput is the highest goodput (200 responses per second) a server reached over the
closed-loop concurrency levels. Phases are the ``run_loadtest`` phase dicts with ``server`` added.
"""

from __future__ import annotations

THROUGHPUT_TARGET = 1.5
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
    """Saturation per server and both targets; a target is ``None`` (not judged) when a side is missing."""
    sat = {name: saturation(phases, name) for name in servers}
    peers = [name for name in servers if name != ours]
    result: dict = {"saturation": sat, "throughput": None, "latency": None}
    ours_sat = sat.get(ours)
    measured = [p for p in peers if sat[p]]
    if ours_sat and measured:
        best = max(measured, key=lambda p: sat[p]["rps"])
        ratio = ours_sat["rps"] / sat[best]["rps"]
        result["throughput"] = {
            "ours_rps": ours_sat["rps"], "best_peer": best, "best_peer_rps": sat[best]["rps"], "ratio": ratio,
            "target": THROUGHPUT_TARGET, "passed": ratio >= THROUGHPUT_TARGET,
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
    return result


def verdict_lines(comparison: dict) -> list[str]:
    """The two printed comparisons (or why one could not be judged)."""
    lines = []
    t = comparison["throughput"]
    if t:
        lines.append(f"throughput: ours {t['ours_rps']:.1f} req/s at saturation vs best peer {t['best_peer']} "
                     f"{t['best_peer_rps']:.1f} req/s = {t['ratio']:.2f}x (target >= {t['target']:.1f}x): "
                     f"{'PASS' if t['passed'] else 'FAIL'}")
    else:
        lines.append("throughput: not judged (needs ours and at least one peer with a saturation throughput)")
    lat = comparison["latency"]
    if lat:
        note = "" if lat["best_peer_kept_up"] else " (no peer answered >= 99% of requests at this rate)"
        lines.append(f"latency at {lat['rate_rps']:.1f} req/s (half our saturation): "
                     f"ours p99 {lat['ours_p99_ms']:.1f} ms "
                     f"vs best peer {lat['best_peer']} p50 {lat['best_peer_p50_ms']:.1f} ms "
                     f"(target: ours p99 <= peer p50): {'PASS' if lat['passed'] else 'FAIL'}{note}")
    else:
        lines.append("latency: not judged (needs open-loop phases of ours and a peer at half our saturation rate)")
    return lines
