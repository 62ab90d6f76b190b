"""`require_api_keys: true` fails closed: without keys the ingress refuses to start instead of serving openly.

(With keys, tests/api/test_security.py runs its whole module on a config that sets it.)
"""

from __future__ import annotations

import logging

import pytest

from serve_app.api.ingress_config import IngressConfig
from serve_app.api.security import NoAPIKeys, SecuritySettings
from tests.serving import deploy, free_port, local_config, stop_demo_service

ENV = "TEST_CHATGLM2_REQUIRED_KEYS"


def test_required_keys_need_the_variable_named():
    with pytest.raises(ValueError, match="require_api_keys needs api_keys_env"):
        IngressConfig(pool_names=["p"], require_api_keys=True)


@pytest.mark.parametrize("value", [None, "", " , ,"], ids=["unset", "empty", "only-commas"])
def test_no_keys_is_an_error_when_required_and_a_warning_when_not(monkeypatch, caplog, value):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    with pytest.raises(NoAPIKeys, match=f"\\${ENV} is unset or holds no key"):
        SecuritySettings.from_env(ENV, 1024, require_api_keys=True)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert not SecuritySettings.from_env(ENV, 1024).keys_required  # open, and it says so
    assert "no API key is required" in caplog.text


def test_keys_from_the_variable_when_required(monkeypatch):
    monkeypatch.setenv(ENV, "sk-a, sk-b")
    settings = SecuritySettings.from_env(ENV, 1024, require_api_keys=True)
    assert settings.key_ok("sk-b") and not settings.key_ok("sk-c") and not settings.key_ok(None)


@pytest.mark.slow
def test_the_deployment_fails_without_keys(tiny_checkpoint, monkeypatch):
    """A misspelt Secret or variable name on a real Serve deploy: the app goes to DEPLOY_FAILED, and the ingress
    deployment's status says why."""
    import ray
    from ray import serve

    monkeypatch.delenv(ENV, raising=False)
    config = local_config(tiny_checkpoint, fake_engine={}, pools=[{"model": "chatglm2-6b", "precision": "fp32"}],
                          api_keys_env=ENV, require_api_keys=True)
    stop_demo_service()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(RuntimeError, match="deploy failed"):
            deploy(config, free_port())
        ingress = serve.status().applications["chatglm2"].deployments["ChatIngress"]
        assert ingress.status == "DEPLOY_FAILED"
        assert f"require_api_keys is true but ${ENV} is unset or holds no key" in ingress.message
    finally:
        serve.shutdown()
        ray.shutdown()
