"""The HTTP contract in-process (FastAPI TestClient runs the real lifespan): bodies, errors, order."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.artifact import load_artifact
from server.engine import create_engine, softmax
from server.metrics import Metrics
from server.oom import FaultInjectingEngine
from server.runtime import ModelCheckFailed, load_checked
from server.tokenizer import TextEncoder, pad_batch
from tests.model_fixtures import TINY_MAX_LENGTH
from tests.store_fixtures import stored_ids

TEXTS = ["an utterly charming film", "boring", "the plot is thin but the acting is superb and moving",
         "i hated every minute of it", "fine"]


@pytest.fixture
def client(make_settings):
    with TestClient(create_app(make_settings())) as c:
        yield c


def unbatched(tiny_artifact, settings, texts):
    """One engine call per text, no padding: the reference the server must match."""
    artifact = load_artifact(tiny_artifact)
    engine = create_engine(artifact, settings)
    encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length)
    return [softmax(engine.run(*pad_batch([ids])))[0] for ids in encoder.encode(texts)]


def test_predict_one_text(client):
    response = client.post("/predict", json={"text": "a wonderful film"})
    assert response.status_code == 200
    body = response.json()
    (prediction,) = body["predictions"]
    assert prediction["label"] in {"NEGATIVE", "POSITIVE"}
    assert prediction["score"] == pytest.approx(max(prediction["probabilities"].values()))
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["model"]["name"] == "tiny-test" and body["model"]["device"] == "cpu"
    assert response.headers["x-request-id"] == body["request_id"]


@pytest.mark.parametrize("sent, kept", [(b"rid-1.a:b/c=d", True), (b"r" * 128, True), (b"r" * 129, False),
                                        (b"a]b", False), (b"[x", False), (b"a b", False), (b"caf\xe9", False),
                                        (b"a\x1bb", False)])
def test_a_request_id_is_kept_only_when_a_log_line_can_hold_it_as_it_is(client, sent, kept):
    """The text log writes it as [id]: a ']' or Latin-1 let a client forge the start of a line; a longer one was cut
    to 128 characters (another id than sent, all the same)."""
    response = client.post("/predict", json={"text": "fine"}, headers={"X-Request-ID": sent})
    echoed = response.headers["x-request-id"]
    assert echoed == response.json()["request_id"]
    if kept:
        assert echoed == sent.decode()
    else:
        assert len(echoed) == 32 and int(echoed, 16) >= 0



def test_many_texts_come_back_in_input_order_equal_to_unbatched(tiny_artifact, make_settings):
    """fp32 is batch-invariant; int8's dynamic activation scales are not (see the README)."""
    with TestClient(create_app(make_settings(model_variant="fp32"))) as client:
        body = client.post("/predict", json={"texts": TEXTS}).json()
    reference = unbatched(tiny_artifact, make_settings(model_variant="fp32"), TEXTS)
    for prediction, expected in zip(body["predictions"], reference, strict=True):
        got = [prediction["probabilities"][label] for label in ("NEGATIVE", "POSITIVE")]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_repeated_text_is_served_from_the_cache(client):
    first = client.post("/predict", json={"text": "cache me"}).json()["predictions"][0]
    second = client.post("/predict", json={"text": "  cache me  "}).json()["predictions"][0]
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["probabilities"] == second["probabilities"]


@pytest.mark.parametrize("payload, fragment", [
    ({}, 'exactly one of "text"'),
    ({"text": "a", "texts": ["b"]}, 'exactly one of "text"'),
    ({"text": None, "texts": ["b"]}, "text: Input should be a valid string"),
    ({"texts": []}, "at least one"),
    ({"text": "   "}, "empty"),
    ({"texts": ["fine", "\t"]}, "texts[1] is empty"),
    ({"text": 5}, "text"),
    ({"texts": ["a", 5]}, "texts[1]: Input should be a valid string"),
    ({"txt": "typo"}, "txt"),
])
def test_malformed_input_is_422_with_a_message(client, payload, fragment):
    response = client.post("/predict", json=payload)
    assert response.status_code == 422
    assert response.json()["type"] == "invalid_input" and fragment in response.json()["error"]


@pytest.mark.parametrize("text", ["\u0000", "\u200b", "\ufeff\u200e", "\u00ad", "\u0301", "\x01\x02", "\ufffd",
                                  "\U000e0041\u200b \u200b"])
