"""Bundle integrity: every file checked against guard_config.json before any graph runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from vlmguard.cli import main
from vlmguard.errors import BundleError
from vlmguard.integrity import external_data_locations, verify_bundle
from vlmguard.manifest import MANIFEST_NAME, read_manifest, write_manifest
from vlmguard.runtime import engine
from vlmguard.runtime.detector import default_detector_dir
from vlmguard.runtime.guarded_vlm import GuardedVLM

DECODER = "onnx/decoder_model_merged.onnx"
EMBED = "onnx/embed_tokens.onnx"
DETECTOR_INT8 = "onnx/safety_detector_int8.onnx"


@pytest.fixture(scope="module")
def pristine(tiny_setup) -> Path:
    """The shared guarded clip-llama bundle: read only, copy it before tampering."""
    return tiny_setup("clip", "llama").bundles["guarded"]


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    """A private copy of the guarded bundle to tamper with."""
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def with_detector(pristine, tmp_path_factory) -> Path:
    """The guarded bundle plus the packaged default detector's graphs, rehashed (no export)."""
    out = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("det") / "bundle"))
    packaged = default_detector_dir()
    config = json.loads((packaged / "detector_config.json").read_text())
    config["files"] = {k: v for k, v in config["files"].items() if k in ("fp32", "int8")}
    for name in config["files"].values():
        shutil.copy(packaged / name, out / name)
    manifest = read_manifest(out)
    kept = {k: v for k, v in manifest.items() if k not in ("format_version", "files")}
    write_manifest(out, {**kept, "detector": config})
    return out


@pytest.fixture
def no_sessions(monkeypatch) -> list[str]:
    """Record (and forbid) ORT session creation: integrity must fail before any graph opens."""
    opened: list[str] = []

    def refuse(path, *args, **kwargs):
        opened.append(str(path))
        raise AssertionError(f"a session was opened on {path} before the integrity check")

    monkeypatch.setattr(engine, "create_session", refuse)
    monkeypatch.setattr("vlmguard.runtime.detector.create_session", refuse)
    return opened


def flip_byte(path: Path, where: float = 0.5) -> None:
    """Invert one byte in place (same size)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def rehash(bundle: Path) -> None:
    """Rewrite guard_config.json's inventory as an attacker who can edit it would."""
    manifest = read_manifest(bundle)
    write_manifest(
        bundle, {k: v for k, v in manifest.items() if k not in ("format_version", "files")}
    )


def external_data(bundle: Path, graph: str) -> str:
    """The single external-data file a graph reads (as the onnx package sees it)."""
    model = onnx.load(str(bundle / graph), load_external_data=False)
    (location,) = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return location


def relocate(bundle: Path, graph: str, location: str) -> None:
    """Point every external-data entry of a graph at `location`, then rehash the manifest."""
    path = bundle / graph
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())
    rehash(bundle)


# ------------------------------------------------------------------ the untouched bundle


@pytest.mark.parametrize("mode", ["sha256", "size"])
def test_an_untouched_bundle_verifies(pristine, mode):
    manifest = read_manifest(pristine)
    result = verify_bundle(pristine, mode)
    assert result.mode == mode
    assert result.files == len(manifest["files"])
    assert result.bytes == sum(record["size"] for record in manifest["files"].values())
    assert result.graphs == len(manifest["graphs"]) == 3


def test_an_unknown_mode_is_refused(pristine):
    with pytest.raises(ValueError, match="sha256, size"):
        verify_bundle(pristine, "md5")


def test_loading_checks_the_files_and_reports_it(pristine):
    vlm = GuardedVLM.load(pristine, providers="cpu", integrity="size")
    assert vlm.engine.integrity.mode == "size"
    assert vlm.engine.integrity.files == len(vlm.manifest.files)


# ------------------------------------------------------------------ changed bytes


