"""KServe manifests (docker/k8s/kserve): valid against KServe's own CRD schemas, and the same server as the plain
Kubernetes manifests deploy.

The ServingRuntime and InferenceService are validated against the ``openAPIV3Schema`` of KServe's CRDs
(tests/data/kserve, with where they come from), strictly: an object schema that lists its properties accepts no
other (the API server would silently drop an unknown field, so a misspelt one would be a setting that does not
take). The ConfigMap is validated like the plain manifests (tests/test_deploy_k8s.py). The runtime must run what
the CPU overlay runs: its image, arguments, resources, probes, shutdown and security settings, with the settings
of the CPU overlay's ConfigMap except the two its comment names.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from server.config import Settings
from server.protocols.kserve_v1 import ALIAS
from tests.test_deploy_k8s import (
    K8S,
    OVERLAYS,
    ROOT,
    WORKLOAD,
    key,
    load_docs,
    quantity_bytes,
    render,
    server_container,
    validate,
)
from tests.test_dockerfiles import DOCKERFILES, env_of, parse

KSERVE = K8S / "kserve"
SCHEMAS = ROOT / "tests" / "data" / "kserve"
CRD_SCHEMAS = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-v1alpha1.json",
               ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-v1beta1.json"}
SERVING_CONTAINER = "kserve-container"  # the name KServe looks for in a runtime
DIFFERENCES = {"PORT", "SPOOL_MAX_BYTES"}  # configmap.yaml's comment says why


def closed(schema: object) -> object:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists properties and does not
    preserve unknown fields: strict like ``kubernetes_validate(strict=True)`` for the core kinds."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {name: closed(value) for name, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(doc: dict) -> jsonschema.Draft7Validator:
    name = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    return jsonschema.Draft7Validator(closed(json.loads((SCHEMAS / name).read_text())))


def crd_errors(doc: dict) -> list[str]:
    return [f"{error.message} at {'/'.join(map(str, error.absolute_path))}"
            for error in crd_validator(doc).iter_errors(doc)]


@pytest.fixture(scope="module")
def kserve() -> dict[tuple[str, str], dict]:
    return {key(doc): doc for doc in render(KSERVE)}


@pytest.fixture(scope="module")
def cpu() -> dict[tuple[str, str], dict]:
    return {key(doc): doc for doc in render(OVERLAYS["cpu"])}


def one(docs: dict, kind: str) -> dict:
    (doc,) = [doc for (k, _), doc in docs.items() if k == kind]
    return doc


def runtime_container(docs: dict) -> dict:
    (container,) = [c for c in one(docs, "ServingRuntime")["spec"]["containers"] if c["name"] == SERVING_CONTAINER]
    return container


def configmap_of(container: dict, docs: dict) -> dict[str, str]:
    (name,) = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    return docs[("ConfigMap", name)]["data"]


def test_every_object_is_valid(kserve) -> None:
    assert {kind for kind, _ in kserve} == {"ConfigMap", "ServingRuntime", "InferenceService"}
    for doc in kserve.values():
        if doc["kind"] == "ConfigMap":
            validate(doc, "docker/k8s/kserve")
        else:
            assert not crd_errors(doc), f"{doc['kind']}/{doc['metadata']['name']}: {crd_errors(doc)}"


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d["spec"]["predictor"]["model"].update(protocolVersoin="v2"), "protocolVersoin"),
    (lambda d: d["spec"]["predictor"].update(minReplicas="2"), "'2' is not of type 'integer'"),
    (lambda d: d["spec"]["predictor"].update(sklearn={"storageUri": "s3://x"}), "sklearn"),
], ids=["misspelt field", "wrong type", "pruned framework shortcut"])
def test_the_validation_refuses_what_kserve_would_not_take(kserve, break_it, expected) -> None:
    """Guards the test above: the schemas are applied, strictly."""
    broken = copy.deepcopy(one(kserve, "InferenceService"))
    break_it(broken)
    assert any(expected in error for error in crd_errors(broken)), crd_errors(broken)


def test_the_runtime_runs_the_server_the_cpu_overlay_runs(kserve, cpu) -> None:
    ours, theirs = runtime_container(kserve), server_container(cpu)
    for field in ("image", "args", "resources", "lifecycle"):
        assert ours[field] == theirs[field], field
    port = int(configmap_of(ours, kserve)["PORT"])
    assert [p["containerPort"] for p in ours["ports"]] == [port]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ours[probe]["httpGet"]["port"] == port
        assert {**ours[probe], "httpGet": {**ours[probe]["httpGet"], "port": "http"}} == theirs[probe], probe
    assert ours["securityContext"].items() >= theirs["securityContext"].items()
    pod = cpu[WORKLOAD]["spec"]["template"]["spec"]
    predictor = one(kserve, "InferenceService")["spec"]["predictor"]
    assert predictor["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
    assert predictor["securityContext"]["runAsUser"] == ours["securityContext"]["runAsUser"] == \
        pod["securityContext"]["runAsUser"]
    secrets = {e["secretRef"]["name"] for e in ours["envFrom"] if "secretRef" in e}
    assert secrets == {e["secretRef"]["name"] for e in theirs["envFrom"] if "secretRef" in e}


def test_the_settings_are_the_cpu_overlays_but_port_and_spool_cap(kserve, cpu) -> None:
    ours = configmap_of(runtime_container(kserve), kserve)
    theirs = configmap_of(server_container(cpu), cpu)
    assert ours.keys() == theirs.keys()
    assert {name for name in ours if ours[name] != theirs[name]} == DIFFERENCES
    assert ours["PORT"] == "8080", "the port KServe routes to"
    _, stages = parse(DOCKERFILES["cpu"])
    settings = Settings(**{k.lower(): v for k, v in {**env_of(stages[-1]), **ours}.items()
                           if k in {name.upper() for name in Settings.model_fields}})
    runtime = one(kserve, "ServingRuntime")["spec"]
    volumes = {v["name"]: v for v in runtime["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in runtime_container(kserve)["volumeMounts"]}
    spool = volumes[mounts[str(settings.spool_dir)]]
    assert settings.spool_max_bytes < quantity_bytes(spool["emptyDir"]["sizeLimit"])
    assert "/tmp" in mounts and settings.log_file is None


def test_the_inference_service_selects_this_runtime_by_the_servers_alias(kserve) -> None:
    runtime, service = one(kserve, "ServingRuntime"), one(kserve, "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [{k: f[k] for k in ("name", "version")} for f in runtime["spec"]
                                    ["supportedModelFormats"]]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert service["metadata"]["name"] == ALIAS, "clients name the model by the service: the server answers to it"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
    assert 2 <= service["spec"]["predictor"]["minReplicas"] <= service["spec"]["predictor"]["maxReplicas"]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_docs(KSERVE / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in KSERVE.glob("*.yaml")} - {"kustomization.yaml"}
