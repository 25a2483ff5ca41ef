"""README "Serve your own model", run as written on small locally made checkpoints.

The commands come from the section's bash block itself, with its placeholders (``my-checkpoint``,
``my-artifact``, ``my-labeled.tsv``, ``my-other-artifact``, ``ID``, ``KEY``, ``SERVER_PID``,
``localhost:8000``) replaced: the model pipeline's commands run in this process (their argv is the README's),
the server and the admin CLI as processes, curl as curl. The matrix:

| checkpoint | type | labels | positions | eval file labels |
|---|---|---|---|---|
| distilbert-2 | DistilBERT | NEGATIVE, POSITIVE | 128 | SST-2's 0/1 |
| distilbert-3 | DistilBERT | negative, neutral, positive | 512 | names in mixed case |
| bert-bad-good | BERT | bad, good | 64 | names |
| roberta-unnamed | RoBERTa | LABEL_0, LABEL_1 (none given) | 66 (65 usable) | 0/1 |

Each is built and evaluated with the README's commands; the 3-label one then goes through the whole flow
(every default overridden, evaluation, serving, feedback, a reload to the bad/good model, a SIGHUP reload
after building the 2-label one into MODEL_PATH, the feedback export), and the 2-label one is benchmarked.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.build import main as build_main
from models.data import load_labeled
from models.evaluate import main as evaluate_main
from models.finetune import load_examples
from scripts.bench_onnx import main as bench_main
from scripts.benchlib.serverproc import LiveServer, start_server, stop_server
from tests.labeled_files import write_labeled
from tests.own_model_fixtures import one_torch_thread, save_checkpoint
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Serve your own model"
TEXTS = ["a gorgeous , witty , seductive movie .", "the movie fails to live up to the sum of its parts .",
         "it 's a charming and often affecting journey .", "an absolute waste of two hours .",
         "one of the year 's best films", "unflinchingly bleak and desperate", "not bad at all .",
         "I want my money back", "warm , funny and beautifully acted", "dull , lifeless and far too long"]
LONG_TEXT = "word " * 300  # > 256 tokens: truncated by the 3-label artifact (--max-length 256)
WAIT_S = 60.0  # for the server to reload, or the database to catch up
POLL_S = 0.2
_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@dataclass(frozen=True)
class Case:
    name: str
    model_type: str
    labels: tuple[str, ...] | int
    positions: int
    file_labels: tuple[str, ...]  # the eval file's labels, cycled over TEXTS
    mapping: dict[str, str]  # what the evaluation must match them to
    max_length: int


SST2 = ("0", "1")
CASES = {case.name: case for case in (
    Case("distilbert-2", "distilbert", ("NEGATIVE", "POSITIVE"), 128, SST2, {"0": "NEGATIVE", "1": "POSITIVE"}, 128),
    Case("distilbert-3", "distilbert", ("negative", "neutral", "positive"), 512, ("Negative", "neutral", "POSITIVE"),
         {"Negative": "negative", "neutral": "neutral", "POSITIVE": "positive"}, 512),
    Case("bert-bad-good", "bert", ("bad", "good"), 64, ("bad", "good"), {"bad": "bad", "good": "good"}, 64),
    Case("roberta-unnamed", "roberta", 2, 66, SST2, {"0": "LABEL_0", "1": "LABEL_1"}, 65),
)}


def readme_commands() -> list[str]:
    """The section's bash block as commands: comments dropped, continuation lines joined."""
    section = (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    commands, pending = [], ""
    for line in block.splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            commands.append(pending.strip())
            pending = ""
    return commands


COMMANDS = readme_commands()


def readme(*words: str, without: str | None = None) -> str:
    """The one README command containing every one of ``words`` (and not ``without``)."""
    found = [c for c in COMMANDS if all(w in c for w in words) and not (without and without in c)]
    assert len(found) == 1, (words, found)
    return found[0]


def argv(command: str, placeholders: dict[str, object]) -> list[str]:
    """``command`` split like a shell would, each placeholder (a whole word or a quoted JSON string) replaced."""
    for placeholder, value in placeholders.items():
        command = re.sub(rf'(?<![\w.-]){re.escape(placeholder)}(?![\w.-])', lambda _, v=value: str(v), command)
    return shlex.split(command)


def run_main(main, args: list[str], capsys) -> str:
    """A pipeline command's ``main`` on the README's argv; its stdout."""
    capsys.readouterr()
    main(args)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own-model")
    for case in CASES.values():
        save_checkpoint(root / case.name, case.model_type, case.labels, case.positions)
        rows = [(text, case.file_labels[i % len(case.file_labels)]) for i, text in enumerate(TEXTS)]
        write_labeled(root / f"{case.name}.tsv", rows)
    write_labeled(root / "sst2.tsv", [(text, i % 2) for i, text in enumerate(TEXTS)])
    return root


@pytest.fixture(scope="module")
def built(workspace) -> dict[str, dict]:
    """Every checkpoint through the README's first build and its evaluate command: manifest and printed result."""
    build, evaluate = readme("models.build", without="--labels"), readme("models.evaluate")
    out = {}
    for case in CASES.values():
        artifact = workspace / f"{case.name}-artifact"
        labeled = workspace / f"{case.name}.tsv"
        build_main(argv(build, {"my-checkpoint": workspace / case.name, "my-artifact": artifact,
                                "my-labeled.tsv": labeled})[3:])
        manifest = json.loads((artifact / "manifest.json").read_text())
        evaluate_main(argv(evaluate, {"my-artifact": artifact, "my-labeled.tsv": labeled})[3:])
        out[case.name] = {"artifact": artifact, "built": manifest,
                          "evaluated": json.loads((artifact / "manifest.json").read_text())}
    return out


def test_readme_block_is_what_this_test_runs() -> None:
    tools = {shlex.split(c)[0] if not c.startswith("MODEL_PATH=") else "serve" for c in COMMANDS}
    assert tools == {"python", "serve", "curl", "sentiment-analyzer", "kill"}
    assert len(COMMANDS) == 11


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_checkpoint_builds_and_evaluates_with_its_own_labels(built, name) -> None:
    case, manifest = CASES[name], built[name]["built"]
    labels = list(case.labels) if not isinstance(case.labels, int) else [f"LABEL_{i}" for i in range(case.labels)]

    assert manifest["labels"] == labels
    assert manifest["name"] == name  # from the checkpoint directory, not a fixed default
    assert manifest["max_sequence_length"] == case.max_length  # the model's positions
    assert set(manifest["variants"]) == {"int8", "fp16"} and manifest["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    for variant, result in manifest["evaluation"]["results"].items():
        assert result["label_mapping"] == case.mapping, variant
        assert result["labels"] == labels
        assert len(result["confusion_matrix"]) == len(labels)
        assert sum(map(sum, result["confusion_matrix"])) == len(TEXTS)
        correct = sum(result["confusion_matrix"][i][i] for i in range(len(labels)))
        assert result["accuracy"] == pytest.approx(correct / len(TEXTS))
    evaluated = built[name]["evaluated"]["evaluation"]["results"]["int8"]
    assert evaluated["confusion_matrix"] == manifest["evaluation"]["results"]["int8"]["confusion_matrix"]


def test_benchmark_compares_pytorch_and_says_how_to_get_fp32(built, workspace, capsys) -> None:
    out = workspace / "bench-mine"
    command = argv(readme("bench_onnx.py"), {"my-artifact": built["distilbert-2"]["artifact"],
                                             "my-checkpoint": workspace / "distilbert-2",
                                             "my-labeled.tsv": workspace / "distilbert-2.tsv", "bench-mine": out})
    capsys.readouterr()
    assert bench_main(command[2:]) == 0
    printed = capsys.readouterr()
    report = json.loads((out / "bench.json").read_text())
    status = {v["name"]: v for v in report["variants"]}

    assert status["torch-cpu-fp32"]["status"] == status["ort-cpu-int8"]["status"] == "ok"
    assert "--keep-fp32" in status["ort-cpu-fp32"]["reason"] and "--keep-fp32" in printed.out + printed.err
    fp32 = built["distilbert-2"]["built"]["evaluation"]["results"]["fp32"]
    assert status["torch-cpu-fp32"]["accuracy"] == fp32["accuracy"]  # the same labels, matched the same way
    assert report["artifact"]["label_mapping"] == {"0": "NEGATIVE", "1": "POSITIVE"}


# -- the whole flow on the 3-label model ---------------------------------------------------------------------

def curl(command: str, server: LiveServer, placeholders: dict[str, object] | None = None) -> tuple[int, str]:
    args = argv(command.replace("localhost:8000", server.url), placeholders or {})
    done = subprocess.run([*args, "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=60)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def cli(command: str, server: LiveServer, placeholders: dict[str, object] | None = None) -> str:
    args = argv(command, placeholders or {})
    assert args[0] == "sentiment-analyzer"
    done = subprocess.run([sys.executable, "-m", "server.cli", *args[1:]], env=server.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def prediction_series(server: LiveServer) -> dict[tuple, float]:
    families = text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=30).text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
            if s.name in ("sentiment_predictions_total", "sentiment_truncated_texts_total",
                          "sentiment_low_confidence_predictions_total")}


def give_feedback(command: str, server: LiveServer, prediction_id: str, label: str) -> tuple[int, dict]:
    """The README's feedback command; a prediction not yet in the database (404) is retried, as its error says."""
    command = command.replace('"label": "neutral"', f'"label": "{label}"')

    def answered():
        status, body = curl(command, server, {"ID": prediction_id})
        return None if status == 404 else (status, json.loads(body))

    return wait_for(answered, "the prediction to reach the database", timeout=WAIT_S, every=POLL_S)


def test_the_readme_flow_serves_reloads_and_takes_feedback_in_each_models_labels(built, workspace, capsys,
                                                                                  tmp_path) -> None:
    three, artifact = workspace / "distilbert-3", workspace / "my-artifact"
    full_build = readme("models.build", "--labels")
    placeholders = {"my-checkpoint": three, "my-artifact": artifact, "my-labeled.tsv": workspace / "sst2.tsv"}
    printed = run_main(build_main, argv(full_build, placeholders)[3:], capsys)
    summary = json.loads(printed[printed.index("{"):])
    assert summary["name"] == "reviews-3class" and summary["max_sequence_length"] == 256
    assert set(summary["variants"]) == {"fp32", "int8", "fp16"} and "checked_not_shipped" not in summary
    results = json.loads((artifact / "manifest.json").read_text())["evaluation"]["results"]
    assert results["fp32"]["label_mapping"] == {"0": "negative", "1": "positive"}  # SST-2 0/1, by --label-map
    assert results["fp32"]["unused_labels"] == ["neutral"]
    evaluated = json.loads(run_main(evaluate_main, argv(readme("models.evaluate"), placeholders)[3:], capsys))
    assert evaluated["label_mapping"] == {"0": "negative", "1": "positive"}

    serve = argv(readme("sentiment-analyzer serve"), placeholders)
    assert serve[0] == f"MODEL_PATH={artifact}"
    server = start_server({"MODEL_PATH": str(artifact), "MAX_BATCH_TOKENS": "2048"}, tmp_path, timeout=120)
    try:
        status, body = curl(readme("/predict"), server)
        answer = json.loads(body)
        assert status == 200 and answer["model"]["name"] == "reviews-3class"
        prediction = answer["predictions"][0]
        assert prediction["label"] in ("negative", "neutral", "positive")
        assert set(prediction["probabilities"]) == {"negative", "neutral", "positive"}
        long = httpx.post(server.url + "/predict", json={"texts": [LONG_TEXT, "short"]}, timeout=30)
        assert long.status_code == 200
        series = prediction_series(server)
        serving = (("model", "reviews-3class"), ("version", answer["model"]["version"]))
        assert series[("sentiment_truncated_texts_total", serving)] == 1  # the long text, not the short one
        assert sum(v for (name, labels), v in series.items() if name == "sentiment_predictions_total") == 3

        feedback = readme("/feedback")
        assert give_feedback(feedback, server, prediction["id"], "neutral")[0] == 201
        status, refused = give_feedback(feedback, server, prediction["id"], "POSITIVE")
        assert status == 422 and refused["type"] == "invalid_label"
        assert "negative, neutral, positive" in refused["error"]

        key = cli(readme("keys", "create"), server).strip().splitlines()[-1]
        other = built["bert-bad-good"]["artifact"]
        status, body = curl(readme("/admin/reload"), server, {"KEY": key, "my-other-artifact": other})
        assert status == 200 and json.loads(body)["serving"]["name"] == "bert-bad-good", body
        status, refused = give_feedback(feedback, server, prediction["id"], "neutral")
        assert status == 422 and "bad, good" in refused["error"]  # the serving model's labels, after the reload
        assert give_feedback(feedback, server, prediction["id"], "good")[0] == 201
        models = {dict(labels)["model"] for (name, labels), _ in prediction_series(server).items()}
        assert models == {"bert-bad-good", "reviews-3class"}  # the previous model's kept until the next swap

        status, body = curl(readme("/admin/reload"), server, {"KEY": key, "my-other-artifact": three})
        assert status == 409 and "python -m models.build --checkpoint" in json.loads(body)["error"]

        build_main(argv(readme("models.build", without="--labels"), {
            "my-checkpoint": workspace / "distilbert-2", "my-artifact": artifact,
            "my-labeled.tsv": workspace / "distilbert-2.tsv"})[3:])
        pid = server.process.pid
        assert argv(readme("kill"), {"SERVER_PID": pid}) == ["kill", "-HUP", str(pid)]
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: httpx.get(server.url + "/health", timeout=10).json()["model"]["name"] == "distilbert-2",
                 "the SIGHUP reload of MODEL_PATH", timeout=WAIT_S, every=POLL_S)
        assert httpx.get(server.url + "/health", timeout=10).json()["model"]["labels"] == ["NEGATIVE", "POSITIVE"]

        export = tmp_path / "corrections.tsv"
        cli(readme("feedback", "export"), server, {"corrections.tsv": export})
        corrections = load_labeled(export)
        assert corrections.labels == ["good"]  # by name; the later correction replaced "neutral"
        assert load_examples(str(export), ["bad", "good"]).targets == [1]  # what models.finetune trains on
    finally:
        assert stop_server(server) == 0, server.log()[-3000:]
