"""docs/RUNBOOK.md's commands, run for real against a live server.

Every command of the runbook that targets the server directly -- ``curl ... localhost:8000/...``,
``sentiment-analyzer <command>`` and ``kill -HUP <pid>`` -- is taken from the fenced ``bash`` blocks
and the inline `code` spans, rewritten to the live server (host:port, pid, ``$ADMIN_KEY``, the tiny
artifact for other artifact paths), run through ``bash -o pipefail -c`` with the server's environment,
and its exit status and output are checked. A runbook command that stops working fails here.

Skipped classes (by the command's first word). The first three because this machine has neither a
container engine nor a cluster, so their targets (containers, pods, the compose PostgreSQL) do not
exist here:

- ``docker ...`` (docker logs/exec/inspect/compose/run/update/kill): no container engine;
- ``kubectl ...`` (logs, exec, rollout, scale, patch, cp, run pg-check, ...): no Kubernetes cluster;
- ``pg_isready ...``: checks the compose / cluster PostgreSQL, not the server (the server's own
  database check is ``sentiment-analyzer doctor``, which runs);
- ``sentiment-analyzer serve``: names the server process itself; the live server *is* that command;
- ``kill`` other than ``kill -HUP`` (``kill -9``): named only as what never to do.

Every command in a fenced block (and every inline span that looks like one) must fall in a run or a
skipped class, and every run command needs an expectation in ``EXPECT``, so a new kind of command
cannot slip in untested.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from scripts.benchlib.serverproc import LiveServer, start_server, stop_server
from server.store.keys import KEY_PREFIX

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"

SKIPPED = {
    "docker": "needs a container engine (none here)",
    "kubectl": "needs a Kubernetes cluster (none here)",
    "pg_isready": "checks the compose/cluster PostgreSQL, not the server",
}
RUN = ("curl", "kill", "sentiment-analyzer")
COMMAND_TIMEOUT_S = 60


@dataclass(frozen=True)
class Command:
    line: int
    text: str

    @property
    def bare(self) -> str:
        """The command without a trailing ``# comment``."""
        return re.sub(r"\s+#\s.*$", "", self.text).strip()


def fenced_commands(markdown: str) -> list[Command]:
    """Commands of the ```bash blocks: continuation lines joined, comments and blank lines dropped."""
    commands, fence, pending, start = [], None, "", 0
    for number, raw in enumerate(markdown.splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence != "bash" or (not pending and (not line or line.startswith("#"))):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        commands.append(Command(start, pending + line))
        pending = ""
    return commands


def inline_spans(markdown: str) -> list[Command]:
    """Inline `code` spans outside fenced blocks (a span's line break counts as a space, as in Markdown)."""
    lines, fenced = [], False
    for raw in markdown.splitlines():
        if raw.strip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else raw)
    prose = "\n".join(lines)
    return [Command(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"`([^`]+)`", prose)]


def classify(command: Command) -> tuple[str, str]:
    """("run", ""), ("skip", why) or ("unknown", why)."""
    words = command.bare.split()
    first = words[0] if words else ""
    if first in SKIPPED:
        return "skip", SKIPPED[first]
    if first == "sentiment-analyzer" and len(words) > 1:
        if words[1] == "serve":
            return "skip", "the live server is `sentiment-analyzer serve`"
        return "run", ""
    if first == "curl":
        return ("run", "") if "localhost:8000" in command.text else ("unknown", "curl to something but the server")
    if first == "kill":
        if words[1:2] == ["-HUP"]:
            return "run", ""
        if words[1:2] in (["-9"], ["-KILL"]):
            return "skip", "the runbook names it only to forbid it"
        return "unknown", "a signal the runbook does not document"
    return "unknown", f"no rule for commands starting with {first!r}"


def looks_like_command(span: Command) -> bool:
    """An inline span is a command when it aims at the server or starts like one (not a metric, variable, PromQL)."""
    words = span.text.split()
    return "localhost:8000" in span.text or (len(words) > 1 and words[0] in RUN + tuple(SKIPPED))


def runbook_commands() -> tuple[list[Command], list[Command]]:
    """(commands to run, first occurrence each; commands that fall in no class)."""
    text = RUNBOOK.read_text()
    runnable, unknown, seen = [], [], set()
    for command in fenced_commands(text) + [s for s in inline_spans(text) if looks_like_command(s)]:
        kind, _ = classify(command)
        if kind == "unknown":
            unknown.append(command)
        elif kind == "run" and command.bare not in seen:
            seen.add(command.bare)
            runnable.append(command)
    return runnable, unknown


RUNNABLE, UNKNOWN = runbook_commands()


# --- the live server and the commands' environment ---------------------------------------------------------


@dataclass
class Context:
    server: LiveServer
    env: dict[str, str]
    artifact: Path
    admin_key: str

    @property
    def host_port(self) -> str:
        return self.server.url.removeprefix("http://")

    def metric(self, sample: str) -> float:
        text = httpx.get(self.server.url + "/metrics", timeout=10).text
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0


def shell(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)


