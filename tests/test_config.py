"""AppArgs: one source of config, and a bad value fails at build_app with the field's path."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs
from serve_app.engine.engine_config import EngineConfig


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
    with pytest.raises(ValueError, match="attention must be one of auto, slot-view, flex, gather, not 'paged'"):
        EngineConfig(attention="paged")  # and the choices its Literal types give
    with pytest.raises(ValueError, match="fallback must be one of eager, unset"):
        EngineConfig(fallback="lazy")


def test_each_deployment_gets_its_own_config_with_the_apps_fallbacks_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = AppArgs.model_validate({
        "checkpoint": "ckpt", "demo_preset": "tiny", "engine": {"max_batch_size": 4}, "max_prompt_chars": 99,
        "stream_coalesce_ms": 5, "quant": {"kernel": "dequant"},
        "pools": [{"model": "full", "precision": "auto"},
                  {"model": "q4", "precision": "int4", "checkpoint": "q4-ckpt", "engine": {"max_batch_size": 2}}]})
    full, q4 = args.pool_configs()
    assert (full.name, full.precision, q4.name, q4.precision) == ("full", "auto", "q4", "int4")
    assert full.checkpoint == str(tmp_path / "ckpt") and q4.checkpoint == str(tmp_path / "q4-ckpt")
    assert full.engine.max_batch_size == 4 and q4.engine.max_batch_size == 2
    assert full.demo_preset == "tiny" and q4.demo_preset is None  # never written into q4-ckpt
    assert full.quant.kernel == q4.quant.kernel == "dequant" and full.stream_coalesce_ms == 5
    ingress = args.ingress_config()
    assert ingress.default_pool == "full" and ingress.pool_names == ["full", "q4"] and ingress.limits.max_prompt_chars == 99
    # Each config holds only its deployment's keys: the ingress has no checkpoint, a pool no API keys.
    assert not hasattr(ingress, "checkpoint") and not hasattr(full, "api_keys_env")


def test_every_yaml_key_is_read_by_exactly_one_deployment_or_resolved_into_one():
    """The app's keys are the ingress's (IngressArgs) plus the pools' (what pool_configs() resolves)."""
    from serve_app.config import IngressArgs, IngressConfig, PoolConfig

    ingress_keys, app_keys = set(IngressArgs.model_fields), set(AppArgs.model_fields)
    pool_side = app_keys - ingress_keys
    assert pool_side == {"checkpoint", "demo_preset", "pools", "device", "torch_threads", "engine", "quant",
                         "cuda_context_bytes", "stream_coalesce_ms", "adapters", "max_loaded_adapters"}
    # `adapters` is resolved into both: each pool gets its own, the ingress every name with its pools.
    assert "adapters" in IngressConfig.model_fields
    resolved = set(PoolConfig.model_fields) - {"name", "precision"}
    assert pool_side - {"pools"} <= resolved and resolved - pool_side == {"log_prompts"}


def test_pool_names_are_checked():
    assert "unique" in _error(pools=[{"model": "a", "precision": "fp32"}, {"model": "a", "precision": "int8"}])["msg"]
    assert "routing policy" in _error(pools=[{"model": "auto", "precision": "fp32"}])["msg"]
    assert "not one of the pools" in _error(default_model="b", pools=[{"model": "a", "precision": "fp32"}])["msg"]


def test_adapter_args_are_checked():
    pools = [{"model": "a", "precision": "fp32"}, {"model": "b", "precision": "int8"}]
    one = {"name": "x", "path": "/x"}
    assert "unique" in _error(pools=pools, adapters=[one, one])["msg"]
    assert "a pool or the routing policy" in _error(pools=pools, adapters=[dict(one, name="a")])["msg"]
    assert "no pool is called 'c'" in _error(pools=pools, adapters=[dict(one, pools=["c"])])["msg"]
    assert _error(pools=pools, adapters=[dict(one, name="a:b")])["loc"][:2] == ("adapters", 0)
    args = AppArgs.model_validate({"checkpoint": "/ckpt", "pools": pools,
                                   "adapters": [one, {"name": "y", "path": "/y", "pools": ["b"]}]})
    first, second = args.pool_configs()
    assert [a.name for a in first.adapters] == ["x"] and [a.name for a in second.adapters] == ["x", "y"]
    assert args.ingress_config().adapters == {"x": ["a", "b"], "y": ["b"]}


def test_a_bad_adapter_fails_the_deploy_naming_it(tiny_checkpoint, tmp_path):
    from serve_app.app import build_app
    from serve_app.model.adapters import AdapterError

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    args = {"checkpoint": str(tiny_checkpoint), "pools": [{"model": "a", "precision": "fp32"}],
            "adapters": [{"name": "mine", "path": str(tmp_path / "broken")}]}
    with pytest.raises(AdapterError, match="adapter 'mine'.*adapter_model.safetensors"):
        build_app(args)


def test_build_app_refuses_bad_args_before_anything_deploys():
    from serve_app.app import build_app

    with pytest.raises(ValidationError, match=r"pools\.0\.precision"):
        build_app({"checkpoint": "/x", "pools": [{"model": "a", "precision": "fp8"}]})


def test_each_value_set_is_the_one_its_implementation_defines():
    """The config's choices are the implementing modules' own tuples, so adding a backend, precision, preset or
    kernel there is all it takes (and a typo in a config still fails with the field's path)."""
    import typing

    from serve_app.config import PoolArgs, QuantArgs
    from serve_app.model import attention, demo, loader, quant_kernels

    def choices(model, name):
        return typing.get_args(typing.get_args(model.model_fields[name].annotation)[0]) or typing.get_args(
            model.model_fields[name].annotation)

    assert typing.get_args(typing.get_type_hints(EngineConfig)["attention"]) == attention.BACKENDS
    assert choices(PoolArgs, "precision") == loader.PRECISIONS
    assert choices(AppArgs, "device") == loader.DEVICES
    assert choices(AppArgs, "demo_preset") == tuple(demo.PRESETS)
    assert choices(QuantArgs, "kernel") == quant_kernels.QUANT_KERNELS
    assert _error(engine={"attention": "paged"})["loc"][:2] == ("engine", "attention")


def test_serve_can_call_both_app_builders_with_the_yaml_args():
    """Serve calls an import_path builder with the args alone (and refuses a builder with more parameters)."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve_app.app import build_app
    from tests.fake_engine import build_fake_app

    args = {"checkpoint": "/m", "pools": [{"model": "a", "precision": "fp32"}]}
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, args), Application)
    fake = call_user_app_builder_with_args_if_necessary(build_fake_app, {**args, "fake_engine": {}})
    assert isinstance(fake, Application)


@pytest.mark.parametrize("path", ["configs/local.yaml", "configs/gpu.yaml"])
def test_the_ingress_has_bounded_concurrency_and_queue_in_the_serving_configs(path):
    """Past its max_queued_requests Serve's proxy refuses at once: nothing piles up without bound at the ingress."""
    from pathlib import Path

    import yaml

    app = yaml.safe_load(Path(path).read_text())["applications"][0]
    ingress = next(d for d in app["deployments"] if d["name"] == "ChatIngress")
    assert ingress["max_ongoing_requests"] >= 1 and ingress["max_queued_requests"] >= 1
    AppArgs.model_validate(app["args"])  # and the args, limits included, are valid
