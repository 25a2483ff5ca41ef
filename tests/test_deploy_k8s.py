"""Kubernetes manifests (docker/k8s): schema-valid, overlays consistent, and the runbook's settings in place.

The server is a StatefulSet (``statefulset/sentiment-analyzer``): each pod's spool is a PersistentVolumeClaim
of its own that outlives the pod, with the spool cap (``SPOOL_MAX_BYTES``) below the claim's size, and logs go
to stdout only.

Offline: every manifest is validated against the Kubernetes OpenAPI schemas
shipped by ``kubernetes-validate`` (strict: unknown fields fail). Each
overlay is rendered with ``kubectl kustomize`` / ``kustomize build`` when one
is installed, otherwise with the small renderer below (resources, images,
labels, strategic-merge patches keyed by container name), and the rendered
objects are validated and checked for what the runbook relies on.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.config import Settings
from tests.test_dockerfiles import DOCKERFILES, env_of, parse

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "docker" / "k8s"
BASE = K8S / "base"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
# oldest still-common cluster version, and the newest the package knows
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
NAME = "sentiment-analyzer"
WORKLOAD = ("StatefulSet", NAME)
# the pod's one container, named as docs/RUNBOOK.md's commands and the operators' incident runbook's strategic-merge
# patch name it (a patch naming a container the pod does not have adds a second container)
CONTAINER = NAME
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def validate(doc: dict, where: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: "
                        f"{exc.message} at {'/'.join(map(str, exc.path))}")


def key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


# ------------------------------------------------------------ fallback renderer

def strategic_merge(base: object, patch: object) -> object:
    """Enough of kustomize's strategic merge for these patches: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for k, v in patch.items():
            merged[k] = strategic_merge(base[k], v) if k in base else copy.deepcopy(v)
        return merged
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        merged = [copy.deepcopy(i) for i in base]
        for item in patch:
            for n, existing in enumerate(merged):
                if existing["name"] == item["name"]:
                    merged[n] = strategic_merge(existing, item)
                    break
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def resource_docs(directory: Path) -> list[dict]:
    """The objects a kustomization's `resources` produce (recursively), before its own transformations."""
    out: list[dict] = []
    for entry in kustomization(directory).get("resources", []):
        path = (directory / entry).resolve()
        out.extend(python_render(path) if path.is_dir() else load_docs(path))
    return out


def patch_files(directory: Path) -> list[tuple[Path, dict]]:
    k = kustomization(directory)
    entries = [p if isinstance(p, dict) else {"path": p} for p in k.get("patches", [])]
    entries += [{"path": p} for p in k.get("patchesStrategicMerge", [])]
    return [(directory / e["path"], e) for e in entries if "path" in e]


def python_render(directory: Path) -> list[dict]:
    docs = resource_docs(directory)
    k = kustomization(directory)
    by_key = {key(d): d for d in docs}
    for path, entry in patch_files(directory):
        for patch in load_docs(path):
            target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
            by_key[(target["kind"], target["name"])] = strategic_merge(by_key[(target["kind"], target["name"])], patch)
    docs = list(by_key.values())
    for label_set in k.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
    images = {i["name"]: i for i in k.get("images", [])}
    for doc in docs:
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            name = container["image"].split(":")[0]
            if name in images:
                image = images[name]
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', 'latest')}"
    return docs


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(directory: Path) -> list[dict]:
    command = kustomize_command()
    if command is None:
        return python_render(directory)
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(command)} {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request) -> tuple[str, dict[tuple[str, str], dict]]:
    docs = render(OVERLAYS[request.param])
    return request.param, {key(d): d for d in docs}


# ------------------------------------------------------------------- per file

def manifest_files() -> list[Path]:
    files = sorted(BASE.glob("*.yaml")) + sorted((K8S / "jobs").glob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml"]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_file_is_valid_kubernetes(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        validate(doc, str(path.relative_to(ROOT)))


def test_validator_rejects_unknown_fields() -> None:
    """The strict schema check is live: a misspelt probe field fails."""
    (workload,) = load_docs(BASE / "statefulset.yaml")
    broken = copy.deepcopy(workload)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS.values(), K8S / "monitoring"],
                         ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_existing_files(directory: Path) -> None:
    k = kustomization(directory)
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    for entry in k.get("resources", []):
        assert (directory / entry).exists(), f"{directory}: resource {entry} does not exist"
    for path, _ in patch_files(directory):
        assert path.is_file(), f"{directory}: patch {path.name} does not exist"


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_overlay_patches_target_base_resources(name: str) -> None:
    directory = OVERLAYS[name]
    base = {key(d): d for d in resource_docs(directory)}
    patches = patch_files(directory)
    assert patches, f"overlay {name} patches nothing"
    for path, entry in patches:
        for patch in load_docs(path):
            target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
            assert (target["kind"], target["name"]) in base, (
                f"{path.relative_to(ROOT)} patches {target['kind']}/{target['name']}, which the base does not define"
            )
            original = base[(target["kind"], target["name"])]
            assert patch["apiVersion"] == original["apiVersion"], f"{path.name}: apiVersion differs from the base"
            # a container name that is not in the base would silently add a second container
            containers = patch.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
            base_names = {c["name"] for c in original.get("spec", {}).get("template", {}).get("spec", {})
                          .get("containers", [])}
            for container in containers:
                assert container["name"] in base_names, f"{path.name}: container {container['name']!r} not in base"
            if patch["kind"] == "ConfigMap":
                unknown = set(patch.get("data", {})) - SETTING_NAMES
                assert not unknown, f"{path.name}: {sorted(unknown)} are not settings of server/config.py"