@pytest.mark.parametrize(
    "name",
    [
        DECODER,
        "onnx/decoder_model_merged.onnx_data",
        EMBED,
        "tokenizer.json",
        "chat_template.jinja",
    ],
)
def test_a_flipped_byte_is_refused_at_load_naming_the_file(bundle, name, no_sessions):
    flip_byte(bundle / name)
    with pytest.raises(BundleError, match="does not match its SHA-256") as err:
        GuardedVLM.load(bundle, providers="cpu")
    assert str(bundle / name) in str(err.value)
    assert "\n" not in str(err.value) and "re-export" in str(err.value)
    assert no_sessions == []


def test_a_flipped_byte_in_the_detector_is_refused(with_detector, tmp_path, no_sessions):
    bundle = Path(shutil.copytree(with_detector, tmp_path / "bundle"))
    flip_byte(bundle / DETECTOR_INT8, 0.9)
    with pytest.raises(BundleError, match="safety_detector_int8.onnx does not match"):
        GuardedVLM.load(bundle, providers="cpu")
    assert no_sessions == []


def test_the_detector_fixture_loads_its_detector(with_detector):
    vlm = GuardedVLM.load(with_detector, providers="cpu")
    assert vlm.detector is not None
    assert vlm.engine.integrity.graphs == 5  # three model graphs, two detector variants


def test_size_mode_misses_a_same_size_change_but_catches_truncation(bundle):
    data = bundle / "onnx/decoder_model_merged.onnx_data"
    flip_byte(data)
    verify_bundle(bundle, "size")  # the documented tradeoff: sizes only
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        verify_bundle(bundle, "sha256")
    data.write_bytes(data.read_bytes()[:-1])
    with pytest.raises(BundleError, match="truncated or changed") as err:
        verify_bundle(bundle, "size")
    assert str(data) in str(err.value)


def test_a_missing_file_is_refused(bundle, no_sessions):
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer.json is missing"):
        GuardedVLM.load(bundle, providers="cpu", integrity="size")
    assert no_sessions == []


@pytest.mark.parametrize("extra", ["onnx/extra.onnx", "onnx/extra.onnx_data", "policy.json"])
def test_an_unlisted_file_is_refused(bundle, extra):
    shutil.copy(bundle / EMBED, bundle / extra)
    with pytest.raises(BundleError, match="is not listed in guard_config.json") as err:
        verify_bundle(bundle, "size")
    assert str(bundle / extra) in str(err.value)


def test_an_unlisted_file_with_a_newline_in_its_name_is_refused_in_one_line(bundle):
    (bundle / "onnx" / "evil\nname.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match="evil\\\\nname.onnx' is not listed") as err:
        verify_bundle(bundle, "size")
    assert "\n" not in str(err.value)


def test_a_calibrated_policy_listed_in_the_inventory_is_accepted(bundle):
    (bundle / "policy.json").write_text(json.dumps({"policy": {}}))
    rehash(bundle)  # what calibration's apply_to_bundle does after writing policy.json
    assert verify_bundle(bundle).files == len(read_manifest(bundle)["files"])


def test_a_graph_the_inventory_does_not_list_is_refused(bundle):
    manifest = read_manifest(bundle)
    del manifest["files"][EMBED]
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="names the graph onnx/embed_tokens.onnx"):
        verify_bundle(bundle, "size")


# ------------------------------------------------------------------ external data and links


def test_external_data_at_an_absolute_path_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.onnx_data"
    shutil.copy(bundle / "onnx" / external_data(bundle, EMBED), outside)
    relocate(bundle, EMBED, str(outside))
    for mode in ("sha256", "size"):
        with pytest.raises(BundleError, match="absolute paths and '..' are refused") as err:
            verify_bundle(bundle, mode)
        assert str(bundle / EMBED) in str(err.value) and str(outside) in str(err.value)


def test_external_data_up_the_tree_is_refused(bundle):
    shutil.copy(bundle / "onnx" / external_data(bundle, EMBED), bundle / "up.onnx_data")
    relocate(bundle, EMBED, "../up.onnx_data")  # still inside the bundle, but '..' is refused
    with pytest.raises(BundleError, match=r"reads external data from '\.\./up\.onnx_data'"):
        verify_bundle(bundle)


