"""Device profiles: the shipped files, validation errors, and detection from real strings."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.common.errors import ConfigError
from agent.profile_detect import (
    detect_profile,
    detect_profile_name,
    parse_l4t_release,
    read_detection_files,
)
from agent.profiles import (
    DeviceProfile,
    Precision,
    builtin_profiles,
    get_profile,
    load_profile,
    override_profile,
    validate_profile,
)
from agent.protocol.card import Precision as CardPrecision
from device_profiles import PROFILE_DIR, profile_path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

EXPECTED = {
    "jetson-nano",
    "jetson-xavier-nx",
    "jetson-orin-nano",
    "jetson-orin-nx",
    "jetson-agx-orin",
    "x86-cpu",
    "x86-cuda",
}

R36 = (
    "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
    "DATE: Fri Jul 19 23:24:25 UTC 2024\n"
)
R32_NANO = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
    "DATE: Sat Feb 19 17:05:08 UTC 2022\n"
)
R32_XAVIER = (
    "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, "
    "DATE: Sat Feb 19 17:07:00 UTC 2022\n"
)
R35 = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
)


def _raw(name: str) -> dict[str, Any]:
    with open(profile_path(name), "rb") as f:
        return tomllib.load(f)


# --- the shipped profiles -----------------------------------------------------------------


def test_builtin_profiles_are_the_seven_device_classes() -> None:
    profiles = builtin_profiles()
    assert set(profiles) == EXPECTED
    assert {p.stem for p in PROFILE_DIR.glob("*.toml")} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_builtin_profile_validates_and_is_named_after_its_file(name: str) -> None:
    prof = load_profile(profile_path(name))
    assert prof.name == name
    assert get_profile(name) == prof
    assert "fp32" in prof.precisions


def test_precision_names_match_the_wire_contract() -> None:
    assert set(get_args(Precision)) == set(get_args(CardPrecision))


@pytest.mark.parametrize(
    ("name", "cc", "dla", "precisions", "backends"),
    [
        ("jetson-nano", "5.3", 0, ("fp32", "fp16"), ("tensorrt", "onnxruntime")),
        ("jetson-xavier-nx", "7.2", 2, ("fp32", "fp16", "int8"), ("tensorrt", "onnxruntime")),
        ("jetson-orin-nano", "8.7", 0, ("fp32", "fp16", "int8"), ("tensorrt", "onnxruntime")),
        ("jetson-orin-nx", "8.7", 1, ("fp32", "fp16", "int8"), ("tensorrt", "onnxruntime")),
        ("jetson-agx-orin", "8.7", 2, ("fp32", "fp16", "int8"), ("tensorrt", "onnxruntime")),
        ("x86-cpu", None, 0, ("fp32", "int8"), ("onnxruntime",)),
        ("x86-cuda", "8.6", 0, ("fp32", "fp16", "int8"), ("tensorrt", "onnxruntime")),
    ],
)
def test_hardware_facts(
    name: str, cc: str | None, dla: int, precisions: tuple[str, ...], backends: tuple[str, ...]
) -> None:
    prof = builtin_profiles()[name]
    assert prof.compute_capability == cc
    assert prof.dla_cores == dla
    assert prof.precisions == precisions
    assert prof.backends == backends
    assert (prof.tensorrt is not None) == ("tensorrt" in backends)


def test_nano_has_no_int8_and_refuses_it_as_an_override() -> None:
    nano = get_profile("jetson-nano")
    assert "int8" not in nano.precisions
    with pytest.raises(ConfigError) as exc:
        override_profile(nano, {"precisions": ["fp32", "fp16", "int8"]})
    assert exc.value.field == "precisions"
    assert "6.1" in str(exc.value) and "5.3" in str(exc.value)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("jetson-")))
def test_jetson_camera_pipeline_is_a_csi_appsink_pipeline(name: str) -> None:
    cam = builtin_profiles()[name].camera
    pipe = cam.gstreamer_pipeline(sensor_id=1)
    assert pipe is not None
    assert pipe.startswith("nvarguscamerasrc sensor-id=1 ")
    assert f"width={cam.width},height={cam.height},framerate={cam.fps}/1" in pipe
    assert "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR" in pipe
    assert pipe.endswith("appsink drop=true max-buffers=1")
    assert "{" not in pipe


@pytest.mark.parametrize("name", ["x86-cpu", "x86-cuda"])
def test_x86_profiles_have_no_csi_pipeline(name: str) -> None:
    assert builtin_profiles()[name].camera.gstreamer_pipeline() is None


# --- validation errors name the file and the field -----------------------------------------


def _write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_precision_in_file_names_file_and_field(tmp_path: Path) -> None:
    text = profile_path("jetson-nano").read_text(encoding="utf-8")
    assert 'precisions = ["fp32", "fp16"]' in text
    path = _write(tmp_path, text.replace('["fp32", "fp16"]', '["fp32", "fp64"]'))
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: field 'precisions.1': ")
    assert "Input should be 'fp32', 'fp16' or 'int8'" in msg
    assert exc.value.path == str(path)
    assert exc.value.field == "precisions.1"


def test_bad_toml_syntax_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "x"\nmemory_mb 4096\n')
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    assert str(exc.value).startswith(f"{path}: invalid TOML: ")
    assert "line 2" in str(exc.value)
    assert exc.value.path == str(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as exc:
        get_profile(path)
    assert str(path) in str(exc.value)


def test_unknown_builtin_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        get_profile("jetson-tx2")
    assert "'jetson-tx2'" in str(exc.value)
    assert "jetson-nano" in str(exc.value)


def test_get_profile_accepts_a_path_string(tmp_path: Path) -> None:
    text = profile_path("x86-cpu").read_text(encoding="utf-8")
    path = _write(tmp_path, text.replace("memory_mb = 4096", "memory_mb = 2048"))
    prof = get_profile(str(path))
    assert prof.memory_mb == 2048
    assert prof.name == "x86-cpu"


def _mutate(base: str, path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(_raw(base))
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("base", "path", "value", "field", "says"),
    [
        ("jetson-nano", ("precisions",), [], "precisions", "at least 1"),
        ("jetson-nano", ("precisions",), ["fp32", "fp32"], "precisions", "unique"),
        ("jetson-nano", ("backends",), ["tensorrt", "openvino"], "backends.1", "'tensorrt'"),
        ("jetson-nano", ("backends",), [], "backends", "at least 1"),
        ("jetson-nano", ("memory_mb",), 0, "memory_mb", "greater than or equal to 256"),
        ("jetson-nano", ("dla_cores",), -1, "dla_cores", "greater than or equal to 0"),
        ("jetson-nano", ("compute_capability",), "sm_53", "compute_capability", "pattern"),
        ("jetson-nano", ("colour",), "red", "colour", "Extra inputs are not permitted"),
        ("jetson-nano", ("camera", "fps"), 0, "camera.fps", "greater than or equal to 1"),
        ("jetson-nano", ("camera", "gstreamer"), "v4l2src ! {codec}", "camera.gstreamer", "codec"),
        (
            "jetson-nano",
            ("camera", "gstreamer"),
            "v4l2src ! fakesink",
            "camera.gstreamer",
            "appsink",
        ),
        ("jetson-nano", ("tensorrt", "workspace_mb"), 8192, "tensorrt.workspace_mb", "memory_mb"),
        ("jetson-nano", ("tensorrt",), _DELETE, "tensorrt", "missing"),
        ("jetson-xavier-nx", ("backends",), ["onnxruntime"], "dla_cores", "need 'tensorrt'"),
        ("x86-cpu", ("precisions",), ["fp32", "fp16"], "compute_capability", "fp16"),
        ("x86-cpu", ("backends",), ["tensorrt"], "compute_capability", "tensorrt"),
        ("x86-cpu", ("dla_cores",), 1, "compute_capability", "dla_cores=1"),
        ("x86-cpu", ("tensorrt",), {"workspace_mb": 64}, "tensorrt", "present"),
    ],
)
def test_validation_errors_name_the_field(
    base: str, path: tuple[str, ...], value: Any, field: str, says: str
) -> None:
    data = _mutate(base, path, value)
    with pytest.raises(ConfigError) as exc:
        validate_profile(data, source="device_profiles/x.toml")
    msg = str(exc.value)
    assert msg.startswith(f"device_profiles/x.toml: field '{field}': "), msg
    assert says in msg
    assert exc.value.field == field
    assert exc.value.path == "device_profiles/x.toml"


def test_override_merges_nested_tables_and_revalidates() -> None:
    nx = get_profile("jetson-orin-nx")
    big = override_profile(nx, {"dla_cores": 2, "memory_mb": 16384, "camera": {"fps": 60}})
    assert (big.dla_cores, big.memory_mb, big.camera.fps) == (2, 16384, 60)
    assert big.camera.width == nx.camera.width
    assert big.camera.gstreamer == nx.camera.gstreamer
    cuda = override_profile(get_profile("x86-cuda"), {"compute_capability": "8.9"})
    assert cuda.compute_capability == "8.9"
    assert cuda.cc_tuple == (8, 9)


def test_profiles_are_immutable() -> None:
    prof = get_profile("x86-cpu")
    with pytest.raises(ValueError):
        prof.memory_mb = 1
    assert isinstance(prof, DeviceProfile)


# --- detection ------------------------------------------------------------------------------

REAL_MODELS = [
    ("NVIDIA Jetson Nano Developer Kit", "jetson-nano"),
    ("NVIDIA Jetson Xavier NX Developer Kit", "jetson-xavier-nx"),
    ("NVIDIA Jetson AGX Orin Developer Kit", "jetson-agx-orin"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "jetson-orin-nx"),
    ("NVIDIA Orin Nano Developer Kit", "jetson-orin-nano"),
    ("Jetson-AGX", "jetson-xavier-nx"),
    ("Raspberry Pi 4 Model B Rev 1.4", "x86-cpu"),
]


@pytest.mark.parametrize(("model", "expected"), REAL_MODELS)
@pytest.mark.parametrize("suffix", ["", "\x00", "\n"])
def test_detect_from_device_tree_model(model: str, expected: str, suffix: str) -> None:
    assert detect_profile_name(model + suffix, None) == expected


@pytest.mark.parametrize(("model", "expected"), REAL_MODELS)
def test_device_tree_model_beats_release_file(model: str, expected: str) -> None:
    # A Pi has no nv_tegra_release; the Jetson ones decide by model even with a release file.
    release = None if expected == "x86-cpu" else R32_NANO
    assert detect_profile_name(model, release, has_cuda=True) == (
        "x86-cuda" if expected == "x86-cpu" else expected
    )


@pytest.mark.parametrize(
    ("model", "release", "has_cuda", "expected"),
    [
        (None, R32_NANO, False, "jetson-nano"),
        (None, R32_XAVIER, False, "jetson-xavier-nx"),
        (None, R35, False, "jetson-orin-nano"),
        (None, R36, True, "jetson-orin-nano"),
        ("\x00", R36, False, "jetson-orin-nano"),
        ("NVIDIA Jetson TX9 Prototype", R36, False, "jetson-orin-nano"),
        (None, None, False, "x86-cpu"),
        (None, None, True, "x86-cuda"),
        ("Raspberry Pi 4 Model B Rev 1.4", None, False, "x86-cpu"),
        (None, "not a release file", True, "x86-cuda"),
        (None, "# R28 (release), REVISION: 2.1, BOARD: quill", False, "x86-cpu"),
    ],
)
def test_detect_fallbacks(
    model: str | None, release: str | None, has_cuda: bool, expected: str
) -> None:
    assert detect_profile_name(model, release, has_cuda=has_cuda) == expected


@pytest.mark.parametrize(
    ("owner", "substring", "expected"),
    [
        # The longer substring wins, whichever profile sorts first.
        ("jetson-agx-orin", "Orin Nano Devel", "jetson-agx-orin"),
        ("x86-cuda", "Orin Nano Devel", "x86-cuda"),
        ("jetson-agx-orin", "Orin", "jetson-orin-nano"),
        ("x86-cuda", "Orin", "jetson-orin-nano"),
    ],
)
def test_detect_longest_substring_of_the_given_table_wins(
    owner: str, substring: str, expected: str
) -> None:
    table = builtin_profiles()
    table[owner] = override_profile(table[owner], {"match": {"dt_model": [substring]}})
    model = "NVIDIA Orin Nano Developer Kit"
    assert detect_profile_name(model, None, profiles=table) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (R36, (36, 3, 0)),
        (R32_NANO, (32, 7, 1)),
        (R35, (35, 4, 1)),
        ("# R32 (release), REVISION: 5, GCID: 1, BOARD: t210ref", (32, 5, 0)),
        ("", None),
        ("R36 REVISION 3.0", None),
        ("Raspberry Pi 4 Model B Rev 1.4", None),
    ],
)
def test_parse_l4t_release(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_l4t_release(text) == expected


@given(st.text())
def test_parse_l4t_release_never_raises(text: str) -> None:
    result = parse_l4t_release(text)
    assert result is None or (len(result) == 3 and all(v >= 0 for v in result))


@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()), st.booleans())
def test_detect_always_returns_a_builtin_name(
    model: str | None, release: str | None, has_cuda: bool
) -> None:
    assert detect_profile_name(model, release, has_cuda=has_cuda) in EXPECTED


def _fake_root(tmp_path: Path, model: bytes | None, release: str | None) -> Path:
    if model is not None:
        (tmp_path / "proc/device-tree").mkdir(parents=True)
        (tmp_path / "proc/device-tree/model").write_bytes(model)
    if release is not None:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc/nv_tegra_release").write_text(release, encoding="utf-8")
    return tmp_path


def test_read_detection_files_keeps_content_and_reports_missing(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, b"NVIDIA Jetson Nano Developer Kit\x00", None)
    assert read_detection_files(root) == ("NVIDIA Jetson Nano Developer Kit\x00", None)
    assert read_detection_files(tmp_path / "nowhere") == (None, None)


def test_detect_profile_reports_what_decided(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, b"NVIDIA Jetson Orin Nano Developer Kit\x00", R36)
    name, prof, reason = detect_profile(root)
    assert name == "jetson-orin-nano"
    assert prof == get_profile("jetson-orin-nano")
    assert reason == (
        "detected from /proc/device-tree/model: 'NVIDIA Jetson Orin Nano Developer Kit'"
    )


def test_detect_profile_from_release_only_says_it_guessed(tmp_path: Path) -> None:
    name, _, reason = detect_profile(_fake_root(tmp_path, None, R32_NANO))
    assert name == "jetson-nano"
    assert reason.startswith("guessed from /etc/nv_tegra_release (L4T R32.7.1, board 't210ref'")
    assert "override" in reason


def test_detect_profile_finds_the_nvidia_driver(tmp_path: Path) -> None:
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text("NVRM version: 550.54", encoding="utf-8")
    name, prof, reason = detect_profile(tmp_path)
    assert (name, prof.name) == ("x86-cuda", "x86-cuda")
    assert "driver is present" in reason
    assert detect_profile(tmp_path, has_cuda=False)[0] == "x86-cpu"
