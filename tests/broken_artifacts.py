"""Broken copies of the tiny artifact, one per way an artifact goes wrong, for the start-up, doctor and reload matrices.

Each breaker takes a fresh copy of a good artifact and damages it in one way. Where the damage is inside a
file, the manifest's sha256 is updated to match ("rehashed"), so the check that must catch it is the one
after hash verification (the manifest schema, the tokenizer, the ONNX session, the smoke predictions).
The CPU serves ``model.int8.onnx`` when MODEL_VARIANT is auto, so ONNX damage is done to every variant.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from server.artifact import MANIFEST, TOKENIZER, sha256_file


def copy_artifact(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def write_manifest(directory: Path, manifest: object) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest))


def edit_manifest(directory: Path, edit: Callable[[dict], None]) -> None:
    manifest = manifest_of(directory)
    edit(manifest)
    write_manifest(directory, manifest)


def rehash(directory: Path, *names: str) -> None:
    """Update the manifest's sha256 and size of ``names`` to the files as they now are."""
    manifest = manifest_of(directory)
    for name in names:
        manifest["files"][name] = {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
    write_manifest(directory, manifest)


def variant_files(directory: Path) -> list[str]:
    return [info["file"] for info in manifest_of(directory)["variants"].values()]


def edit_onnx_outputs(directory: Path, rewrite: Callable[[object, str], None]) -> None:
    """Rewrite every variant's graph after its ``logits`` (``rewrite(graph, raw_name)``), then rehash it."""
    import onnx

    for name in variant_files(directory):
        model = onnx.load(str(directory / name))
        output = model.graph.output[0]
        raw = output.name + "_raw"
        for node in model.graph.node:
            node.output[:] = [raw if o == output.name else o for o in node.output]
        rewrite(model.graph, raw)
        onnx.save(model, str(directory / name))
    rehash(directory, *variant_files(directory))


def _nan_weights(graph, raw: str) -> None:
    """logits = raw * NaN: what weights damaged into NaN give (a file that loads, and predictions that are not)."""
    from onnx import TensorProto, helper

    graph.initializer.append(helper.make_tensor("broken_nan", TensorProto.FLOAT, [], [float("nan")]))
    graph.node.append(helper.make_node("Mul", [raw, "broken_nan"], [graph.output[0].name]))


def _four_logits(graph, raw: str) -> None:
    """logits = concat(raw, raw): four logits for a two-label manifest."""
    from onnx import helper

    graph.node.append(helper.make_node("Concat", [raw, raw], [graph.output[0].name], axis=1))


def rehashed_nan_weights(d: Path) -> None:
    edit_onnx_outputs(d, _nan_weights)


def wrong_outputs(d: Path) -> None:
    edit_onnx_outputs(d, _four_logits)


def garbage_onnx(d: Path) -> None:
    for name in variant_files(d):
        (d / name).write_bytes(b"this is not an ONNX model\n" * 64)
    rehash(d, *variant_files(d))


def file_entry_without_sha256(d: Path) -> None:
    edit_manifest(d, lambda m: m["files"][TOKENIZER].pop("sha256"))


def manifest_not_utf8(d: Path) -> None:
    (d / MANIFEST).write_bytes((d / MANIFEST).read_bytes().replace(b'"name": "', b'"name": "\xff\xfe', 1))


def invalid_tokenizer(d: Path) -> None:
    (d / TOKENIZER).write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    rehash(d, TOKENIZER)


def tokenizer_empty_object(d: Path) -> None:
    (d / TOKENIZER).write_text("{}")
    rehash(d, TOKENIZER)


def tokenizer_beyond_the_embeddings(d: Path) -> None:
    """A token whose id the model has no embedding for: every batch holding it failed, with every other request in it
    (a red team's reload was accepted, and 40 such requests failed 41 others)."""
    tokenizer = json.loads((d / TOKENIZER).read_text())
    # the tokenizer gives it the next free id, 30522: the first the model has no row for
    tokenizer["added_tokens"].append({"id": 40000, "content": "zapword", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": True, "special": False})
    (d / TOKENIZER).write_text(json.dumps(tokenizer))
    rehash(d, TOKENIZER)


def tokenizer_word_beyond_the_embeddings(d: Path) -> None:
    """A word of the vocabulary mapped to an id past its size: the vocabulary's size said nothing of it."""
    tokenizer = json.loads((d / TOKENIZER).read_text())
    tokenizer["model"]["vocab"]["awful"] = 40000
    (d / TOKENIZER).write_text(json.dumps(tokenizer))
    rehash(d, TOKENIZER)


def missing_manifest(d: Path) -> None:
    (d / MANIFEST).unlink()


def manifest_not_json(d: Path) -> None:
    (d / MANIFEST).write_text('{"name": "tiny-test", ')


def manifest_not_object(d: Path) -> None:
    write_manifest(d, [manifest_of(d)])


def missing_keys(d: Path) -> None:
    edit_manifest(d, lambda m: m.pop("labels"))


def labels_not_list(d: Path) -> None:
    edit_manifest(d, lambda m: m.update(labels="NEGATIVE,POSITIVE"))


def label_with_a_line_break(d: Path) -> None:
    """It would split a feedback export's row in two."""
    edit_manifest(d, lambda m: m.update(labels=["NEG\nATIVE", "POSITIVE"]))


def too_many_labels(d: Path) -> None:
    """Every answer and record carries each label's probability: 10,000 made a 3 KB request's answer 79 MB."""
    edit_manifest(d, lambda m: m.update(labels=[f"L{i}" for i in range(65)]))


def variants_a_list(d: Path) -> None:
    edit_manifest(d, lambda m: m.update(variants=list(m["variants"])))


def variants_empty(d: Path) -> None:
    edit_manifest(d, lambda m: m.update(variants={}))


def unknown_variant(d: Path) -> None:
    edit_manifest(d, lambda m: m["variants"].update(fp64={"file": "model.onnx"}))


def variant_file_unlisted(d: Path) -> None:
    edit_manifest(d, lambda m: m["variants"]["int8"].update(file="model.int4.onnx"))


def max_length_not_a_number(d: Path) -> None:
    edit_manifest(d, lambda m: m.update(max_sequence_length="long"))


def max_length_zero(d: Path) -> None:
    edit_manifest(d, lambda m: m.update(max_sequence_length=0))


def max_length_two(d: Path) -> None:
    """Valid by the schema, but [CLS] and [SEP] fill it: every text was answered as the same two tokens (a red
    team's reload was accepted)."""
    edit_manifest(d, lambda m: m.update(max_sequence_length=2))


def max_length_huge(d: Path) -> None:
    edit_manifest(d, lambda m: m.update(max_sequence_length=100_000))


def max_length_beyond_the_model(d: Path) -> None:
    """256 tokens for a model with 128 positions: valid by the schema, refused by the smoke prediction."""
    edit_manifest(d, lambda m: m.update(max_sequence_length=256))


def missing_file(d: Path) -> None:
    (d / "model.int8.onnx").unlink()


def manifest_a_fifo(d: Path) -> None:
    (d / MANIFEST).unlink()
    os.mkfifo(d / MANIFEST)


def manifest_huge(d: Path) -> None:
    """1.5 GB, sparse: read whole, it took 3 GB and held the event loop 5 s."""
    with (d / MANIFEST).open("r+b") as handle:
        handle.truncate(1536 << 20)


def tokenizer_a_fifo(d: Path) -> None:
    """It exists, so "missing" would mislead; reading it would block."""
    (d / TOKENIZER).unlink()
    os.mkfifo(d / TOKENIZER)


def flip_a_byte(path: Path) -> None:
    """Damage ``path`` in place: its middle byte inverted, so its sha256 no longer matches the manifest's."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def wrong_sha256(d: Path) -> None:
    flip_a_byte(d / "model.int8.onnx")


def wrong_bytes(d: Path) -> None:
    """The size off by one, the sha256 right: it was called a file changed after the artifact was loaded."""
    edit_manifest(d, lambda m: m["files"]["model.int8.onnx"].update(bytes=m["files"]["model.int8.onnx"]["bytes"] + 1))


def path_outside_the_artifact(d: Path) -> None:
    edit_manifest(d, lambda m: m["files"].update({"../outside.bin": {"sha256": "0" * 64}}))


# Every way an artifact can be broken, by name: what the reload matrix swaps in.
BREAKERS: dict[str, Callable[[Path], None]] = {f.__name__: f for f in (
    missing_manifest, manifest_not_json, manifest_not_utf8, manifest_not_object, missing_keys, labels_not_list,
    label_with_a_line_break, too_many_labels,
    file_entry_without_sha256, variants_a_list, variants_empty, unknown_variant, variant_file_unlisted,
    max_length_not_a_number, max_length_zero, max_length_two, max_length_huge, max_length_beyond_the_model,
    missing_file, wrong_sha256, wrong_bytes, path_outside_the_artifact, manifest_a_fifo, manifest_huge,
    tokenizer_a_fifo, invalid_tokenizer, tokenizer_empty_object, tokenizer_beyond_the_embeddings,
    tokenizer_word_beyond_the_embeddings, garbage_onnx, rehashed_nan_weights, wrong_outputs,
)}


def broken_copy(source: Path, tmp_path: Path, breaker: str) -> Path:
    directory = copy_artifact(source, tmp_path / breaker)
    BREAKERS[breaker](directory)
    return directory
