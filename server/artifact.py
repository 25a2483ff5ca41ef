"""The model artifact directory: manifest, hash verification, variant choice.

An artifact holds ONNX variants (``model.onnx`` fp32, ``model.int8.onnx``,
``model.fp16.onnx``; any subset, at least one), ``tokenizer.json`` and
``manifest.json``. The manifest lists every file with its sha256; loading
refuses a missing or altered file with one line naming it.

manifest.json (written by ``models.manifest``)::

    {"name", "version", "architecture", "labels": [...logit order...],
     "max_sequence_length", "source", "opset",
     "files": {"<file>": {"sha256", "bytes"}},
     "variants": {"fp32"|"int8"|"fp16": {"file", "precision", "parity", "accuracy", ...}},
     "parity": {...}, "evaluation": {...}}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
REQUIRED_KEYS = ("name", "version", "architecture", "labels", "max_sequence_length", "files", "variants")


class ArtifactError(RuntimeError):
    """The artifact cannot be served; the message names the file and the fix."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    directory: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_sequence_length"])

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER

    def variants(self) -> list[str]:
        return [v for v in ("fp16", "int8", "fp32") if v in self.manifest["variants"]]

    def variant_path(self, variant: str) -> Path:
        info = self.manifest["variants"].get(variant)
        if info is None:
            raise ArtifactError(
                f"model variant {variant!r} is not in {self.directory / MANIFEST} (available: {self.variants()}); "
                "set MODEL_VARIANT to one of them or auto"
            )
        return self.directory / info["file"]

    def choose_variant(self, requested: str, device: str) -> str:
        """fp16 on CUDA, int8 on CPU, when present; otherwise fp32, otherwise what exists."""
        if requested != "auto":
            self.variant_path(requested)
            return requested
        preference = ("fp16", "fp32", "int8") if device == "cuda" else ("int8", "fp32", "fp16")
        available = self.variants()
        return next(v for v in preference if v in available)


def load_artifact(directory: str | Path, verify: bool = True) -> Artifact:
    """Read and check an artifact directory; raises ``ArtifactError`` naming the offending file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"model directory not found: {directory} (set MODEL_PATH to an artifact directory)")
    if not manifest_path.is_file():
        raise ArtifactError(f"model manifest missing: {manifest_path} (rebuild the artifact with `make model`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model manifest unreadable: {manifest_path}: {exc}") from None
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"model manifest incomplete: {manifest_path} lacks {missing}")
    if not manifest["variants"]:
        raise ArtifactError(f"model manifest lists no ONNX variant: {manifest_path}")
    needed = {TOKENIZER, *(info["file"] for info in manifest["variants"].values())}
    unlisted = sorted(needed - set(manifest["files"]))
    if unlisted:
        raise ArtifactError(f"model manifest has no sha256 for {unlisted[0]} in {manifest_path}")
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"model file missing: {path} (listed in {MANIFEST}; restore it or rebuild)")
        if verify and sha256_file(path) != info["sha256"]:
            raise ArtifactError(
                f"model file corrupt: {path} does not match its sha256 in {MANIFEST} (restore it or rebuild)"
            )
    return Artifact(directory=directory, manifest=manifest)
