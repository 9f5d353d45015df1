"""The configuration a rollout carries (``cloud_sync.rollout.configdoc``): refused at the
operator's desk when a device would refuse it, secrets found, substituted and sealed per device
(with a stand-in sealer here: the real one is tested in ``test_config_rollout_secrets.py``), and
the spec rules of a configuration rollout."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from agent.pipeline.config import PipelineConfig
from agent.protocol.state import config_hash
from cloud_sync.rollout import RolloutSpec
from cloud_sync.rollout.config_start import read_secrets
from cloud_sync.rollout.configdoc import (
    ConfigRefused,
    build,
    parse_pipelines,
    secret_names,
    substitute,
)

GOOD = """
[[pipelines]]
name = "front"
source = "rtsp://viewer:${secret:cam_pw}@10.0.0.5/stream1"
model = "det"

[pipelines.tracking]
high_score = 0.7
new_track_score = 0.75

[[pipelines]]
name = "back"
source = "rtsp://10.0.0.6/stream1"
model = "det"
"""
PLAIN = GOOD.replace("viewer:${secret:cam_pw}@", "")


def fake_seal(device_id: str, plaintext: str) -> str:
    """A stand-in for ``seal_for_device`` that hides nothing but shows what was sealed for whom
    (only for checking the bookkeeping here; never a real sealing)."""
    return f"sealed:v1:{device_id}-{len(plaintext)}"


def test_plain_configuration_is_one_document_for_every_device() -> None:
    cfg = build(PLAIN, {}, source="pipelines.toml")
    doc = json.loads(cfg.template)
    assert [p["name"] for p in doc["pipelines"]] == ["front", "back"]
    assert doc["pipelines"][0]["tracking"]["high_score"] == 0.7
    assert cfg.covers("any-device") and cfg.document_for("cam-01") == cfg.template
    target = cfg.target_for("cam-01")
    assert target.hash == config_hash(cfg.template) == cfg.hash
    for table in json.loads(target.document)["pipelines"]:  # what the device will validate
        PipelineConfig.model_validate(table)


def test_secret_strings_are_sealed_whole_per_device_and_the_value_is_kept_nowhere() -> None:
    cfg = build(GOOD, {"cam_pw": "hunter2"}, seal=fake_seal, device_ids=["cam-01", "cam-02"])
    assert cfg.secrets == ("cam_pw",) and sorted(cfg.sealed) == ["cam-01", "cam-02"]
    stored = cfg.model_dump_json()
    assert "hunter2" not in stored and "${secret:cam_pw}" in cfg.template
    whole = len("rtsp://viewer:hunter2@10.0.0.5/stream1")  # the whole string, substituted
    doc = json.loads(cfg.document_for("cam-01"))
    assert doc["pipelines"][0]["source"] == f"sealed:v1:cam-01-{whole}"
    assert doc["pipelines"][1]["source"] == "rtsp://10.0.0.6/stream1"
    assert cfg.hash_for("cam-01") != cfg.hash_for("cam-02")  # one document per device
    assert not cfg.covers("cam-03")  # not sealed for: the rollout cannot send it
    with pytest.raises(KeyError):
        cfg.document_for("cam-03")


def test_a_device_that_cannot_be_sealed_for_is_left_out_and_named() -> None:
    def seal(device_id: str, plaintext: str) -> str:
        if device_id == "cam-02":
            raise ValueError(f"no enrolled key for {device_id}")
        return fake_seal(device_id, plaintext)

    skipped: list[tuple[str, str]] = []
    cfg = build(GOOD, {"cam_pw": "hunter2"}, seal=seal, device_ids=["cam-01", "cam-02"],
                on_skip=lambda d, why: skipped.append((d, why)))  # fmt: skip
    assert list(cfg.sealed) == ["cam-01"]
    assert skipped == [("cam-02", "no enrolled key for cam-02")]


@pytest.mark.parametrize(
    ("text", "values", "expect"),
    [
        ("[[pipelines]\nname = ", {}, "not valid TOML"),
        ('data_dir = "/tmp"\n' + PLAIN, {}, "only [[pipelines]] tables"),
        ('title = "x"', {}, "only [[pipelines]] tables"),
        ("", {}, "no [[pipelines]] table"),
        (PLAIN.replace('model = "det"', 'model = "det"\nmax_fps = 0', 1), {}, "max_fps"),
        (PLAIN.replace("high_score = 0.7", "high_score = 1.7"), {}, "tracking.high_score"),
        (PLAIN.replace('"back"', '"front"'), {}, "pipeline names must be unique"),
        (PLAIN.replace("high_score = 0.7", "hihg_score = 0.7"), {}, "hihg_score"),
        (GOOD, {}, "no value for secret(s) ['cam_pw']"),
        (GOOD, {"cam_pw": "x", "other": "y"}, "secret(s) ['other'] given but not used"),
        (PLAIN.replace("[pipelines.tracking]", "when = 2026-01-01\n[pipelines.tracking]"), {},
         "field 'pipelines.0.when'"),
    ],
)  # fmt: skip
def test_refused_before_anything_is_published(
    text: str, values: dict[str, str], expect: str
) -> None:
    with pytest.raises(ConfigRefused) as e:
        build(text, values, source="p.toml", seal=fake_seal, device_ids=["cam-01"])
    assert expect in str(e.value)


def test_a_refusal_never_shows_a_secret_value() -> None:
    # a source that is not a string would be refused; make the secret part of the bad field
    text = GOOD.replace('name = "front"', 'name = "${secret:cam_pw}"')
    with pytest.raises(ConfigRefused) as e:
        build(text, {"cam_pw": "bad name!"}, seal=fake_seal, device_ids=["cam-01"])
    assert "field 'pipelines.0.name'" in str(e.value) and "bad name!" not in str(e.value)


def test_secret_values_come_from_files_or_the_environment_only(tmp_path: Any) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    assert read_secrets([f"cam_pw=@{f}", "tok=env:TOK"], {"TOK": "t0k"}) == {
        "cam_pw": "s3cret", "tok": "t0k"}  # fmt: skip
    with pytest.raises(ConfigRefused) as e:
        read_secrets(["cam_pw=hunter2"], {})
    assert "never on the command line" in str(e.value) and "hunter2" not in str(e.value)
    with pytest.raises(ConfigRefused, match="empty or not set"):
        read_secrets(["cam_pw=env:NOPE"], {})
    with pytest.raises(ConfigRefused, match="given twice"):
        read_secrets([f"a=@{f}", f"a=@{f}"], {})


def test_helpers() -> None:
    tree = parse_pipelines(GOOD)
    assert secret_names(tree) == ["cam_pw"]
    assert substitute("a${secret:x}b${secret:x}", {"x": "1"}) == "a1b1"


def test_a_rollout_is_a_model_or_a_configuration() -> None:
    cfg = build(PLAIN, {})
    spec = RolloutSpec(id="c1", config=cfg, target="*")
    assert spec.what == f"config {cfg.hash[:12]}"
    with pytest.raises(ValueError, match="configuration"):
        _ = spec.ref
    assert RolloutSpec.model_validate_json(spec.model_dump_json()) == spec  # stored and read
    bad: list[dict[str, Any]] = [
        {"model": "det", "version": "1.0.0", "config": cfg},  # both
        {},  # neither
        {"config": cfg, "pipeline": "front"},
        {"config": cfg, "on_fail": "rollback"},
    ]
    for kw in bad:
        with pytest.raises(ValidationError):
            RolloutSpec(id="c1", target="*", **kw)


def test_only_agents_of_contract_1_3_or_later_are_picked() -> None:
    from datetime import datetime, timezone

    from cloud_sync.rollout import DeviceView, FleetSnapshot, decide, start
    from cloud_sync.rollout.plan_config import speaks_config
    from cloud_sync.rollout.state import SetConfig

    cfg = build(PLAIN, {})
    spec = RolloutSpec(id="c1", config=cfg, target="*", soak_s=0)
    now = datetime(2026, 11, 23, tzinfo=timezone.utc)
    fleet = FleetSnapshot([DeviceView("old", contract="1.2"), DeviceView("new", contract="1.3"),
                           DeviceView("next", contract="2.0")])  # fmt: skip
    d = decide(spec, start(spec, now), fleet, now)
    sent = sorted(a.device_id for a in d.actions if isinstance(a, SetConfig))
    assert sent == ["new", "next"] and "old" not in d.new_state.devices
    assert all(a.hash == cfg.hash for a in d.actions if isinstance(a, SetConfig))
    assert [speaks_config(c) for c in ("1.0", "1.2", "1.3", "1.10", None, "x")] == [
        False, False, True, True, True, False]  # fmt: skip