# ------------------------------------------------------------------- rendered

def test_rendered_overlay_is_valid_kubernetes(overlay) -> None:
    name, docs = overlay
    kinds = {kind for kind, _ in docs}
    assert {"StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "Secret"} <= kinds
    assert "Deployment" not in kinds, "one workload runs the server"
    for doc in docs.values():
        validate(doc, f"overlay {name}")


def server_container(docs) -> dict:
    """The pod's one container; an overlay's patch naming another container would have added a second."""
    (container,) = docs[WORKLOAD]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == CONTAINER
    return container


def configmap(docs) -> dict:
    refs = [e["configMapRef"]["name"] for e in server_container(docs).get("envFrom", []) if "configMapRef" in e]
    assert len(refs) == 1
    return docs[("ConfigMap", refs[0])]["data"]


def test_probes_and_graceful_shutdown(overlay) -> None:
    _, docs = overlay
    pod = docs[WORKLOAD]["spec"]["template"]["spec"]
    container = server_container(docs)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "startupProbe must allow for model load"
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names | {8000}
    config = configmap(docs)

    def setting(name: str) -> float:
        return float(config.get(name.upper(), Settings.model_fields[name].default))

    drain_s = setting("drain_grace_s") + max(setting("request_timeout_s"), setting("drain_timeout_s"))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(pre_stop[-1]) if pre_stop[:1] == ["sleep"] else 0.0
    assert pod["terminationGracePeriodSeconds"] > drain_s + pre_stop_s, "grace period shorter than the drain"


def test_resources_security_and_scrape_annotations(overlay) -> None:
    name, docs = overlay
    template = docs[WORKLOAD]["spec"]["template"]
    container = server_container(docs)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{kind} must set cpu and memory"
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu is not None) == (name == "gpu"), "only the gpu overlay asks for nvidia.com/gpu"
    if name == "gpu":
        assert container["resources"]["requests"].get("nvidia.com/gpu") == gpu
        assert container["image"].endswith(":cuda")
    else:
        assert container["image"].endswith(":cpu")
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert template["spec"]["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == int(configmap(docs).get("PORT", 8000))
    # a read-only root needs writable mounts where the server writes
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    settings = pod_settings(name, docs)
    assert {"/tmp", str(settings.spool_dir)} <= mounts
    assert settings.log_file is None or str(settings.log_file.parent) in mounts


def test_selectors_and_references(overlay) -> None:
    _, docs = overlay
    workload = docs[WORKLOAD]
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = docs[("Service", NAME)]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert any(p["targetPort"] in ("http", 8000) for p in service["spec"]["ports"])
    # the StatefulSet's governing Service: headless, over the same pods, not scraped twice by the ServiceMonitor
    governing = docs[("Service", workload["spec"]["serviceName"])]
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"].items() <= pod_labels.items()
    (monitor,) = load_docs(K8S / "monitoring" / "servicemonitor.yaml")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= governing["metadata"]["labels"].items()
    assert docs[("PodDisruptionBudget", NAME)]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = docs[("HorizontalPodAutoscaler", NAME)]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": WORKLOAD[0], "name": NAME}
    # a StatefulSet stops a pod before starting its successor: one replica would make every rollout an outage
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert docs[("PodDisruptionBudget", NAME)]["spec"]["maxUnavailable"] < hpa["minReplicas"]
    assert "replicas" not in workload["spec"], "the HPA owns the replica count"
    for source in server_container(docs)["envFrom"]:
        if "secretRef" in source:
            secret = docs[("Secret", source["secretRef"]["name"])]
            assert "DATABASE_URL" in {**secret.get("stringData", {}), **secret.get("data", {})}
        else:
            assert ("ConfigMap", source["configMapRef"]["name"]) in docs


def pod_settings(name: str, docs) -> Settings:
    """The settings a pod runs with: the image's ENV, then the ConfigMap's keys over it (envFrom)."""
    _, stages = parse(DOCKERFILES["cuda" if name == "gpu" else "cpu"])
    env = {k: v for k, v in env_of(stages[-1]).items() if k in SETTING_NAMES}
    env.update(configmap(docs))
    return Settings(**{k.lower(): v for k, v in env.items()})  # raises on an invalid value


def test_configmap_holds_valid_settings(overlay) -> None:
    name, docs = overlay
    data = configmap(docs)
    unknown = set(data) - SETTING_NAMES
    assert not unknown, f"overlay {name}: {sorted(unknown)} are not settings of server/config.py"
    settings = pod_settings(name, docs)
    assert settings.log_format == "json"
    # the images set LOG_FILE; under a read-only root with no volume for it the server could not start
    assert settings.log_file is None, "in Kubernetes logs go to stdout only (the kubelet rotates them)"
    assert settings.device == ("cuda" if name == "gpu" else "cpu")


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity in bytes ("4Gi", "500M", "1073741824")."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(quantity)


def test_quantity_bytes() -> None:
    assert quantity_bytes("4Gi") == 4 << 30 and quantity_bytes("500M") == 500_000_000 and quantity_bytes("7") == 7


def test_spool_is_a_claim_per_pod_that_outlives_it(overlay) -> None:
    """The spool is not an emptyDir (deleted with the pod, and the pod evicted past its sizeLimit): each pod has a
    PersistentVolumeClaim of its own, kept when the pod goes, larger than the cap the server enforces."""
    name, docs = overlay
    spec = docs[WORKLOAD]["spec"]
    config = configmap(docs)
    (mount,) = [m for m in server_container(docs)["volumeMounts"] if m["mountPath"] == config["SPOOL_DIR"]]
    pod_volumes = {v["name"] for v in spec["template"]["spec"].get("volumes", [])}
    assert mount["name"] not in pod_volumes, f"overlay {name}: SPOOL_DIR is a pod volume, which dies with the pod"
    (claim,) = [c for c in spec["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}, (
        "a claim may hold records not yet in the database: deleting it with its pod loses them")
    size = quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    cap = pod_settings(name, docs).spool_max_bytes
    assert cap <= 0.8 * size, f"SPOOL_MAX_BYTES={cap} leaves too little of the {size}-byte claim for the filesystem"


def test_servicemonitor_and_migration_job() -> None:
    (monitor,) = load_docs(K8S / "monitoring" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    (service,) = load_docs(BASE / "service.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    (job,) = load_docs(K8S / "jobs" / "db-migrate.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["db", "upgrade"]


@pytest.mark.skipif(kustomize_command() is None, reason="no kustomize or kubectl: only the Python renderer runs")
@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_python_renderer_matches_kustomize(name: str) -> None:
    """The fallback renderer (used where no kustomize binary exists) agrees with kustomize on the pod spec."""
    ours = {key(d): d for d in python_render(OVERLAYS[name])}
    theirs = {key(d): d for d in render(OVERLAYS[name])}
    assert set(ours) == set(theirs)
    assert server_container(ours) == server_container(theirs)
    config = ("ConfigMap", "sentiment-analyzer-config")
    assert ours[config]["data"] == theirs[config]["data"]


def runbook_commands() -> list[str]:
    """The lines of docs/RUNBOOK.md's ``bash`` blocks, and its inline `kubectl ...` spans."""
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    fenced = [line for block in re.findall(r"```bash\n(.*?)```", runbook, re.S) for line in block.splitlines()]
    return fenced + re.findall(r"`(kubectl [^`]+)`", runbook)


def test_runbook_commands_name_the_container(overlay) -> None:
    """Every container the runbook's kubectl commands name (``-c``/``--container``, a strategic-merge patch's
    ``containers`` entry) is the pod's: such a patch changes the container, it adds none."""
    _, docs = overlay
    kubectl_flags = [line.split(" -- ")[0] for line in runbook_commands() if line.lstrip().startswith("kubectl")]
    named = [m for flags in kubectl_flags for m in re.findall(r"(?:\s-c|--container)[= ](\S+)", flags)]
    patches = [json.loads(body) for line in runbook_commands()
               for body in re.findall(rf"kubectl patch statefulset {NAME} -p '(\{{.*\}})'", line)]
    assert named and patches, "the runbook names no container: the patterns above find nothing"
    assert set(named) == {CONTAINER}, named
    for patch in patches:
        patched = strategic_merge(docs[WORKLOAD], patch)
        assert [c["name"] for c in patched["spec"]["template"]["spec"]["containers"]] == [CONTAINER], patch


def test_runbook_commands_name_the_workload_kind() -> None:
    """docs/RUNBOOK.md's kubectl commands address the kind the manifests define (the operators' incident runbook
    says deployment/; the runbook maps it once, in prose)."""
    (workload,) = [d for d in load_docs(BASE / "statefulset.yaml") if d["metadata"]["name"] == NAME]
    kind = workload["kind"].lower()
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    fenced = "\n".join(re.findall(r"```bash\n(.*?)```", runbook, re.S))
    named = re.findall(r"kubectl [^\n]*?\b(deployment|statefulset|daemonset)[/ ]sentiment-analyzer\b", fenced)
    assert named, "no kubectl command on the workload in the runbook's command blocks"
    assert set(named) == {kind}, f"the runbook's kubectl commands name {sorted(set(named))}, the manifests a {kind}"