def test_external_data_through_a_link_out_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.onnx_data"
    shutil.copy(bundle / "onnx" / external_data(bundle, EMBED), outside)
    (bundle / "onnx/linked.onnx_data").symlink_to(outside)
    relocate(bundle, EMBED, "linked.onnx_data")
    assert "onnx/linked.onnx_data" in read_manifest(bundle)["files"]  # hashed through the link
    with pytest.raises(BundleError, match="link leading outside the bundle"):
        verify_bundle(bundle)


def test_external_data_in_an_unlisted_file_is_refused(bundle):
    relocate(bundle, EMBED, "elsewhere.onnx_data")  # inside the bundle, but no such listed file
    with pytest.raises(BundleError, match="which guard_config.json does not list"):
        verify_bundle(bundle, "size")


def test_a_file_linked_out_of_the_bundle_is_refused_even_with_the_right_bytes(bundle, tmp_path):
    outside = tmp_path / "tokenizer.json"
    shutil.move(bundle / "tokenizer.json", outside)
    (bundle / "tokenizer.json").symlink_to(outside)  # same content: the hash would match
    with pytest.raises(BundleError, match="tokenizer.json is a link leading outside the bundle"):
        verify_bundle(bundle)


def test_a_folder_linked_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = Path(shutil.move(bundle / "onnx", tmp_path / "onnx"))
    os.symlink(outside, bundle / "onnx", target_is_directory=True)
    with pytest.raises(BundleError, match="link leading outside the bundle"):
        verify_bundle(bundle, "size")


def test_a_link_inside_the_bundle_is_followed(bundle):
    shutil.move(bundle / "tokenizer.json", bundle / "onnx/tokenizer.json")
    (bundle / "tokenizer.json").symlink_to("onnx/tokenizer.json")
    with pytest.raises(BundleError, match="onnx/tokenizer.json is not listed"):
        verify_bundle(bundle)  # the real file is where the inventory does not expect it
    rehash(bundle)
    assert verify_bundle(bundle).files == len(read_manifest(bundle)["files"])


# ------------------------------------------------------------------ the verify command


def test_verify_command_ok_and_tampered(bundle):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(bundle)])
    assert ok.exit_code == 0, ok.output
    files = len(read_manifest(bundle)["files"])
    assert ok.output.startswith(f"OK {bundle}: {files} files")
    assert "sha256" in ok.output and "guard_config.json sha256 " in ok.output
    flip_byte(bundle / "onnx/decoder_model_merged.onnx_data")
    assert runner.invoke(main, ["verify", str(bundle), "--integrity", "size"]).exit_code == 0
    bad = runner.invoke(main, ["verify", str(bundle)])
    assert bad.exit_code == 1
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "decoder_model_merged.onnx_data does not match its SHA-256" in lines[0]


def test_verify_and_run_document_the_modes():
    runner = CliRunner()
    for command in ("verify", "run"):
        text = runner.invoke(main, [command, "--help"]).output
        assert "--integrity [sha256|size]" in text


