"""Write and update an artifact's ``manifest.json`` in the format ``server.artifact`` reads.

Every file in the artifact directory (the manifest itself aside) is listed
with its sha256 and size, so the server can refuse a missing or altered file.
The version defaults to a digest of those hashes: the server keys its
prediction cache by version, so a different model must never share one.
A variant stored as graph + external-data files (``models.layout``) lists
them under ``variants.<v>.external_data``; re-storing an artifact in another
layout keeps its version (same weights, same outputs: cached predictions and
stored records stay valid), so the version is the digest of the files *as
built*, not necessarily of the files now present.

    python -m models.manifest models/default     # verify hashes and external data, print the summary
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from server.artifact import MANIFEST, ArtifactError, load_artifact, sha256_file


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


def content_version(files: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256("".join(f"{name}:{info['sha256']}\n" for name, info in files.items()).encode())
    return digest.hexdigest()[:12]


def write_manifest(
    directory: Path,
    *,
    name: str,
    architecture: str,
    labels: list[str],
    max_sequence_length: int,
    source: str | dict[str, Any],
    opset: int,
    variants: dict[str, dict[str, Any]],
    parity: dict[str, Any],
    evaluation: dict[str, Any],
    version: str | None = None,
) -> dict[str, Any]:
    """Hash the directory's files and write ``manifest.json``; returns the manifest."""
    files = file_entries(directory)
    manifest = {
        "name": name,
        "version": version or content_version(files),
        "architecture": architecture,
        "labels": list(labels),
        "max_sequence_length": max_sequence_length,
        "source": source,
        "opset": opset,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "variants": variants,
        "parity": parity,
        "evaluation": evaluation,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def record_evaluation(directory: Path, variant: str, result: dict[str, Any], data_file: Path,
                      label_map: dict[str, str] | None = None) -> dict[str, Any]:
    """Store one variant's evaluation (and its accuracy on the variant entry) in an existing manifest.

    Results on another file replace the earlier ones (every result under ``evaluation`` is on one file).
    """
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    evaluation = manifest.setdefault("evaluation", {})
    if evaluation.get("data") != str(data_file):
        evaluation["results"] = {}
        for info in manifest["variants"].values():
            info["accuracy"] = None
    evaluation["data"] = str(data_file)
    evaluation["label_map"] = label_map
    evaluation.setdefault("results", {})[variant] = result
    if variant in manifest["variants"]:
        manifest["variants"][variant]["accuracy"] = result["accuracy"]
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def record_layout(directory: Path, external_data: dict[str, list[str]]) -> dict[str, Any]:
    """Re-list the files, and each variant's external-data files, in an existing manifest; the version stays.

    Storing a variant in another layout (``models.layout``) changes its files, not its weights or outputs,
    so the version (the key of the prediction cache and of stored records) stays the one the build gave.
    """
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"] = file_entries(directory)
    for variant, files in external_data.items():
        entry = {key: value for key, value in manifest["variants"][variant].items() if key != "external_data"}
        manifest["variants"][variant] = with_external_data(entry, files)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def with_external_data(entry: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """A variant entry with ``external_data`` right after ``file`` when the variant has data files."""
    if not files:
        return entry
    rest = {key: value for key, value in entry.items() if key != "file"}
    return {"file": entry["file"], "external_data": list(files), **rest}


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a build prints: identity, labels, length, each shipped variant, and what was checked but not shipped."""
    out = {
        "name": manifest["name"],
        "version": manifest["version"],
        "labels": manifest["labels"],
        "max_sequence_length": manifest["max_sequence_length"],
        "variants": {
            v: {"file": info["file"], "accuracy": info.get("accuracy"), "parity": info.get("parity")}
            for v, info in manifest["variants"].items()
        },
        "megabytes": round(sum(f["bytes"] for f in manifest["files"].values()) / 1e6, 1),
    }
    results = (manifest.get("evaluation") or {}).get("results", {})
    unshipped = {v: {"parity": parity, "accuracy": results.get(v, {}).get("accuracy")}
                 for v, parity in (manifest.get("parity") or {}).items()
                 if isinstance(parity, dict) and v not in manifest["variants"]}
    if unshipped:
        out["checked_not_shipped"] = unshipped
        out["note"] = (f"{', '.join(unshipped)} built and checked but not shipped; build with --keep-fp32 (or "
                       "--variants ...,fp32) to ship model.onnx for MODEL_VARIANT=fp32 and the fp32 benchmarks")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="artifact directory")
    args = parser.parse_args(argv)
    from models.layout import check_external_data  # needs onnx; models.layout imports this module

    try:
        artifact = load_artifact(args.artifact)
        check_external_data(artifact)
    except ArtifactError as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps(summary(artifact.manifest), indent=2))


if __name__ == "__main__":
    main()