def cli_shim(directory: Path) -> Path:
    """A `sentiment-analyzer` on PATH that runs this checkout's CLI with this interpreter (installed or not)."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "sentiment-analyzer"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" '
                    f'exec "{sys.executable}" -m server.cli "$@"\n')
    shim.chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def ctx(tiny_artifact, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runbook")
    server = start_server({"MODEL_PATH": str(tiny_artifact)}, tmp)
    try:
        env = dict(server.env)
        env["PATH"] = f"{cli_shim(tmp / 'bin')}:{env.get('PATH', '/usr/bin:/bin')}"
        created = shell("sentiment-analyzer keys create --name runbook --role admin", env)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        assert key.startswith(KEY_PREFIX), created.stdout
        env["ADMIN_KEY"] = key
        yield Context(server, env, tiny_artifact, key)
    finally:
        stop_server(server)


def fill(command: Command, ctx: Context) -> str:
    """The runbook command aimed at the live server: host:port, pid, artifact paths, key ids."""
    text = command.text.replace("localhost:8000", ctx.host_port)
    text = re.sub(r"/app/models/[\w./-]+", str(ctx.artifact), text)  # another artifact: the tiny one
    text = text.replace("<pid>", str(ctx.server.process.pid))
    if "<id>" in text:  # a key of its own, so revoking it hurts no other command
        created = shell("sentiment-analyzer keys create --name runbook-revoke", ctx.env)
        assert created.returncode == 0, created.stderr
        text = text.replace("<id>", re.search(r"id=(\w+)", created.stdout).group(1))
    left = re.findall(r"<[\w-]+>|/app/\S*|:8000\b", text)
    assert not left, f"RUNBOOK.md:{command.line}: cannot aim {left} at the live server in {command.text!r}"
    return text


# --- what each command must print ---------------------------------------------------------------------------

@dataclass
class Run:
    """The filled-in command; calling it runs it (a checker may look around the run, e.g. metrics before/after)."""

    command: str
    env: dict[str, str]

    def __call__(self) -> subprocess.CompletedProcess:
        return shell(self.command, self.env)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def json_values(text: str) -> list:
    decoder, values, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        value, at = decoder.raw_decode(text, at)
        values.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return values


def health_all(ctx: Context, run: Run) -> None:
    (health,) = json_values(ok(run()))
    assert health["status"] == "ok", health
    for key in ("reasons", "model", "device", "provider", "queue_depth", "token_budget", "cache", "database"):
        assert key in health, f"/health lacks {key!r} (the runbook describes it): {health}"


def health_status_reasons(ctx: Context, run: Run) -> None:
    assert json_values(ok(run())) == ["ok", []]


def health_status(ctx: Context, run: Run) -> None:
    assert json_values(ok(run())) == ["ok"]  # the runbook: prints "ok"


def health_database(ctx: Context, run: Run) -> None:
    (database,) = json_values(ok(run()))
    assert database["status"] == "ok", database


def health_model(ctx: Context, run: Run) -> None:
    (model,) = json_values(ok(run()))
    assert model["warm"] is True and model["name"] and model["version"] and model["variant"], model


def ready_code(ctx: Context, run: Run) -> None:
    assert ok(run()).strip() == "200"


def ready_verbose(ctx: Context, run: Run) -> None:
    head, _, body = ok(run()).replace("\r\n", "\n").partition("\n\n")
    assert re.match(r"HTTP/\S+ 200\b", head), head
    assert json.loads(body) == {"ready": True}


def metrics_grep(ctx: Context, run: Run) -> None:
    stdout = ok(run())
    pattern = re.search(r"grep -E '\^(\w*)\(([\w|]+)\) '", run.command).groups()
    for name in (pattern[0] + alternative for alternative in pattern[1].split("|")):
        assert re.search(rf"^{name} \S+$", stdout, re.M), f"/metrics has no sample {name}:\n{stdout}"


def reload_answer(ctx: Context, run: Run) -> None:
    outcome = json.loads(ok(run()))
    assert outcome["reloaded"] is True, outcome
    assert outcome["serving"]["name"] and outcome["previous"]["name"], outcome


def reload_by_signal(ctx: Context, run: Run) -> None:
    done = 'sentiment_model_reloads_total{result="ok"}'
    failed = 'sentiment_model_reloads_total{result="failed"}'
    before, failed_before = ctx.metric(done), ctx.metric(failed)
    ok(run())
    deadline = time.monotonic() + 30
    while ctx.metric(done) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ctx.metric(done) == before + 1, f"no reload after SIGHUP:\n{ctx.server.log()[-3000:]}"
    assert ctx.metric(failed) == failed_before
    assert ctx.server.process.poll() is None, "SIGHUP killed the server"


def doctor(ctx: Context, run: Run) -> None:
    # Against a running server the port check fails (the server holds PORT; the runbook says so); all else passes.
    result = run()
    port = ctx.host_port.rpartition(":")[2]
    checks = {name: state for state, name in re.findall(r"^\[(ok|FAIL)\s*\]\s+(\w+): ", result.stdout, re.M)}
    assert f"[FAIL] port: port {port} is already in use on 127.0.0.1" in result.stdout, result.stdout
    assert checks.pop("port") == "FAIL"
    assert set(checks) >= {"configuration", "model", "device", "database", "disk"}, result.stdout
    assert set(checks.values()) == {"ok"}, result.stdout
    assert result.returncode == 1, result.stdout


def db_upgrade(ctx: Context, run: Run) -> None:
    match = re.search(r"schema at revision (\S+) \(this release: (\S+)\)", ok(run()))
    assert match and match.group(1) == match.group(2), match


def db_current(ctx: Context, run: Run) -> None:
    assert ": up to date" in ok(run())


def keys_create(ctx: Context, run: Run) -> None:
    lines = ok(run()).strip().splitlines()
    assert re.match(r"created API key id=\w+ name='[\w-]+' role=admin$", lines[0]), lines
    assert lines[-1].startswith(KEY_PREFIX), lines


def keys_list(ctx: Context, run: Run) -> None:
    stdout = ok(run())
    assert stdout.startswith("id\tname\trole\t"), stdout
    assert re.search(r"^\w+\trunbook\tadmin\t", stdout, re.M), stdout
    assert ctx.admin_key not in stdout


def keys_revoke(ctx: Context, run: Run) -> None:
    assert re.match(r"revoked API key id=\w+ name='runbook-revoke' at \S+$", ok(run()).strip())
    again = ok(run()).strip()  # it said "revoked ... at" the first time again (red team helper-104)
    assert re.match(r"API key id=\w+ name='runbook-revoke' was already revoked, at \S+$", again), again


HEALTH, READY = r"^curl -s localhost:8000/health \| jq ", r"^curl -s .*localhost:8000/ready"
EXPECT: list[tuple[str, Callable[[Context, Run], None]]] = [
    (HEALTH + r"\.$", health_all),
    (HEALTH + r"'\.status, \.reasons'$", health_status_reasons),
    (HEALTH + r"\.status$", health_status),
    (HEALTH + r"\.database$", health_database),
    (HEALTH + r"\.model$", health_model),
    (READY.replace(".*", r"-o /dev/null -w '%\{http_code\}\\n' ") + "$", ready_code),
    (READY.replace(".*", "-i ") + "$", ready_verbose),
    (r"^curl -s localhost:8000/metrics \| grep -E '\^\w*\([\w|]+\) '$", metrics_grep),
    (r"^curl -X POST .*localhost:8000/admin/reload$", reload_answer),
    (r"^kill -HUP <pid>$", reload_by_signal),
    (r"^sentiment-analyzer doctor$", doctor),
    (r"^sentiment-analyzer db upgrade$", db_upgrade),
    (r"^sentiment-analyzer db current$", db_current),
    (r"^sentiment-analyzer keys create --name [\w-]+ --role admin$", keys_create),
    (r"^sentiment-analyzer keys list$", keys_list),
    (r"^sentiment-analyzer keys revoke <id>$", keys_revoke),
]


def expectation(command: Command) -> Callable[[Context, Run], None] | None:
    found = [check for pattern, check in EXPECT if re.search(pattern, command.bare)]
    assert len(found) <= 1, f"RUNBOOK.md:{command.line}: {len(found)} expectations match {command.bare!r}"
    return found[0] if found else None


# --- tests --------------------------------------------------------------------------------------------------


def test_every_runbook_command_is_run_or_deliberately_skipped():
    assert not UNKNOWN, "commands in docs/RUNBOOK.md that this test neither runs nor skips on purpose:\n" + \
        "\n".join(f"  line {c.line}: {c.text}" for c in UNKNOWN)


def test_the_runbook_commands_were_found():
    """Guards the extraction: the runbook's core server commands must all be among those run."""
    found = {c.bare for c in RUNNABLE}
    for needle in ("localhost:8000/health | jq .", "localhost:8000/ready", "localhost:8000/metrics | grep",
                   "localhost:8000/admin/reload", "kill -HUP <pid>", "sentiment-analyzer doctor",
                   "sentiment-analyzer db upgrade", "sentiment-analyzer keys create"):
        assert any(needle in command for command in found), f"no runbook command with {needle!r}: {sorted(found)}"
    unexpected = [f"  line {c.line}: {c.bare}" for c in RUNNABLE if expectation(c) is None]
    assert not unexpected, "runbook commands with no expectation in EXPECT (tests/test_runbook.py):\n" + \
        "\n".join(unexpected)


def case_id(command: Command) -> str:
    return f"L{command.line}:" + re.sub(r"[^\w./:-]+", "_", command.bare)[:60]


@pytest.mark.parametrize("command", RUNNABLE, ids=[case_id(c) for c in RUNNABLE])
def test_runbook_command_against_live_server(command: Command, ctx: Context):
    for tool in ("curl", "jq"):
        if re.search(rf"(^|\|\s*){tool}\b", command.bare) and shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y {tool}): cannot run {command.bare!r}")
    check, run = expectation(command), Run(fill(command, ctx), ctx.env)
    if check is None:  # a new or changed command: show what it does, then ask for an expectation
        result = run()
        pytest.fail(f"RUNBOOK.md:{command.line}: no expectation in EXPECT matches {command.bare!r}; it ran with "
                    f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    check(ctx, run)