def test_verify_command_on_a_folder_that_is_no_bundle(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "has no guard_config.json" in result.output


# ------------------------------------------------------------------ the ONNX reader


def _tensor(name: str, location: str) -> TensorProto:
    """A float tensor whose data is said to live in an external file."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def test_the_reader_finds_external_data_wherever_onnx_allows_it():
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w_sub"], ["y"])],
        "then",
        [],
        [out],
        [_tensor("w_sub", "sub")],
    )
    constant = helper.make_node("Constant", [], ["c"], value=_tensor("c", "attr"))
    conditional = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    sparse = helper.make_sparse_tensor(
        _tensor("s", "sparse"), helper.make_tensor("i", TensorProto.INT64, [1], [0]), [4]
    )
    graph = helper.make_graph(
        [constant, conditional],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [out],
        [_tensor("w", "init")],
        sparse_initializer=[sparse],
    )
    function = helper.make_function(
        "local",
        "f",
        ["x"],
        ["z"],
        [helper.make_node("Constant", [], ["z"], value=_tensor("k", "fn"))],
        [helper.make_opsetid("", 17)],
    )
    model = helper.make_model(graph, functions=[function])
    data = model.SerializeToString()
    assert external_data_locations(data) == {"sub", "attr", "sparse", "init", "fn"}


def test_the_reader_agrees_with_onnx_on_the_bundle_graphs(pristine):
    for name in read_manifest(pristine)["files"]:
        if name.endswith(".onnx"):
            model = onnx.load(str(pristine / name), load_external_data=False)
            expected = {
                e.value
                for t in model.graph.initializer
                for e in t.external_data
                if e.key == "location"
            }
            assert external_data_locations((pristine / name).read_bytes()) == expected
            assert expected, f"{name} was exported with external data"


def test_a_graph_that_is_not_onnx_is_refused(bundle):
    graph = bundle / EMBED
    graph.write_bytes(graph.read_bytes()[:-7])  # cut inside a field
    rehash(bundle)
    with pytest.raises(BundleError, match="embed_tokens.onnx is not a readable ONNX graph"):
        verify_bundle(bundle, "size")


@settings(deadline=None)  # examples: the profile in conftest.py
@given(st.binary(max_size=200))
def test_the_reader_raises_only_value_error_on_any_bytes(data):
    try:
        assert isinstance(external_data_locations(data), set)
    except ValueError:
        pass


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_reader_raises_only_value_error_on_a_damaged_graph(pristine, data):
    model = bytearray((pristine / EMBED).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(model) - 1))
        if data.draw(st.booleans()):
            model[where] = data.draw(st.integers(0, 255))
        else:
            del model[where:]
            break
    try:
        assert isinstance(external_data_locations(bytes(model)), set)
    except ValueError:
        pass


# ------------------------------------------------------------------ property: any guard_config

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
PATHS = st.sampled_from(
    [
        "",
        ".",
        "..",
        "/etc/passwd",
        "../x",
        "a//b",
        "onnx\\x",
        "C:x",
        "a\x00b",
        "a\nb",
        "\ud800",
        "tokenizer.json",
        DECODER,
        MANIFEST_NAME,
        "x" * 5000,
    ]
) | st.text(max_size=20)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


@pytest.fixture(scope="module")
def scratch(pristine, tmp_path_factory) -> Path:
    """A bundle copy whose guard_config.json the property tests overwrite."""
    return Path(shutil.copytree(pristine, tmp_path_factory.mktemp("prop") / "bundle"))


def _check(bundle: Path, text: str | bytes) -> None:
    """Write guard_config.json and verify: success or BundleError, nothing else."""
    path = bundle / MANIFEST_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    for mode in ("size", "sha256"):
        try:
            verify_bundle(bundle, mode)
        except BundleError as err:
            assert "\n" not in str(err)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON, st.binary(max_size=40)))
def test_any_guard_config_raises_only_bundle_error(scratch, value):
    _check(scratch, value if isinstance(value, bytes) else json.dumps(value))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_mutated_guard_config_raises_only_bundle_error(pristine, scratch, data):
    manifest = json.loads((pristine / MANIFEST_NAME).read_text())
    where = data.draw(st.sampled_from(_paths(manifest)[1:]))
    parent = manifest
    for key in where[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        parent[data.draw(PATHS)] = parent.pop(where[-1])  # rename a key (a file path, often)
    else:
        parent[where[-1]] = data.draw(JSON | PATHS)
    _check(scratch, json.dumps(manifest))


def test_the_integrity_check_is_lean():
    """The runtime's check imports neither torch, transformers nor the onnx package."""
    import subprocess
    import sys

    code = (
        "import sys, vlmguard.integrity\n"
        "heavy = {'torch', 'transformers', 'onnx', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
