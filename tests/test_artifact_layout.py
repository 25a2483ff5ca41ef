"""Variants stored as graph + external-data files (models.layout): same outputs, every file under the limit,
every data file verified at start-up like the .onnx, and the build writing large variants that way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.build import build
from models.layout import MAX_FILE_BYTES, check_external_data, external_data_files, pack, store, store_artifact
from models.manifest import main as manifest_main
from scripts.benchlib.serverproc import start_server, stop_server, wait_exit
from server import artifact
from server.artifact import (
    MANIFEST,
    TOKENIZER,
    ArtifactError,
    external_data_locations,
    external_data_locations_in,
    load_artifact,
    sha256_file,
)
from server.config import DEFAULT_MODEL_PATH, load_settings
from server.engine import ModelFileError, OnnxEngine
from server.exitcodes import ExitCode
from server.runtime import load_encoder
from server.tokenizer import TextEncoder, pad_batch
from tests.broken_artifacts import flip_a_byte
from tests.model_fixtures import TINY_MAX_LENGTH, save_tiny_checkpoint
from tests.own_model_fixtures import one_torch_thread

REPOSITORY_FILE_LIMIT = 40 * 10**6
# Limits between the tiny model's word-embedding table and all of its weights (int8: 0.977 and 0.998 MB; fp16:
# 1.953 and 1.996 MB), so the variant needs two data files, each within the limit.
SPLIT_LIMIT = 990_000
BUILD_LIMIT = 1_980_000
TEXTS = ["a gorgeous , witty , seductive movie .", "an absolute waste of two hours .", "fine",
         "the plot is nothing but boilerplate clichés " * 20]
_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def logits(artifact_dir: Path, variant: str) -> np.ndarray:
    artifact = load_artifact(artifact_dir)
    engine = OnnxEngine(artifact, variant, "cpu", load_settings(intra_op_threads=1))
    return engine.run(*pad_batch(TextEncoder(artifact.tokenizer_path, artifact.max_length).encode(TEXTS)))


@pytest.fixture(scope="module")
def split_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """The tiny artifact (fp32 and int8 in one file each) re-stored by ``python -m models.layout``."""
    directory = Path(shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("layout") / "split"))
    store_artifact(directory, SPLIT_LIMIT)
    return directory


@pytest.fixture
def split_copy(split_artifact, tmp_path) -> Path:
    return Path(shutil.copytree(split_artifact, tmp_path / "model"))


def data_files(directory: Path, variant: str) -> list[str]:
    return json.loads((directory / MANIFEST).read_text())["variants"][variant].get("external_data", [])


# ------------------------------------------------------------------ packing

def test_pack_makes_as_few_groups_as_the_limit_allows_of_about_equal_size() -> None:
    assert pack([23, 4, 4, 4, 4, 4, 4], 30) == [[0], [1, 2, 3, 4, 5, 6]]  # 23 + 24, not 27 + 20
    assert pack([5] * 6, 10) == [[0, 1], [2, 3], [4, 5]]
    assert pack([5] * 6, 16) == [[0, 1, 2], [3, 4, 5]]
    assert pack([], 10) == []


def test_pack_gives_a_tensor_over_the_limit_a_group_of_its_own() -> None:
    assert pack([2, 50, 3, 3], 10) == [[0], [1], [2, 3]]


# ------------------------------------------------------------------ the shipped default artifact

def test_default_artifact_has_no_file_over_the_repository_limit_and_fp16_is_split_as_recorded() -> None:
    artifact = load_artifact(DEFAULT_MODEL_PATH, verify=False)
    sizes = {path.name: path.stat().st_size for path in Path(DEFAULT_MODEL_PATH).iterdir()}
    assert max(sizes.values()) <= MAX_FILE_BYTES < REPOSITORY_FILE_LIMIT, sizes
    fp16 = artifact.variant_files("fp16")
    assert len(fp16) >= 3 and fp16[1:] == external_data_files(artifact.variant_path("fp16"))
    assert sum(sizes[name] for name in fp16) > REPOSITORY_FILE_LIMIT  # why it is split at all
    assert artifact.variant_files("int8") == ["model.int8.onnx"]
    check_external_data(artifact)


# ------------------------------------------------------------------ re-storing an artifact (models.layout)

def test_restored_artifact_keeps_its_version_and_outputs_and_lists_every_file(tiny_artifact, split_artifact):
    before, after = load_artifact(tiny_artifact), load_artifact(split_artifact)  # verifies every sha256
    assert after.version == before.version
    int8 = data_files(split_artifact, "int8")
    assert int8 == ["model.int8.onnx.data-0", "model.int8.onnx.data-1"]
    assert int8 == external_data_files(split_artifact / "model.int8.onnx")
    assert all((split_artifact / name).stat().st_size <= SPLIT_LIMIT for name in ["model.int8.onnx", *int8])
    on_disk = {p.name for p in split_artifact.iterdir()} - {MANIFEST}
    assert set(after.manifest["files"]) == on_disk
    for name, info in after.manifest["files"].items():
        assert info == {"sha256": sha256_file(split_artifact / name), "bytes": (split_artifact / name).stat().st_size}
    for variant in ("fp32", "int8"):
        assert np.array_equal(logits(split_artifact, variant), logits(tiny_artifact, variant)), variant


def test_restoring_with_a_larger_limit_joins_the_files_again(split_copy, tiny_artifact):
    layout = store_artifact(split_copy, MAX_FILE_BYTES)
    assert layout == {"fp32": [], "int8": []}
    assert sorted(p.name for p in split_copy.iterdir()) == sorted(p.name for p in tiny_artifact.iterdir())
    assert "external_data" not in load_artifact(split_copy).manifest["variants"]["int8"]
    assert np.array_equal(logits(split_copy, "int8"), logits(tiny_artifact, "int8"))


def test_data_files_are_as_readable_as_the_graph(split_artifact):
    """onnx creates data files 0600: a server running as another user (the images' app user) could not read them."""
    mode = (split_artifact / "model.int8.onnx").stat().st_mode & 0o777
    assert {(split_artifact / n).stat().st_mode & 0o777 for n in data_files(split_artifact, "int8")} == {mode}


def test_the_variant_sha256_changes_with_its_weights_not_only_its_graph(split_artifact):
    artifact = load_artifact(split_artifact)
    files = artifact.manifest["files"]
    assert artifact.variant_sha256("int8") not in {files[name]["sha256"] for name in artifact.variant_files("int8")}
    edited = json.loads(json.dumps(artifact.manifest))
    edited["files"]["model.int8.onnx.data-1"]["sha256"] = "0" * 64
    assert type(artifact)(artifact.directory, edited).variant_sha256("int8") != artifact.variant_sha256("int8")


# ------------------------------------------------------------------ refusing a broken split artifact

def test_manifest_without_a_data_files_hash_is_refused(split_copy):
    manifest = json.loads((split_copy / MANIFEST).read_text())
    del manifest["files"]["model.int8.onnx.data-1"]
    (split_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"no sha256 for model\.int8\.onnx\.data-1"):
        load_artifact(split_copy)


def test_external_data_not_a_list_of_names_is_refused(split_copy):
    manifest = json.loads((split_copy / MANIFEST).read_text())
    manifest["variants"]["int8"]["external_data"] = "model.int8.onnx.data-0"
    (split_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"model manifest invalid: .*variants\.int8\.external_data"):
        load_artifact(split_copy)


def test_a_data_file_the_graph_reads_but_the_manifest_omits_is_refused_by_the_server_and_the_manifest_check(
        split_copy, tmp_path):
    """The server used to load it unchecked: a change to it went unnoticed, where one to a listed file stops
    start-up."""
    manifest = json.loads((split_copy / MANIFEST).read_text())
    manifest["variants"]["int8"]["external_data"] = ["model.int8.onnx.data-0"]  # data-1 would go unverified
    del manifest["files"]["model.int8.onnx.data-1"]
    (split_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"model\.int8\.onnx loads weights from 'model\.int8\.onnx\.data-1', "
                                            r"which manifest\.json does not list under variants\.int8\.external_data"):
        load_artifact(split_copy)
    with pytest.raises(SystemExit, match=r"data-1"):
        manifest_main([str(split_copy)])
    server = start_server({"MODEL_PATH": str(split_copy)}, tmp_path, wait_ready=False)
    assert wait_exit(server) == ExitCode.MODEL
    assert "loads weights from 'model.int8.onnx.data-1'" in server.log()


def test_the_data_files_a_graph_names_are_read_from_its_bytes(split_artifact):
    """What the server reads without the onnx package is what onnx itself says."""
    for variant in ("fp32", "int8"):
        graph = split_artifact / json.loads((split_artifact / MANIFEST).read_text())["variants"][variant]["file"]
        assert external_data_locations(graph) == set(external_data_files(graph))
    assert external_data_locations(Path(DEFAULT_MODEL_PATH) / "model.int8.onnx") == set()  # one file


def test_a_data_file_the_graph_spells_otherwise_than_the_manifest_loads(split_copy, tiny_artifact):
    """ONNX Runtime looks an external-data location up as the graph spells it (``sub/./model.int8.onnx.data-0``),
    and the manifest may list the same file as ``sub/model.int8.onnx.data-0``: the server refused such a model
    as unloadable ("not found from the table user provided"), though the manifest check had accepted it."""
    graph_path = split_copy / "model.int8.onnx"
    names = data_files(split_copy, "int8")
    (split_copy / "sub").mkdir()
    for name in names:
        (split_copy / name).rename(split_copy / "sub" / name)
    graph = onnx.load(str(graph_path), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "sub/./" + entry.value
    onnx.save(graph, str(graph_path))
    manifest = json.loads((split_copy / MANIFEST).read_text())
    for name in names:
        manifest["files"][f"sub/{name}"] = manifest["files"].pop(name)
    manifest["variants"]["int8"]["external_data"] = [f"sub/{name}" for name in names]
    manifest["files"]["model.int8.onnx"] = {"sha256": sha256_file(graph_path), "bytes": graph_path.stat().st_size}
    (split_copy / MANIFEST).write_text(json.dumps(manifest))
    assert external_data_locations(graph_path) == {f"sub/./{name}" for name in names}
    assert external_data_locations_in(graph_path.read_bytes()) == external_data_locations(graph_path)
    assert np.array_equal(logits(split_copy, "int8"), logits(tiny_artifact, "int8"))


def test_the_data_files_scan_reads_the_graph_a_chunk_at_a_time(split_artifact, tmp_path, monkeypatch):
    """Every variant's graph is scanned at start-up, just before ONNX Runtime loads the model: reading a large fp32
    graph whole took its size again of a container's memory limit. An entry cut by a chunk's end is still found
    (chunks of a few bytes), and an empty file names nothing."""
    graph = Path(DEFAULT_MODEL_PATH) / "model.int8.onnx"
    tracemalloc.start()
    try:
        external_data_locations(graph)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * artifact.SCAN_CHUNK < graph.stat().st_size, f"the scan held {peak} bytes"
    split = split_artifact / json.loads((split_artifact / MANIFEST).read_text())["variants"]["int8"]["file"]
    expected = set(external_data_files(split))
    assert expected
    for chunk in (5, 16, 4099):
        monkeypatch.setattr(artifact, "SCAN_CHUNK", chunk)
        assert external_data_locations(split) == expected, chunk
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert external_data_locations(empty) == set()


def test_missing_data_file_stops_start_up_as_a_missing_model_file_does(split_copy, tmp_path):
    (split_copy / "model.int8.onnx.data-1").unlink()
    server = start_server({"MODEL_PATH": str(split_copy)}, tmp_path, wait_ready=False)
    assert wait_exit(server) == ExitCode.MODEL
    assert "model file missing" in server.log() and "model.int8.onnx.data-1" in server.log()


def test_corrupt_data_file_stops_start_up_as_a_corrupt_model_file_does(split_copy, tmp_path):
    flip_a_byte(split_copy / "model.int8.onnx.data-0")
    server = start_server({"MODEL_PATH": str(split_copy)}, tmp_path, wait_ready=False)
    assert wait_exit(server) == ExitCode.MODEL
    assert "model file corrupt" in server.log() and "model.int8.onnx.data-0" in server.log()


def test_server_serves_a_split_variant(split_artifact, tiny_artifact, tmp_path):
    server = start_server({"MODEL_PATH": str(split_artifact)}, tmp_path)
    try:
        health = httpx.get(server.url + "/health", timeout=30).json()
        answer = httpx.post(server.url + "/predict", json={"texts": TEXTS}, timeout=30)
    finally:
        stop_server(server)
    assert health["model"]["variant"] == "int8", health
    assert answer.status_code == 200, answer.text
    expected = load_artifact(tiny_artifact).labels
    assert [p["label"] for p in answer.json()["predictions"]] == [
        expected[i] for i in logits(tiny_artifact, "int8").argmax(axis=1)]


# ------------------------------------------------------------------ the build pipeline

@pytest.fixture(scope="module")
def built_split(tmp_path_factory) -> Path:
    """A tiny build whose fp16 (2.06 MB) passes the limit and whose int8 (1.08 MB) does not."""
    out = tmp_path_factory.mktemp("built") / "model"
    with tempfile.TemporaryDirectory() as tmp:
        build(save_tiny_checkpoint(Path(tmp)), out, ("int8", "fp16"), max_length=TINY_MAX_LENGTH, name="tiny-split",
              max_file_bytes=BUILD_LIMIT)
    return out


def test_build_stores_a_variant_over_the_limit_as_graph_and_data_files(built_split):
    artifact = load_artifact(built_split)
    fp16 = artifact.variant_files("fp16")
    assert fp16[1:] == ["model.fp16.onnx.data-0", "model.fp16.onnx.data-1"]
    assert fp16[1:] == external_data_files(built_split / "model.fp16.onnx")
    assert all((built_split / name).stat().st_size <= BUILD_LIMIT for name in fp16)
    assert artifact.variant_files("int8") == ["model.int8.onnx"]
    assert {p.name for p in built_split.iterdir()} == {MANIFEST, TOKENIZER, "model.int8.onnx", *fp16}
    assert artifact.manifest["variants"]["fp16"]["parity"]["max_abs_diff"] < 1e-2


def test_built_split_variant_equals_the_same_model_in_one_file(built_split, tmp_path):
    whole = Path(shutil.copytree(built_split, tmp_path / "whole"))
    store(whole / "model.fp16.onnx", MAX_FILE_BYTES)
    assert not external_data_files(whole / "model.fp16.onnx")
    split, joined = onnx.load(str(built_split / "model.fp16.onnx")), onnx.load(str(whole / "model.fp16.onnx"))
    assert [numpy_helper.to_array(t).tobytes() for t in split.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in joined.graph.initializer]
    store(whole / "model.fp16.onnx", BUILD_LIMIT)  # and back: the same bytes as the build wrote
    assert all(sha256_file(whole / n) == sha256_file(built_split / n)
               for n in ["model.fp16.onnx", *external_data_files(built_split / "model.fp16.onnx")])


# ------------------------------------------------------------------ what is served is what was verified

def int8_engine(artifact) -> OnnxEngine:
    return OnnxEngine(artifact, "int8", "cpu", load_settings(intra_op_threads=1))


def encoded(artifact) -> tuple[np.ndarray, np.ndarray]:
    return pad_batch(TextEncoder(artifact.tokenizer_path, artifact.max_length).encode(TEXTS))


def test_data_files_written_over_in_place_do_not_change_a_running_sessions_answers(split_copy):
    """ONNX Runtime mapped the data files it opened itself for the session's life: bytes copied over one in place
    changed the served answers under the same version (NaN here). The session holds its own copy now."""
    artifact = load_artifact(split_copy)
    engine = int8_engine(artifact)
    before = engine.run(*encoded(artifact))
    for name in data_files(split_copy, "int8"):
        path = split_copy / name
        path.write_bytes(b"\x7f" * path.stat().st_size)  # truncated to 0, then refilled: what `cp` does
    np.testing.assert_array_equal(engine.run(*encoded(artifact)), before)


def test_data_files_cut_short_under_a_running_session_do_not_kill_the_process(split_copy):
    """Cut short while mapped, the next run read past the file's end: SIGBUS, the server gone. (Its own process,
    so that a regression fails this test rather than ending the suite.)"""
    script = (
        "import sys; from pathlib import Path\n"
        "from server.artifact import load_artifact\n"
        "from tests.test_artifact_layout import data_files, encoded, int8_engine\n"
        "directory = Path(sys.argv[1]); artifact = load_artifact(directory); engine = int8_engine(artifact)\n"
        "before = engine.run(*encoded(artifact))\n"
        "for name in data_files(directory, 'int8'): (directory / name).open('r+b').truncate(0)\n"
        "assert (engine.run(*encoded(artifact)) == before).all()\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(split_copy)], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])


@pytest.mark.parametrize("changed", ["model.int8.onnx", "model.int8.onnx.data-1"])
def test_a_model_file_changed_after_verification_is_refused_not_served(split_copy, changed):
    """Each session is built from bytes read and checked again (the engine rebuilt after the memory plan, the
    CUDA fallback's CPU session built hours later): a file swapped in after start-up is never served."""
    artifact = load_artifact(split_copy)
    flip_a_byte(split_copy / changed)
    with pytest.raises(ArtifactError, match=f"model file corrupt: .*{changed} .*changed after the artifact was loaded"):
        int8_engine(artifact)


def test_a_tokenizer_changed_after_verification_is_refused_not_served(split_copy):
    artifact = load_artifact(split_copy)
    (split_copy / TOKENIZER).write_text((split_copy / TOKENIZER).read_text().replace('"[UNK]"', '"[UNK2]"'))
    with pytest.raises(ArtifactError, match=f"model file corrupt: .*{TOKENIZER} "):
        load_encoder(artifact, strict=False)


def test_a_session_does_not_keep_the_graphs_bytes(tiny_artifact):
    """ONNX Runtime's wrapper keeps a model given as bytes for good; the engine lets it go (the graph's size of
    memory per session, 1 GB for a large fp32 graph)."""
    artifact = load_artifact(tiny_artifact)
    graph_bytes = (tiny_artifact / artifact.variant_files("fp32")[0]).stat().st_size
    tracemalloc.start()
    try:
        engine = OnnxEngine(artifact, "fp32", "cpu", load_settings(intra_op_threads=1))
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= graph_bytes  # it was read into memory ...
    assert held < graph_bytes / 4  # ... and not kept there
    assert engine.run(*encoded(artifact)).shape == (len(TEXTS), len(artifact.labels))


def test_weights_the_manifest_does_not_list_are_not_read_from_the_working_directory(split_copy, tmp_path,
                                                                                     monkeypatch):
    """A graph given as bytes has no directory: ONNX Runtime resolved a location the manifest does not list (so
    nothing checked) against the process's working directory, /app in the images, and mapped what it found."""
    manifest = json.loads((split_copy / MANIFEST).read_text())
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    for name in manifest["variants"]["int8"].pop("external_data"):
        del manifest["files"][name]
        (split_copy / name).rename(elsewhere / name)
    (split_copy / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ModelFileError, match=r"model\.int8\.onnx\.data-\d"):
        int8_engine(load_artifact(split_copy))


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_model_file_swapped_for_a_device_or_fifo_is_refused_at_once(split_copy, special):
    """Read whole, /dev/zero took memory until none was left; a FIFO would wait for a writer for ever (holding the
    reload, or the CUDA fallback's lock)."""
    artifact = load_artifact(split_copy)
    target = split_copy / "model.int8.onnx.data-0"
    target.unlink()
    if special == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(special)
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(catch(lambda: artifact.read_variant("int8"))), daemon=True)
    reader.start()
    reader.join(30)
    assert outcome, "still reading"
    assert isinstance(outcome[0], ArtifactError) and "model.int8.onnx.data-0" in str(outcome[0])


def catch(call):
    try:
        return call()
    except Exception as error:
        return error


def test_an_artifact_loaded_through_a_symlink_keeps_reading_the_directory_it_named_then(split_copy, tiny_artifact,
                                                                                       tmp_path):
    """The runbook's symlink swap (``mv -T``) during a reload: files read after it came from the other artifact,
    and the reload failed as if the files had been corrupted."""
    link = tmp_path / "live"
    link.symlink_to(split_copy)
    artifact = load_artifact(link)
    swap = tmp_path / "live.new"
    swap.symlink_to(tiny_artifact)
    os.replace(swap, link)
    np.testing.assert_array_equal(int8_engine(artifact).run(*encoded(artifact)), logits(split_copy, "int8"))
