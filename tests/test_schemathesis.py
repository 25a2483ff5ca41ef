"""Schemathesis against a real uvicorn server: every operation, every check, a fixed seed, bounded examples.

All of schemathesis's checks run (its default: server errors; status codes, content types, headers and bodies
against the OpenAPI document; schema-valid data accepted, schema-invalid data rejected; unsupported methods
answered 405 with Allow; missing headers) in its examples, coverage and fuzzing phases, with an admin key so no
operation stops at 401. Each operation is a test item; a failure shows schemathesis's report and a ``curl``.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from scripts.benchlib.serverproc import ROOT, start_server, stop_server
from server.app import create_app
from server.config import load_settings

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SEED = 1304
MAX_EXAMPLES = 15  # fuzzing examples per operation; the coverage phase adds its own boundary cases
calls: Counter[str] = Counter()  # requests sent, by operation


@dataclass
class Api:
    url: str
    admin: dict[str, str]


@pytest.fixture(scope="module")
def api(tiny_artifact, tmp_path_factory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    database_url = f"sqlite:///{tmp}/store.db"
    live = start_server({"MODEL_PATH": str(tiny_artifact), "DATABASE_URL": database_url, "AUTH_MODE": "required",
                         "MAX_TEXTS_PER_REQUEST": "8",  # small enough that generated lists can reach the 413
                         "LOG_LEVEL": "WARNING"}, tmp)
    try:
        created = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--database-url",
                                  database_url, "--name", "schemathesis", "--role", "admin"],
                                 capture_output=True, text=True, timeout=60, check=True)
        yield Api(live.url, {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"})
    finally:
        stop_server(live)


# Rules of a protocol that JSON Schema cannot state, so a schema-valid request can still be refused with them.
UNSTATABLE = [
    # OIP v2 infer: "shape": [N] counts the texts in "data", and each output is named once (else 400)
    {"include-path-regex": "^/v2/models/.+/infer$",
     "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", 400, 401, 403, 404, 413, 429, "5xx"]}}},
]
CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
    "checks": {
        "enabled": True,
        # Size limits are settings, not in the document: a schema-valid body over one is rightly a 413.
        "positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", 401, 403, 404, 409, 413, 429, "5xx"]},
        # A schema-invalid body can be over a limit too, and either refusal is right: a TEI batch past
        # MAX_TEXTS_PER_REQUEST is refused by its count (413) before its items and the other fields are read.
        "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429,
                                                          "5xx"]},
    },
    "operations": UNSTATABLE,
})
# The document the server serves, built in-process so the operations are known when pytest collects;
# test_the_live_server_serves_this_document holds the two equal.
DOCUMENT = create_app(load_settings(model_path=ROOT)).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
OPERATIONS = sum(1 for item in DOCUMENT["paths"].values() for method in item if method in HTTP_METHODS)


def test_the_live_server_serves_this_document(api):
    assert httpx.get(api.url + "/openapi.json", timeout=30).json() == DOCUMENT


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_the_openapi_document(case, api):
    calls[case.operation.label] += 1
    case.call_and_validate(base_url=api.url, headers=api.admin, timeout=30)


def test_every_operation_was_exercised():
    """Guards the test above against passing vacuously (deselected, or a schema with no operations)."""
    if not calls:
        pytest.skip("runs after test_every_operation_conforms_to_the_openapi_document")
    print(f"schemathesis: {len(calls)} operations, {sum(calls.values())} requests, seed {SEED}: {dict(calls)}")
    assert len(calls) == OPERATIONS and min(calls.values()) >= 3, calls
