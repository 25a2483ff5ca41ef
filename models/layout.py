"""How a model variant is stored on disk: one ``.onnx`` file, or its graph plus a few external-data files.

The repository takes no file over 40 MB, and the fp16 DistilBERT is ~46 MB in one file. A variant whose
file would pass ``MAX_FILE_BYTES`` (30 MB) is therefore written in ONNX's external-data format:
``model.fp16.onnx`` keeps the graph (and every initializer under 1 KiB, ``INLINE_BYTES``), and the other
initializers are packed, in graph order, into ``model.fp16.onnx.data-0``, ``model.fp16.onnx.data-1``, ...:
as few files as ``MAX_FILE_BYTES`` allows, of about equal size (a single tensor larger than the limit gets a
file of its own: no format splits one tensor). The weights, the graph and so the outputs are the same; ONNX Runtime
reads the data files from the model's directory, so the server loads the variant by its ``.onnx`` path as
before. Writing is deterministic: the same model gives the same bytes, so a rebuilt artifact matches.

``models.build`` stores every variant it ships this way; the manifest lists each variant's data files under
``variants.<v>.external_data`` and hashes them with every other file (``server.artifact``).

    python -m models.layout models/default   # re-store an artifact's variants (its manifest keeps its version)
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, set_external_data, uses_external_data

from models.manifest import record_layout
from server.artifact import MANIFEST, Artifact, ArtifactError, load_artifact

MAX_FILE_BYTES = 30 * 10**6
INLINE_BYTES = 1024  # smaller initializers stay in the graph file (onnx.save's default threshold)


def data_file_name(model_file: str, index: int) -> str:
    return f"{model_file}.data-{index}"


def external_data_files(path: Path) -> list[str]:
    """The data files ``path``'s graph refers to, in first-use order (reads the graph only)."""
    model = onnx.load(str(path), load_external_data=False)
    names = {ExternalDataInfo(t).location: None for t in _initializers(model) if uses_external_data(t)}
    return list(names)


def store(path: Path, max_file_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """Store the variant at ``path`` as one file if it fits in ``max_file_bytes``, else as graph + data files.

    Returns the data files the variant now uses (``[]`` for one file). A variant that fits in one file and is
    one is left untouched; any other is rewritten (its previous data files removed), so the result depends only
    on the model and the limit.
    """
    previous = external_data_files(path)
    total = sum((path.parent / name).stat().st_size for name in (path.name, *previous))
    if not previous and total <= max_file_bytes:
        return []
    model = onnx.load(str(path))  # with its external data, if any
    # Written beside it first, so a failed write (a full disk) leaves the variant as it was.
    with tempfile.TemporaryDirectory(prefix=".layout-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        names = save_split(model, staged, max_file_bytes) if total > max_file_bytes else _save_whole(model, staged)
        for name in previous:
            (path.parent / name).unlink()
        for name in (*names, path.name):
            (Path(tmp) / name).replace(path.parent / name)
    return names


def _save_whole(model: onnx.ModelProto, path: Path) -> list[str]:
    onnx.save(model, str(path))  # onnx.load took the tensors' bytes into the graph
    return []


def save_split(model: onnx.ModelProto, path: Path, max_file_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """Write ``model`` as ``path`` (the graph) and ``path.data-N`` files; returns the data files' names."""
    tensors = [t for t in _initializers(model) if t.HasField("raw_data") and len(t.raw_data) >= INLINE_BYTES]
    groups = pack([len(t.raw_data) for t in tensors], max_file_bytes)
    names = [data_file_name(path.name, index) for index in range(len(groups))]
    for name in names:
        (path.parent / name).unlink(missing_ok=True)  # onnx appends to an existing file
    for index, group in enumerate(groups):
        for position in group:
            set_external_data(tensors[position], names[index])
    onnx.save(model, str(path))  # writes each marked tensor's bytes to its file, then the graph without them
    mode = path.stat().st_mode & 0o777
    for name in names:  # onnx creates them 0600: a server running as another user could not read them
        (path.parent / name).chmod(mode)
    return names


def pack(sizes: list[int], max_file_bytes: int) -> list[list[int]]:
    """Consecutive groups of ``sizes``' indices: as few as ``max_file_bytes`` allows, the largest as small as
    that number of groups allows (so the files come out of about equal size).

    Every group fits in ``max_file_bytes`` except one that is a single larger tensor.
    """
    fewest = len(_fill(sizes, max_file_bytes))
    low, high = 1, max_file_bytes  # the smallest capacity that still needs no more groups than ``fewest``
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(_fill(sizes, middle)) <= fewest else (middle + 1, high)
    return _fill(sizes, low)


def _fill(sizes: list[int], capacity: int) -> list[list[int]]:
    """Fill each group up to ``capacity`` in order; a size over it gets a group of its own."""
    groups: list[list[int]] = []
    filled = 0
    for index, size in enumerate(sizes):
        if not groups or filled + size > capacity:
            groups.append([])
            filled = 0
        groups[-1].append(index)
        filled += size
    return groups


def _initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every initializer, subgraphs' included (what ONNX Runtime reads external data for)."""
    found: list[onnx.TensorProto] = []

    def visit(graph: onnx.GraphProto) -> None:
        found.extend(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(model.graph)
    return found


def check_external_data(artifact: Artifact) -> None:
    """``ArtifactError`` unless each variant's graph reads exactly the data files its manifest entry names.

    The server itself refuses a data file the graph reads but the manifest omits (``server.artifact``, from the
    graph's bytes); this also finds the opposite, a listed data file the graph does not read.
    """
    for variant in artifact.variants():
        path, listed = artifact.variant_path(variant), artifact.variant_files(variant)[1:]
        used = external_data_files(path)
        if sorted(used) != sorted(listed):
            raise ArtifactError(f"{path} reads its weights from {used or 'itself'} but {MANIFEST} lists {listed} "
                                f"for {variant} (re-store it: python -m models.layout {artifact.directory})")


def store_artifact(directory: Path, max_file_bytes: int = MAX_FILE_BYTES) -> dict[str, list[str]]:
    """Verify the artifact, store each of its variants by ``store`` and record the layout in its manifest."""
    artifact = load_artifact(directory)
    layout = {v: store(artifact.variant_path(v), max_file_bytes) for v in artifact.variants()}
    record_layout(directory, layout)
    return layout


def megabytes(text: str) -> int:
    """``--max-file-mb``'s type: a positive, finite number of MB, as bytes."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of MB, not {text!r}")
    return max(1, int(value * 1e6))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="artifact directory (verified first, then rewritten in place)")
    parser.add_argument("--max-file-mb", type=megabytes, default=MAX_FILE_BYTES, help="largest file, in MB (30)")
    args = parser.parse_args(argv)
    try:
        layout = store_artifact(args.artifact, args.max_file_mb)
    except ArtifactError as exc:
        raise SystemExit(str(exc)) from None
    except OSError as exc:  # a data file the graph names but the manifest does not, gone; an unreadable graph
        raise SystemExit(f"cannot re-store {args.artifact}: {exc}") from None
    for variant, files in layout.items():
        print(f"{variant}: {', '.join(files) or 'one file'}")


if __name__ == "__main__":
    main()
