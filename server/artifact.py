"""The model artifact directory: manifest, hash verification, variant choice.

An artifact holds ONNX variants (``model.onnx`` fp32, ``model.int8.onnx``,
``model.fp16.onnx``; any subset, at least one), ``tokenizer.json`` and
``manifest.json``. The manifest lists every file with its sha256; loading
refuses a missing or altered file with one line naming it.

A variant too large for one file (``models.layout``: the repository takes no
file over 40 MB) is its graph, ``model.fp16.onnx``, plus external-data files
``model.fp16.onnx.data-0``, ``-1``, ... that ONNX Runtime reads from the same
directory. The variant entry names them under ``external_data``; each must
be listed in ``files``, so a missing or altered data file is refused with the
same "model file missing/corrupt" line as a missing or altered ``.onnx``.

The manifest is checked against ``ManifestSchema`` (types of every field the
server reads, a sha256 for every file, known variant names, a sequence length
within ``MAX_SEQUENCE_LENGTH_CAP``) before any file is opened.

manifest.json (written by ``models.manifest``)::

    {"name", "version", "architecture", "labels": [...logit order...],
     "max_sequence_length", "source", "opset",
     "files": {"<file>": {"sha256", "bytes"}},
     "variants": {"fp32"|"int8"|"fp16": {"file", ["external_data": [...],] "precision", "parity", "accuracy", ...}},
     "parity": {...}, "evaluation": {...}}
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator

from server.regular_file import NotRegularFile, open_regular

MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 8 << 20  # the default model's is 5 KB; thousands of labels stay far below this
TOKENIZER = "tokenizer.json"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
REQUIRED_KEYS = ("name", "version", "architecture", "labels", "max_sequence_length", "files", "variants")
# Longest sequence a manifest may declare. Start-up and reload run one text of the declared length through the
# model (``ModelRuntime.smoke_test``), which proves the model accepts it; this cap keeps that probe from
# allocating an absurd attention matrix first (BERT-family encoders stop at 512, long-context ones at 8192).
MAX_SEQUENCE_LENGTH_CAP = 8192
MAX_LABEL_CHARS = 32  # the prediction store's label column
MAX_LABELS = 64  # every answer and record carries each label's probability: 10,000 made a 3 KB request 79 MB


def label_problem(label: str) -> str | None:
    """What makes ``label`` unusable as a label name, or None. Tabs, line breaks and commas are the feedback
    export's and ``--label-map``'s separators; other control or format characters (NUL, a right-to-left override)
    and line or paragraph separators would corrupt a log line or make two labels look alike. Characters this
    Python's Unicode tables do not know yet are let through: a build on a newer Python must still load here."""
    if not 0 < len(label) <= MAX_LABEL_CHARS or not label.strip():
        return f"1-{MAX_LABEL_CHARS} characters, not only spaces"
    if "," in label or has_control(label):
        return "no tab, line break, comma or other control character"
    if label != label.strip():
        return "no space at its start or end (it would look like the label without it)"
    return None


