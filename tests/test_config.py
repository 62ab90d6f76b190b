"""AppArgs: one source of config, and a bad value fails at build_app with the field's path."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs
from serve_app.engine.config import EngineConfig


def _error(**args) -> dict:
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate({"checkpoint": "/models/chatglm2-6b", **args})
    return caught.value.errors()[0]


def test_enums_are_checked_with_the_fields_path():
    error = _error(pools=[{"model": "a", "precision": "fp16"}, {"model": "b", "precision": "int3"}])
    assert error["loc"] == ("pools", 1, "precision") and "int4" in error["msg"]
    assert _error(device="gpu")["loc"] == ("device",)
    assert _error(routing="fastest")["loc"] == ("routing",)
    assert _error(demo_preset="huge")["loc"] == ("demo_preset",)


def test_the_coalescing_window_is_bounded():
    assert AppArgs.model_validate({"checkpoint": "/m"}).stream_coalesce_ms == 50  # README: "default 50 ms"
    assert _error(stream_coalesce_ms=500)["loc"] == ("stream_coalesce_ms",)  # a 0.5 s stall per chunk: refused
    assert _error(stream_coalesce_ms=-1)["loc"] == ("stream_coalesce_ms",)


def test_a_misspelt_key_fails_instead_of_being_ignored():
    assert _error(max_histroy_rounds=3)["loc"] == ("max_histroy_rounds",)
    assert _error(engine={"max_batch": 8})["loc"] == ("engine", "max_batch")
    assert _error(pools=[{"model": "a", "precision": "fp16", "engine": {"kv_bytes": 1}}])["loc"][:3] == (
        "pools", 0, "engine")


def test_engine_bounds_live_in_the_engine_config_and_name_the_field():
    error = _error(engine={"max_batch_size": 0})
    assert error["loc"] == ("engine",) and "max_batch_size must be >= 1, not 0" in error["msg"]
    with pytest.raises(ValueError, match="max_waiting must be >= 0"):
        EngineConfig(max_waiting=-1)  # the engine checks the same bound where no pydantic is installed


def test_pool_settings_fall_back_to_the_apps_and_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = AppArgs.model_validate({
        "checkpoint": "ckpt", "demo_preset": "tiny", "engine": {"max_batch_size": 4},
        "pools": [{"model": "full", "precision": "auto"},
                  {"model": "q4", "precision": "int4", "checkpoint": "q4-ckpt", "engine": {"max_batch_size": 2}}]})
    full, q4 = args.pools
    assert args.checkpoint_of(full) == str(tmp_path / "ckpt") and args.checkpoint_of(q4) == str(tmp_path / "q4-ckpt")
    assert args.engine_of(full).max_batch_size == 4 and args.engine_of(q4).max_batch_size == 2
    assert args.demo_preset_of(full) == "tiny" and args.demo_preset_of(q4) is None  # never written into q4-ckpt
    assert args.default_pool == "full" and args.pool_names == ["full", "q4"]


def test_pool_names_are_checked():
    assert "unique" in _error(pools=[{"model": "a", "precision": "fp32"}, {"model": "a", "precision": "int8"}])["msg"]
    assert "routing policy" in _error(pools=[{"model": "auto", "precision": "fp32"}])["msg"]
    assert "not one of the pools" in _error(default_model="b", pools=[{"model": "a", "precision": "fp32"}])["msg"]


def test_build_app_refuses_bad_args_before_anything_deploys():
    from serve_app.app import build_app

    with pytest.raises(ValidationError, match=r"pools\.0\.precision"):
        build_app({"checkpoint": "/x", "pools": [{"model": "a", "precision": "fp8"}]})


def test_the_engine_config_names_the_attention_backends_the_model_has():
    # The config is torch-free, so it keeps its own list of backend names; this keeps the two lists one list.
    from serve_app.engine.config import ATTENTION_BACKENDS
    from serve_app.model.attention import BACKENDS

    assert ATTENTION_BACKENDS == BACKENDS
    assert _error(engine={"attention": "paged"})["loc"][:2] == ("engine", "attention")