def test_a_text_the_model_reads_nothing_of_is_422_not_a_guess(client, text):
    """Invisible, control and formatting characters: the tokenizer drops them all, and each was answered 200 with
    the model's guess for no text (POSITIVE 0.797) and recorded, where a text of spaces is refused."""
    response = client.post("/predict", json={"texts": ["fine", text]})
    assert response.status_code == 422, response.text
    assert response.json() == {"error": "texts[1] holds no character the model reads (only control, formatting or "
                                        "zero-width characters); send some text to classify", "type": "invalid_input"}


@pytest.mark.parametrize("text", ["🙂", "𓀀", "\u200bok", "a\u0301"])
def test_a_text_with_a_character_the_model_reads_is_answered(client, text):
    assert client.post("/predict", json={"text": text}).status_code == 200


def test_invalid_json_is_422_invalid_json(client):
    response = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"error": "the body is not valid JSON: Expecting property name enclosed in double "
                                        "quotes at character 1", "type": "invalid_json"}



@pytest.mark.parametrize(("path", "body", "where"), [
    ("/predict", b'{"text": "good", "\\ud800": 1}', "body"),  # a key: pydantic names no field
    ("/predict", b'{"inputs": "good", "truncation_direction": "\\udfff"}', "truncation_direction"),
    ("/feedback", b'{"prediction_id": "x", "label": "\\ud800"}', "label"),
])
def test_an_unpaired_surrogate_anywhere_says_so(client, path, body, where):
    """Where no validator of ours looks, pydantic said "Input should be a valid string, unable to parse raw data as
    a unicode string", which does not say what to fix (red team helper-73)."""
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"].startswith(f"invalid request: {where}: contains an unpaired surrogate"), \
        response.json()