def has_control(text: str) -> bool:
    """A control or format character (NUL, a right-to-left override), or a line or paragraph separator."""
    return any(unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") for char in text)


def look_alike(label: str) -> str:
    """What a label is read as: the same letters in another Unicode form or case look the same to a person."""
    return unicodedata.normalize("NFC", label).casefold()


class ArtifactError(RuntimeError):
    """The artifact cannot be served; the message names the file and the fix."""


class VariantNotShipped(ArtifactError):
    """MODEL_VARIANT names a variant this artifact does not ship (a settings mistake, not a broken artifact)."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class FileEntry(_Entry):
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: StrictInt | None = Field(None, ge=0)


class VariantEntry(_Entry):
    file: StrictStr = Field(min_length=1)
    external_data: list[Annotated[StrictStr, Field(min_length=1)]] = []


class ManifestSchema(_Entry):
    """The manifest's fields and their types; fields not named here (parity, evaluation, ...) are kept as is."""

    # Lengths: the prediction store's columns (server/store/tables.py); a longer one could never be recorded.
    name: StrictStr = Field(min_length=1, max_length=128)
    version: StrictStr = Field(min_length=1, max_length=64)
    architecture: StrictStr
    labels: list[StrictStr] = Field(min_length=2, max_length=MAX_LABELS)
    max_sequence_length: StrictInt = Field(ge=2, le=MAX_SEQUENCE_LENGTH_CAP)
    files: dict[str, FileEntry]
    variants: dict[Literal["fp32", "int8", "fp16"], VariantEntry] = Field(min_length=1)
    opset: StrictInt | None = None
    source: StrictStr | dict[str, Any] | None = None

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        problem = labels_problem(labels)
        if problem:
            raise ValueError(problem)
        return labels

    @field_validator("name", "version")
    @classmethod
    def _plain(cls, value: str) -> str:
        problem = identity_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def labels_problem(labels: list[str]) -> str | None:
    """What makes ``labels`` unusable as a model's labels, or None (the server's rule, and the build's)."""
    if len(set(labels)) != len(labels):
        return "labels must be distinct names, in logit order"
    for label in labels:
        problem = label_problem(label)
        if problem:
            return f"label {label!r}: each label must have {problem}"
    if len({look_alike(label) for label in labels}) != len(labels):
        return "labels must differ in more than case or Unicode form (e and e + U+0301 look the same)"
    return None


def identity_problem(value: str) -> str | None:
    """What makes ``value`` unusable as a model's name or version, or None (the server's rule, and the build's).
    Both are in every record, metric and log line, and in OIP v2's URLs (``/v2/models/{name}/versions/{version}``):
    a slash made a version no URL could name, a right-to-left override one that reads otherwise."""
    if "/" in value or has_control(value) or value != value.strip():
        return "no slash, control or format character (such as a right-to-left override), or space at the start or end"
    return None


def describe_schema_error(error: ValidationError) -> str:
    """The first problem as ``field.path: what is wrong (got value)``."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    value = repr(first.get("input"))
    value = value if len(value) <= 60 else value[:57] + "..."
    return f"{where}: {first['msg'].removeprefix('Value error, ')} (got {value})"


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
            raise VariantNotShipped(
                f"model variant {variant!r} is not in {self.directory / MANIFEST} (available: {self.variants()}); "
                "set MODEL_VARIANT to one of them or auto"
            )
        return self.directory / info["file"]

    def read_verified(self, name: str) -> bytes:
        """A listed file's bytes, checked against its sha256: what the tokenizer and ONNX Runtime parse is exactly
        what was verified. Every parse reads through here, never the path: the engine is built again after the
        memory plan and the CUDA fallback's CPU session hours later, and a file swapped in meanwhile would be
        served unverified; and ONNX Runtime maps external-data files it opens itself for the session's life, so
        one copied over in place changed the served answers under the same version, or killed the process with
        SIGBUS when cut short."""
        path, listed = self.directory / name, self.manifest["files"][name]
        try:
            data = _read_regular_file(path, listed.get("bytes"))
        except OSError as exc:
            raise ArtifactError(f"model file unreadable: {path}: {exc.strerror or exc} (restore it or rebuild)"
                                ) from None
        if data is None or hashlib.sha256(data).hexdigest() != listed["sha256"]:
            raise ArtifactError(
                f"model file corrupt: {path} does not match its sha256 in {MANIFEST}: it changed after the artifact "
                "was loaded (never copy over a served artifact: build a new directory and reload; restore it or "
                "rebuild)")
        return data

    def read_variant(self, variant: str) -> tuple[bytes, dict[str, bytes]]:
        """The variant's graph and its external-data files (``read_verified``), each under every name its graph
        gives it: ONNX Runtime looks a location up as the graph spells it, and the manifest may spell the same file
        otherwise (``sub/d0`` for ``sub/./d0``; ``check_external_data_listed`` compares them normalized)."""
        graph_name, *external = self.variant_files(variant)
        graph = self.read_verified(graph_name)
        if not external:  # one file (the usual int8): nothing to look up, so no scan of the graph
            return graph, {}
        spellings: dict[str, list[str]] = {}
        for location in sorted(external_data_locations_in(graph)):
            spellings.setdefault(os.path.normpath(location), []).append(location)
        table: dict[str, bytes] = {}
        for name in external:
            data = self.read_verified(name)
            for spelling in spellings.get(os.path.normpath(name), [name]):
                table[spelling] = data
        return graph, table

    def variant_files(self, variant: str) -> list[str]:
        """The variant's files: its ``.onnx`` and then its external-data files, if any."""
        return entry_files(self.manifest["variants"][variant])

    def variant_sha256(self, variant: str) -> str:
        """What identifies the variant's bytes: its file's sha256, or for a variant with external data a digest
        of its files' sha256s (its graph file alone would not change with the weights)."""
        files = self.variant_files(variant)
        if len(files) == 1:
            return str(self.manifest["files"][files[0]]["sha256"])
        listed = "".join(f"{name}:{self.manifest['files'][name]['sha256']}\n" for name in files)
        return hashlib.sha256(listed.encode()).hexdigest()

    def choose_variant(self, requested: str, device: str) -> str:
        """fp16 on CUDA, int8 on CPU, when present; otherwise fp32, otherwise what exists."""
        if requested != "auto":
            self.variant_path(requested)
            return requested
        preference = ("fp16", "fp32", "int8") if device == "cuda" else ("int8", "fp32", "fp16")
        available = self.variants()
        return next(v for v in preference if v in available)


def _read_regular_file(path: Path, size: int | None) -> bytes | None:
    """The file's bytes, or None when it is not a regular file (``server.regular_file``: a file swapped for
    ``/dev/zero`` was read until memory ran out, and opening a FIFO would wait for a writer) of ``size`` bytes (when
    the manifest gives one)."""
    try:
        fd = open_regular(path)
    except NotRegularFile:
        return None
    with os.fdopen(fd, "rb") as handle:
        found = os.fstat(fd)
        if size is not None and found.st_size != size:
            return None
        data = handle.read(found.st_size + 1)  # one byte more: a file grown since fstat is not what was listed
    return data if len(data) == found.st_size else None


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest as a dict, checked against ``ManifestSchema``; raises ``ArtifactError`` naming the problem."""
    manifest_path = directory / MANIFEST
    if manifest_path.exists() and not manifest_path.is_file():
        raise ArtifactError(f"model manifest {manifest_path} is not a regular file (a folder, FIFO or device): "
                            "restore it or rebuild the artifact")
    if not manifest_path.is_file():
        if (directory / "config.json").is_file():
            raise ArtifactError(f"{directory} is a Hugging Face checkpoint, not a model artifact: build one with "
                                f"`python -m models.build --checkpoint {directory} --out ARTIFACT` and serve ARTIFACT")
        raise ArtifactError(f"model manifest missing: {manifest_path} (build the artifact with `python -m models.build "
                            f"--checkpoint CHECKPOINT --out {directory}`, or `make model` for the bundled one)")
    try:
        with manifest_path.open("rb") as handle:  # read whole, a 1.5 GB one took 3 GB and held the event loop 5 s
            data = handle.read(MANIFEST_MAX_BYTES + 1)  # one byte more: a larger one is refused, the rest unread
        if len(data) > MANIFEST_MAX_BYTES:
            raise ArtifactError(f"model manifest too large: {manifest_path} holds more than "
                                f"{MANIFEST_MAX_BYTES >> 20} MiB, far more than any manifest: restore it or rebuild "
                                "the artifact")
        manifest = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model manifest unreadable: {manifest_path}: {exc} "
                            "(it must be UTF-8 JSON; restore it or rebuild the artifact)") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"model manifest invalid: {manifest_path} holds a JSON {type(manifest).__name__}, "
                            "not an object (restore it or rebuild the artifact)")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"model manifest incomplete: {manifest_path} lacks {missing}")
    try:
        ManifestSchema.model_validate(manifest)
    except ValidationError as exc:
        raise ArtifactError(f"model manifest invalid: {manifest_path}: {describe_schema_error(exc)} "
                            "(restore it or rebuild the artifact)") from None
    return manifest


def entry_files(info: dict) -> list[str]:
    """A manifest variant entry's files: its ``.onnx`` and then its external-data files, if any."""
    return [info["file"], *info.get("external_data", [])]


# A TensorProto.external_data entry, StringStringEntryProto {key = "location" (field 1), value (field 2)}: the tag
# and length of the key, the key, and the value's tag; its length and bytes follow.
_LOCATION_ENTRY = b"\x0a\x08location\x12"
SCAN_CHUNK = 1 << 20  # bytes of a graph read at a time by ``external_data_locations``
LOCATION_MAX = 4096  # bytes: a longer location is no file name (PATH_MAX), so weights' bytes matched by chance


def external_data_locations(onnx_path: Path) -> set[str]:
    """The files an ONNX model's tensors name as their external data, read from its protobuf bytes (the ``onnx``
    package would parse the whole graph, but the runtime image does not ship it). The entry's bytes could also
    occur inside weights by chance; such a match names no file there, and the caller looks only at files.

    Read a chunk at a time: every variant's graph is scanned at start-up and on reload, and reading a 1 GB fp32
    graph whole took that much more of the container's memory limit just before ONNX Runtime loads the model.
    (Mapping it would hold no memory either, but a file cut short while mapped, a model copied over in place
    during a reload, kills the process with SIGBUS.)"""
    with onnx_path.open("rb") as handle:
        fd = handle.fileno()
        return _locations(lambda at, size: os.pread(fd, size, at))


def external_data_locations_in(graph: bytes) -> set[str]:
    """``external_data_locations`` of a graph's bytes already in memory (the verified copy the engine loads)."""
    view = memoryview(graph)
    return _locations(lambda at, size: bytes(view[at : at + size]))


def _locations(read: Callable[[int, int], bytes]) -> set[str]:
    """The locations named in a graph that ``read(at, size)`` reads, ``SCAN_CHUNK`` bytes at a time."""
    found: set[str] = set()
    overlap = len(_LOCATION_ENTRY) - 1  # an entry may straddle two chunks
    offset, tail = 0, b""
    while chunk := read(offset, SCAN_CHUNK):
        window, window_start = tail + chunk, offset - len(tail)
        at = window.find(_LOCATION_ENTRY)
        while at >= 0:
            location = _location_at(read, window_start + at + len(_LOCATION_ENTRY))
            if location is not None:
                found.add(location)
            at = window.find(_LOCATION_ENTRY, at + 1)
        tail, offset = window[-overlap:], offset + len(chunk)
    return found


def _location_at(read: Callable[[int, int], bytes], at: int) -> str | None:
    """The entry's value at byte ``at``: a varint length and that many bytes; None when the length cannot be a
    file name's."""
    head = read(at, 5)
    size = 0
    for index, byte in enumerate(head):
        size |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            break
    else:
        return None
    if size > LOCATION_MAX:
        return None
    return read(at + index + 1, size).decode("utf-8", "replace")


def check_external_data_listed(directory: Path, manifest: dict) -> None:
    """Every file a variant's graph loads weights from must be among its listed (so hashed) ``external_data``:
    ONNX Runtime would load an unlisted one, and a change to it would go unnoticed."""
    for variant, info in manifest["variants"].items():
        listed = {os.path.normpath(name) for name in info.get("external_data", [])}
        for location in sorted(external_data_locations(directory / info["file"])):
            if os.path.normpath(location) not in listed and os.path.lexists(directory / location):
                raise ArtifactError(
                    f"model file {directory / info['file']} loads weights from {location!r}, which {MANIFEST} does "
                    f"not list under variants.{variant}.external_data, so no sha256 checks it: rebuild the artifact "
                    "(python -m models.build), or add the file there and under files with its sha256 and bytes")


def load_artifact(directory: str | Path, verify: bool = True) -> Artifact:
    """Read and check an artifact directory; raises ``ArtifactError`` naming the offending file.

    The directory is resolved once: every file is read from the same one, even while a symlink to it is swapped
    (the runbook's ``mv -T``), which made a reload read half its files from each artifact."""
    try:
        directory = Path(directory).resolve()
    except (RuntimeError, OSError) as error:  # a link that loops: Python 3.11 raises RuntimeError, "cannot serve"
        raise ArtifactError(f"{directory} cannot be followed to a directory ({error}): set MODEL_PATH to the "
                            "artifact directory") from None
    if directory.exists() and not directory.is_dir():  # "not found" sent the operator looking for a missing path
        what = "a file" if directory.is_file() else NotRegularFile(directory, directory.stat().st_mode).kind
        raise ArtifactError(f"{directory} is {what}, not a model directory: set MODEL_PATH to the artifact directory "
                            f"that holds {MANIFEST}" + (f" ({directory.parent})" if directory.name == MANIFEST else ""))
    if not directory.is_dir():
        raise ArtifactError(f"model directory not found: {directory} (set MODEL_PATH to an artifact directory)")
    manifest = read_manifest(directory)
    manifest_path = directory / MANIFEST
    needed = {TOKENIZER, *(name for info in manifest["variants"].values() for name in entry_files(info))}
    unlisted = sorted(needed - set(manifest["files"]))
    if unlisted:
        raise ArtifactError(f"model manifest has no sha256 for {unlisted[0]} in {manifest_path}")
    for name, info in manifest["files"].items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"model manifest lists {name!r}, outside {directory}, in {manifest_path}")
        if not path.exists():
            raise ArtifactError(f"model file missing: {path} (listed in {MANIFEST}; restore it or rebuild)")
        if not path.is_file():
            raise ArtifactError(f"model file {path} is not a regular file (a folder, FIFO or device): restore the "
                                "file or rebuild the artifact")
        listed, found = info.get("bytes"), path.stat().st_size
        if listed is not None and found != listed:  # read_verified would call it a file changed since it loaded
            raise ArtifactError(f"model file corrupt: {path} has {found} bytes, {listed} in {MANIFEST} (restore it or "
                                "rebuild; a manifest edited by hand: correct its bytes)")
        if verify and sha256_file(path) != info["sha256"]:
            raise ArtifactError(
                f"model file corrupt: {path} does not match its sha256 in {MANIFEST} (restore it or rebuild)"
            )
    check_external_data_listed(directory, manifest)
    return Artifact(directory=directory, manifest=manifest)
