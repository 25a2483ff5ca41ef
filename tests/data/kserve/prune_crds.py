"""Write the KServe CRD schemas tests/test_deploy_kserve.py validates against, from KServe's release CRDs.

    python tests/data/kserve/prune_crds.py serving.kserve.io_servingruntimes.yaml \
        serving.kserve.io_inferenceservices.yaml

(the files are KServe's ``config/crd/full/`` at the release named in README.md beside this). Each CRD's
``openAPIV3Schema`` is kept whole, except the InferenceService's parts these manifests do not use and that
would only add megabytes: the explainer, the transformer, the per-framework predictor shortcuts (``sklearn``,
``onnx``, ``triton``, ... which the ``model`` field replaces) and the multi-node ``workerSpec``. A manifest that
used one of them would fail the test as an unknown field, so nothing invalid can pass for being pruned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PREDICTOR_SHORTCUTS = ("huggingface", "lightgbm", "onnx", "paddle", "pmml", "pytorch", "sklearn", "tensorflow",
                       "triton", "xgboost", "workerSpec")


def prune(kind: str, schema: dict) -> dict:
    if kind == "InferenceService":
        spec = schema["properties"]["spec"]
        spec["properties"] = {"predictor": spec["properties"]["predictor"]}
        predictor = spec["properties"]["predictor"]["properties"]
        for name in PREDICTOR_SHORTCUTS:
            del predictor[name]
    return schema


def main(paths: list[str]) -> None:
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = prune(kind, version["schema"]["openAPIV3Schema"])
            out = HERE / f"{kind.lower()}-{version['name']}.json"
            out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
            print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