def test_a_control_character_in_a_json_string_is_worded_once(client):
    """Python's message ends in "at" already: it read "Invalid control character at at character 10" (red team
    helper-73)."""
    response = client.post("/predict", content=b'{"text":"a\x01b"}', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"] == "the body is not valid JSON: Invalid control character at character 10"


def test_oversized_inputs_are_413(make_settings):
    settings = make_settings(max_texts_per_request=3, max_text_chars=50, max_request_bytes=2048)
    with TestClient(create_app(settings)) as c:
        assert c.post("/predict", json={"texts": ["a"] * 4}).json()["type"] == "too_large"
        assert "MAX_TEXT_CHARS" in c.post("/predict", json={"text": "x" * 51}).json()["error"]
        big = c.post("/predict", content=b'{"text": "' + b"y" * 4000 + b'"}',
                     headers={"content-type": "application/json"})
        assert big.status_code == 413 and "MAX_REQUEST_BYTES" in big.json()["error"]
        metrics = c.get("/metrics").text
    assert 'sentiment_rejected_requests_total{reason="too_large"} 3.0' in metrics


def test_strict_truncation_rejects_texts_longer_than_the_model(make_settings):
    with TestClient(create_app(make_settings(strict_truncation=True))) as c:
        response = c.post("/predict", json={"text": "word " * 300})
        assert response.status_code == 422 and "at most 128" in response.json()["error"]
        assert c.post("/predict", json={"text": "short"}).status_code == 200


def test_long_text_is_truncated_by_default(client):
    assert client.post("/predict", json={"text": "word " * 300}).status_code == 200


def test_health_ready_metrics_docs(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["provider"] == "CPUExecutionProvider"
    assert health["model"]["warm"] is True and health["database"]["status"] == "ok"
    assert client.get("/ready").status_code == 200
    client.post("/predict", json={"texts": ["one", "two"]})
    metrics = client.get("/metrics").text
    assert 'sentiment_requests_total{endpoint="/predict",status="200"} 1.0' in metrics
    assert "\nsentiment_store_up 1.0\n" in metrics  # the store's gauges are set at the scrape, from its state
    assert 'sentiment_model_info{device="cpu",name="tiny-test"' in metrics
    assert "sentiment_batch_size_count" in metrics
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200 and client.get("/no-such-path").status_code == 404
    metrics = client.get("/metrics").text
    for endpoint, status in (("/docs", 200), ("/openapi.json", 200), ("unmatched", 404)):
        assert f'sentiment_requests_total{{endpoint="{endpoint}",status="{status}"}} 1.0' in metrics, endpoint


def test_an_engine_failure_is_an_error_never_a_hang_503_when_the_engine_fails_on_everything(make_settings):
    """An engine that fails on some inputs only (here: some lengths) answers them 500 without Retry-After, since
    sending them again fails again; one that fails whatever it is given (its one-token canary too) answers 503 with
    Retry-After. Either way the request is answered, and the server goes on answering what it can."""
    failing = {"everything": False}

    def broken(engine):  # start-up's smoke test runs the model's max length, which must work: fail only between
        return FaultInjectingEngine(engine, message="CUDA driver exploded", fail_when=lambda batch, length:
                                    failing["everything"] or 20 < length < TINY_MAX_LENGTH)

    with TestClient(create_app(make_settings(warmup=False), wrap_engine=broken)) as c:
        response = c.post("/predict", json={"text": "word " * 30})
        assert response.status_code == 500 and "inference failed" in response.json()["error"]
        assert response.json()["type"] == "inference_failed" and "retry-after" not in response.headers
        assert c.post("/predict", json={"text": "short"}).status_code == 200
        failing["everything"] = True
        response = c.post("/predict", json={"text": "not cached"})
        assert response.status_code == 503 and response.json()["type"] == "inference_failed"
        assert response.headers["retry-after"]


class NanLogitsBetween:
    """An engine giving NaN logits for batches padded to ``low < length < high``: fp16 overflow on some inputs."""

    def __init__(self, inner, low: int, high: int) -> None:
        self.inner, self.low, self.high = inner, low, high
        self.device, self.provider, self.variant = inner.device, inner.provider, inner.variant

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        logits = self.inner.run(input_ids, attention_mask)
        return np.full_like(logits, np.nan) if self.low < input_ids.shape[1] < self.high else logits


def test_nan_scores_are_a_500_never_a_200_and_never_cached_or_recorded(make_settings, caplog):
    """Start-up's smoke test runs the max length, which gives finite scores; a 30-word text gets NaN."""
    settings = make_settings(warmup=False)
    with TestClient(create_app(settings, wrap_engine=lambda e: NanLogitsBetween(e, 20, TINY_MAX_LENGTH))) as c:
        for _ in range(2):  # the same text again: a cached NaN would have come back 200
            response = c.post("/predict", json={"text": "word " * 30})
            assert response.status_code == 500, response.text
            assert response.json()["type"] == "model_output_invalid" and "NaN" in response.json()["error"]
            assert "retry-after" not in response.headers  # the same text gets the same scores
        assert c.post("/predict", json={"text": "short"}).status_code == 200
        assert 'sentiment_inference_errors_total{device="cpu"} 2.0' in c.get("/metrics").text
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert sum("NaN or infinite scores" in line for line in said) == 1  # once a minute: input can repeat it
    assert not any(line.startswith("request failed") or "-> 500" in line for line in said), said
    assert len(stored_ids(settings.database_url)) == 1  # only the short text's record


class WrongFromBatchesOf:
    """An engine that gives NaN logits, or a row too few, for batches of ``rows`` texts or more (and is right below:
    the smoke prediction's two texts pass)."""

    def __init__(self, inner, rows: int, fault: str) -> None:
        self.inner, self.rows, self.fault = inner, rows, fault
        self.device, self.provider, self.variant = inner.device, inner.provider, inner.variant

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        logits = self.inner.run(input_ids, attention_mask)
        if len(logits) < self.rows:
            return logits
        return np.full_like(logits, np.nan) if self.fault == "nan" else logits[:-1]


@pytest.mark.parametrize("fault, said", [("nan", "non-finite logits"), ("rows", "logits of shape")])
def test_a_model_wrong_only_for_larger_batches_is_refused_by_its_warm_up(make_settings, fault, said):
    """It passed start-up, doctor and reload (the smoke prediction runs two texts; warm-up ran the larger batches
    and threw their logits away), then failed live requests of three texts or more with 500s that blamed their
    texts (red team helper-85)."""
    settings = make_settings(warmup=True)
    with pytest.raises(ModelCheckFailed, match=f"a warm-up batch of \\d+ x \\d+ tokens gave {said}"):
        load_checked(settings, Metrics(), wrap_engine=lambda e: WrongFromBatchesOf(e, 3, fault))
    assert load_checked(settings, Metrics()).warm  # the same model, right at every batch, passes


def test_oom_on_batches_splits_and_answers_every_text(make_settings):
    def oom_above_one(engine):
        return FaultInjectingEngine(engine, fail_when=lambda batch, length: batch > 1)

    with TestClient(create_app(make_settings(warmup=False), wrap_engine=oom_above_one)) as c:
        response = c.post("/predict", json={"texts": TEXTS})
        assert response.status_code == 200 and len(response.json()["predictions"]) == len(TEXTS)
        metrics = c.get("/metrics").text
    assert 'sentiment_batch_splits_total{device="cpu"}' in metrics
    assert 'sentiment_oom_events_total{device="cpu"} 0.0' not in metrics


def test_the_openapi_document_is_built_at_start_up_not_in_the_first_request_that_reads_it(client):
    """Built on first use, it held the event loop ~48 ms inside that request (every request in flight waited)."""
    built = client.app.openapi_schema
    assert built is not None and "/predict" in built["paths"]
    assert client.get("/openapi.json").json() == built


def test_openapi_lists_each_operations_errors_in_the_one_format(client):
    document = client.get("/openapi.json").json()
    assert set(document["components"]["schemas"]["ErrorResponse"]["required"]) == {"error", "type"}
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's 422 is not what we send
    operations = {f"{method.upper()} {path}": op for path, item in document["paths"].items()
                  for method, op in item.items()}
    for name, operation in operations.items():
        for status, response in operation["responses"].items():
            if status[0] in "45":
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}, (name, status)
    statuses = {name: set(op["responses"]) for name, op in operations.items()}
    assert statuses["GET /health"] == {"200", "500"}
    assert statuses["POST /predict"] >= {"200", "401", "403", "413", "415", "422", "500", "503"}
    assert statuses["DELETE /admin/keys/{key_id}"] == {"200", "401", "403", "404", "422", "500", "503"}
    assert set(operations["GET /feedback/export"]["responses"]["200"]["content"]) == {"text/tab-separated-values"}


@pytest.mark.parametrize("path, body", [
    ("/predict", lambda text: {"texts": [text, "fine"]}),
    ("/predict", lambda text: {"inputs": [[text], ["fine"]], "truncate": False}),  # TEI's refusal reads it too
])
def test_a_long_requests_texts_are_checked_on_the_text_thread_and_a_short_ones_on_the_loop(
        make_settings, monkeypatch, path, body):
    """Normalizing and checking texts ran on the event loop for any request; a long one's now run beside it."""
    import threading

    import server.serving
    from server.predictor import LOOP_TEXT_CHARS

    threads: dict[int, str] = {}
    real = server.serving.normalize

    def noting(text: str) -> str:
        threads[len(text)] = threading.current_thread().name
        return real(text)

    monkeypatch.setattr(server.serving, "normalize", noting)
    long_text = "word " * (LOOP_TEXT_CHARS // 5 + 1)
    with TestClient(create_app(make_settings())) as client:
        answered = client.post(path, json=body(long_text))
        assert answered.status_code == (422 if "inputs" in body("") else 200), answered.text
        on_long = threads.pop(len(long_text))
        assert client.post(path, json=body("a short one")).status_code in (200, 422)
    assert on_long.startswith("text-work")
    assert not threads[len("a short one")].startswith("text-work")


def test_a_check_before_classifying_and_the_prediction_see_the_same_model_across_a_reload(make_settings):
    """TEI's truncate false was checked with the model serving before its texts were tokenized and answered by the
    one serving after: a reload in between answered a text the new model cut (a red team: 8 answers in 60 s)."""
    from server.runtime import ModelRuntime
    from server.serving import classify

    with TestClient(create_app(make_settings())) as client:
        services = client.app.state.services
        predictor = services.predictor
        other = ModelRuntime.load(make_settings(), services.metrics)
        client.portal.call(lambda: _started(other))
        seen = {}
        real = predictor._predict

        async def check(runtime, texts):
            seen["checked"] = runtime
            predictor.swap(other)  # a reload lands while the check runs

        async def predicting(runtime, *args):
            seen["predicted"] = runtime
            return await real(runtime, *args)

        predictor._predict = predicting
        first = predictor.runtime
        answer = client.portal.call(lambda: classify(services, ["a fine film"], "request", None, check=check))
        assert seen["predicted"] is seen["checked"] is first and predictor.runtime is other
        assert answer.identity == first.identity
        client.portal.call(classify, services, ["a fine film"], "next", None)
        assert seen["predicted"] is other  # the next request: the model serving now


async def _started(runtime) -> None:
    runtime.batcher.start()
