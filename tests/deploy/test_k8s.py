"""Every Kubernetes manifest, Serve config and the Grafana dashboard validates, strictly, offline.

- RayService objects against the KubeRay CRD's openAPIV3Schema, turned into a JSON Schema that rejects unknown fields
  (Kubernetes' own pruning would silently drop them).
- Other objects (and the Service and pod templates inside the RayService) against Kubernetes' schemas, strict mode.
- Serve configs against Ray's ServeDeploySchema plus an unknown-key check (Ray's models ignore extra keys), and their
  `args` against AppArgs the same way.
- The dashboard queries only documented metric names.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import typing
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import yaml

from serve_app.api.proxy_guard import PROXY_ENV, SEND_TIMEOUT_ENV
from serve_app.deploy import k8s

ROOT = Path(__file__).resolve().parents[2]
# KubeRay's RayService CRD (August 2026), kept in the repository so every clone validates the manifests against it.
CRD = ROOT / "k8s" / "crd" / "ray.io_rayservices.yaml"
MANIFESTS = sorted((ROOT / "k8s").glob("ray-service.*.yaml"))
SERVE_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DASHBOARD = ROOT / "k8s" / "grafana-dashboard.json"
KUBERNETES_VERSION = "1.33.0"  # the Kubernetes API schemas the non-Ray objects are checked against

# The metrics our code registers through ray.serve.metrics, as Ray exports them: `ray_` prefix; a counter named
# `*_total` keeps that single suffix; a histogram becomes `_bucket` / `_sum` / `_count`.
CUSTOM_METRICS = {
    "chatglm2_requests_total": "counter",
    "chatglm2_request_errors_total": "counter",
    "chatglm2_generated_tokens_total": "counter",
    "chatglm2_prompt_tokens_total": "counter",
    "chatglm2_time_to_first_token_seconds": "histogram",
    "chatglm2_inter_token_latency_seconds": "histogram",
    "chatglm2_queue_depth": "gauge",
    "chatglm2_running_sequences": "gauge",
    "chatglm2_kv_cache_usage_ratio": "gauge",
}
# Ray Serve's built-in metrics the dashboard shows (Ray appends `_total` to counters not already named so).
SERVE_METRICS = {
    "serve_num_http_requests": "counter",
    "serve_num_http_error_requests": "counter",
    "serve_http_request_latency_ms": "histogram",
    "serve_num_ongoing_http_requests": "gauge",
    "serve_deployment_replica_healthy": "gauge",
    "serve_autoscaling_target_replicas": "gauge",
    "serve_deployment_request_counter": "counter",
    "serve_deployment_error_counter": "counter",
    "serve_deployment_processing_latency_ms": "histogram",
    "serve_deployment_queued_queries": "gauge",
    "serve_replica_processing_queries": "gauge",
}


def _exported_names(name: str, kind: str) -> set[str]:
    if kind == "histogram":
        return {f"ray_{name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    if kind == "counter" and not name.endswith("_total"):
        return {f"ray_{name}_total"}
    return {f"ray_{name}"}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _rayservice(path: Path) -> dict:
    (service,) = [doc for doc in _documents(path) if doc["kind"] == "RayService"]
    return service


# ---- the KubeRay CRD as a strict JSON Schema ------------------------------------------------------------------------

_SCHEMA_KEYS = ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")
# ObjectMeta is `type: object` in a CRD (the API server checks it itself); these are the fields a manifest may set.
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict_schema(node: dict) -> dict:
    """An OpenAPI v3 structural schema as JSON Schema that, unlike the API server's pruning, rejects unknown fields.

    `additionalProperties: false` wherever `properties` is given unless `x-kubernetes-preserve-unknown-fields`;
    `x-kubernetes-int-or-string` accepts an integer or a string; `x-kubernetes-embedded-resource` objects may carry
    apiVersion / kind / metadata; `nullable` admits null; list-type `set` items are unique. CEL rules
    (`x-kubernetes-validations`) and list-map key uniqueness are not checked.
    """
    out: dict = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        elif key in _SCHEMA_KEYS and isinstance(value, dict):
            out[key] = strict_schema(value)
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        embedded = out.setdefault("properties", {})
        embedded.setdefault("apiVersion", {"type": "string"})
        embedded.setdefault("kind", {"type": "string"})
        embedded.setdefault("metadata", {"type": "object"})
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["properties"]["metadata"] = _OBJECT_META
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"].pop("status")  # written by the operator, never by a manifest
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator_class.check_schema(schema)
    return validator_class(schema)


def test_strict_schema_handles_the_kubernetes_extensions():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "free": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
                "embedded": {
                    "type": "object",
                    "x-kubernetes-embedded-resource": True,
                    "properties": {"spec": {"type": "object"}},
                },
                "maybe": {"type": "string", "nullable": True},
                "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            },
        }
    )
    validator = jsonschema.Draft202012Validator(schema)
    good = {
        "port": "http",
        "free": {"a": "x", "b": 1},
        "embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {}},
        "maybe": None,
        "tags": ["a", "b"],
    }
    assert _errors(validator, good) == [] and _errors(validator, {**good, "port": 8000}) == []
    for bad in ({"port": 1.5}, {"embedded": {"extra": 1}}, {"tags": ["a", "a"]}, {"other": 1}):
        assert _errors(validator, {**good, **bad}), bad


def _errors(validator, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def test_there_is_a_manifest_per_scenario():
    assert [m.name for m in MANIFESTS] == ["ray-service.gpu.yaml"]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_rayservice_validates_strictly_against_the_crd(manifest, rayservice_validator):
    assert _errors(rayservice_validator, _rayservice(manifest)) == []


def _with(service: dict, path: str, value) -> dict:
    """A copy of `service` with the value at a dotted path (list indices as numbers) set."""
    changed = copy.deepcopy(service)
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    node = changed
    for part in parents:
        node = node[part]
    node[last] = value
    return changed


_UNKNOWN = "Additional properties are not allowed"


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        ("spec.unknownField", True, _UNKNOWN),
        ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.imagePullPolicyy", "Always", _UNKNOWN),
        ("spec.rayClusterConfig.workerGroupSpecs.0.template.spec.volumes.0.persistentVolumeClaim.mode", "ro", _UNKNOWN),
        ("metadata.owner", "me", _UNKNOWN),  # ObjectMeta holds only what a manifest may set
        ("spec.rayClusterConfig.workerGroupSpecs.0.maxReplicas", "4", "is not of type 'integer'"),
        ("spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0, "is not of type 'string'"),
        # A quantity is an integer or a string: 7.5 CPUs must be written "7500m" or "7.5".
        ("spec.rayClusterConfig.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu", 7.5, "any of"),
        ("spec.rayClusterConfig.autoscalerOptions.upscalingMode", "Fast", "is not one of"),
        ("spec.serveConfigV2", {"applications": []}, "is not of type 'string'"),
        ("apiVersion", "ray.io/v1alpha1", "was expected"),
    ],
)
def test_strict_schema_rejects_unknown_fields_and_wrong_types(path, value, error, rayservice_validator):
    errors = _errors(rayservice_validator, _with(_rayservice(MANIFESTS[0]), path, value))
    assert len(errors) == 1 and error in errors[0], errors


# ---- the other Kubernetes objects, with Kubernetes' own schemas -----------------------------------------------------


def _kubernetes_objects(path: Path) -> list[dict]:
    """Each non-RayService document, plus the Service and pod templates the RayService embeds, as API objects."""
    objects = [doc for doc in _documents(path) if doc["kind"] != "RayService"]
    spec = _rayservice(path)["spec"]
    objects.append({"apiVersion": "v1", "kind": "Service", **spec["serveService"]})
    cluster = spec["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        objects.append(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": group["template"]}
        )
    return objects


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_other_objects_validate_against_kubernetes_schemas(manifest):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    objects = _kubernetes_objects(manifest)
    assert {o["kind"] for o in objects} == {"PersistentVolumeClaim", "Service", "PodTemplate", "NetworkPolicy",
                                            "PodDisruptionBudget", "Deployment"}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_kubernetes_schemas_are_strict():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    (claim,) = [doc for doc in _documents(MANIFESTS[0])
                if doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == "chatglm2-6b-weights"]
    for path, value in [("spec.readOnly", True), ("spec.accessModes", "ReadOnlyMany")]:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(_with(claim, path, value), KUBERNETES_VERSION, strict=True)


# ---- the manifest says what the project needs -------------------------------------------------------------------


def _pod_resource(container: dict, name: str) -> float:
    value = str(container["resources"]["limits"][name])
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_follows_the_kuberay_conventions(manifest):
    service = _rayservice(manifest)
    assert manifest.read_text().startswith("#"), "a purpose / prerequisites comment comes first"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "grpc": 9000,
                     "metrics": 8080}
    # KubeRay keeps only the `serve` port of a custom serve Service; more ports there would silently vanish.
    assert service["spec"]["serveService"]["spec"]["ports"] == [{"name": "serve", "port": 8000}]

    claims = {doc["metadata"]["name"] for doc in _documents(manifest) if doc["kind"] == "PersistentVolumeClaim"}
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        resources = container["resources"]
        assert resources["limits"] == resources["requests"], "Ray reads the limits; requests must not promise less"
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert {p["name"]: p["containerPort"] for p in container["ports"]} | {"metrics": 0} == {
            "serve": 8000, "grpc": 9000, "metrics": 0}
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim == {"claimName": "chatglm2-6b-weights", "readOnly": True} and claim["claimName"] in claims
        env = {e["name"]: e for e in container["env"]}
        assert env["CHATGLM2_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
            "name": "chatglm2-api-keys",
            "key": "keys",
            "optional": False,  # with require_api_keys in the serve config: no Secret is no service, never an open one
        }
        assert yaml.safe_load(_rayservice(manifest)["spec"]["serveConfigV2"])["applications"][0]["args"][
            "require_api_keys"] is True
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"] == "4194304"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_grpc_service_reaches_the_serve_ready_pods_on_serves_grpc_port(manifest):
    (grpc_service,) = [doc for doc in _documents(manifest)
                       if doc["kind"] == "Service" and doc["metadata"]["name"] == "chatglm2-grpc"]
    cluster = _rayservice(manifest)["spec"]["rayClusterConfig"]
    grpc_port = yaml.safe_load(_rayservice(manifest)["spec"]["serveConfigV2"])["grpc_options"]["port"]
    assert grpc_service["spec"]["ports"] == [{"name": "grpc", "port": grpc_port, "targetPort": "grpc",
                                              "appProtocol": "grpc"}]
    selector = grpc_service["spec"]["selector"]
    assert selector.pop("ray.io/serve") == "true"  # the label KubeRay sets on pods whose Serve proxy is healthy
    assert selector.pop("ray.io/node-type") == "worker"  # KubeRay's label: not the head, as the serve Service
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert selector.items() <= template["metadata"]["labels"].items()
        (container,) = template["spec"]["containers"]
        assert {"name": "grpc", "containerPort": grpc_port} in container["ports"]


def test_image_and_ray_versions_agree():
    dockerfile = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", base)
    assert match, f"{base} is not rayproject/ray:<version>-py<python>-<gpu|cuXXX>"
    assert match[1] == k8s.RAY_VERSION
    assert f'"ray[serve]=={k8s.RAY_VERSION}"' in dockerfile, "pip must keep the image's Ray"
    assert k8s.IMAGE == f"chatglm2-serve:{metadata.version('chatglm2-serve')}"
    for manifest in MANIFESTS:
        cluster = _rayservice(manifest)["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == k8s.RAY_VERSION
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {k8s.IMAGE}


def test_replicas_fit_the_worker_pods_and_read_the_mounted_weights():
    service = _rayservice(MANIFESTS[0])
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pods = []
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        custom = json.loads(group["rayStartParams"].get("resources", '"{}"').strip('"').replace('\\"', '"'))
        pods.append(
            {"CPU": _pod_resource(container, "cpu"), "GPU": _pod_resource(container, "nvidia.com/gpu"), **custom}
        )
    mount_paths = {m["mountPath"] for g in groups for m in g["template"]["spec"]["containers"][0]["volumeMounts"]}
    for app in config["applications"]:
        checkpoints = [app["args"]["checkpoint"]] + [p["checkpoint"] for p in app["args"]["pools"] if "checkpoint" in p]
        assert all(any(c.startswith(f"{m}/") for m in mount_paths) for c in checkpoints), checkpoints
        for deployment in app["deployments"]:
            options = deployment["ray_actor_options"]
            need = {
                "CPU": options.get("num_cpus", 1),
                "GPU": options.get("num_gpus", 0),
                **options.get("resources", {}),
            }
            assert any(all(pod.get(k, 0) >= v for k, v in need.items()) for pod in pods), deployment["name"]


# ---- the manifest is generated from configs/gpu.yaml ----------------------------------------------------------------


def test_committed_manifest_is_what_the_generator_writes():
    result = subprocess.run(
        [sys.executable, "-m", "serve_app.deploy.k8s", "--check"], check=False, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_serve_config_v2_is_configs_gpu_yaml():
    service = _rayservice(ROOT / k8s.MANIFEST)
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load((ROOT / k8s.SERVE_CONFIG).read_text())


def test_check_fails_when_the_config_changes(tmp_path, capsys):
    config, manifest = tmp_path / "serve.yaml", tmp_path / "out" / "rayservice.yaml"
    config.write_text((ROOT / k8s.SERVE_CONFIG).read_text())
    manifest.parent.mkdir()
    manifest.write_text((ROOT / k8s.MANIFEST).read_text())
    paths = ["--serve-config", str(config), "--out", str(manifest)]
    assert k8s.main(["--check", *paths]) == 0
    config.write_text(config.read_text().replace("num_replicas: 2", "num_replicas: 3"))
    assert k8s.main(["--check", *paths]) == 1
    assert "stale" in capsys.readouterr().err
    assert k8s.main(paths) == 0 and k8s.main(["--check", *paths]) == 0
    assert k8s.main(["--bogus"]) == 2


# ---- Serve configs: Ray's schema and AppArgs, with unknown keys reported ------------------------------------------


def _model_classes(annotation) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [cls for arg in typing.get_args(annotation) for cls in _model_classes(arg)]


def unknown_keys(model, data: dict, path: str = "") -> list[str]:
    """Keys in `data` that no field of the validated pydantic `model` reads, however deep (extra keys are ignored by
    Ray's schemas and by AppArgs, so a misspelt option would otherwise pass silently)."""
    from pydantic import BaseModel

    fields = type(model).model_fields
    names = {alias: name for name, f in fields.items() for alias in (name, f.alias) if alias}
    found = []
    for key, raw in data.items():
        if key not in names:
            found.append(f"{path}{key}")
            continue
        value, annotation = getattr(model, names[key]), fields[names[key]].annotation
        if isinstance(raw, dict) and not isinstance(value, BaseModel):
            # A Union[Dict, SomeModel] field keeps the dict: check it against the model it stands for.
            value = next((cls.model_validate(raw) for cls in _model_classes(annotation)), None)
        if isinstance(value, BaseModel) and isinstance(raw, dict):
            found += unknown_keys(value, raw, f"{path}{key}.")
        elif isinstance(value, list) and isinstance(raw, list):
            for i, (item, raw_item) in enumerate(zip(value, raw)):
                if isinstance(item, BaseModel) and isinstance(raw_item, dict):
                    found += unknown_keys(item, raw_item, f"{path}{key}.{i}.")
    return found


def _serve_configs() -> list[tuple[str, dict]]:
    configs = [(p.relative_to(ROOT).as_posix(), yaml.safe_load(p.read_text())) for p in SERVE_CONFIGS]
    for manifest in MANIFESTS:
        configs.append(
            (f"{manifest.name}:serveConfigV2", yaml.safe_load(_rayservice(manifest)["spec"]["serveConfigV2"]))
        )
    return configs


@pytest.mark.parametrize(("name", "config"), _serve_configs(), ids=[n for n, _ in _serve_configs()])
def test_serve_config_validates_with_rays_schema(name, config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    assert unknown_keys(schema, config) == []


def test_unknown_key_check_catches_misspelt_options():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / k8s.SERVE_CONFIG).read_text())
    deployment = config["applications"][0]["deployments"][1]
    deployment["max_ongoing_request"] = 10
    deployment["autoscaling_config"]["target_ongoing_request"] = 3
    deployment["ray_actor_options"]["num_gpu"] = 1
    assert sorted(unknown_keys(ServeDeploySchema.model_validate(config), config)) == [
        "applications.0.deployments.1.autoscaling_config.target_ongoing_request",
        "applications.0.deployments.1.max_ongoing_request",
        "applications.0.deployments.1.ray_actor_options.num_gpu",
    ]


@pytest.mark.parametrize(("name", "config"), _serve_configs(), ids=[n for n, _ in _serve_configs()])
def test_app_args_validate_as_app_args(name, config):
    from serve_app.config import AppArgs

    for app in config["applications"]:
        args = AppArgs.model_validate(app["args"])
        assert unknown_keys(args, app["args"]) == []
        deployments = {d["name"] for d in app["deployments"]}
        assert deployments == {"ChatIngress"} | {pool.model for pool in args.pools}, "one deployment entry per pool"


# ---- the Grafana dashboard ---------------------------------------------------------------------------------------


def _panels(panels: list[dict]) -> list[dict]:
    return [p for panel in panels for p in [panel, *_panels(panel.get("panels", []))]]


def _queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def _ray_serve_metric_names() -> set[str]:
    """Metric names Ray Serve registers, read from the installed Ray's source (f-strings expanded per protocol)."""
    import ray.serve

    names = set()
    for source in Path(ray.serve.__file__).parent.rglob("*.py"):
        text = source.read_text()
        names |= set(re.findall(r"""["'](serve_[a-z0-9_]+)["']""", text))
        for template in re.findall(r"""f["'](serve_[a-z0-9_]*\{protocol_name\}[a-z0-9_]*)["']""", text):
            names |= {template.replace("{protocol_name}", p) for p in ("http", "grpc")}
    return names


def test_dashboard_queries_only_documented_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert queries and all(q.count("(") == q.count(")") and q.count("{") == q.count("}") for q in queries)
    selected = {m for q in queries for m in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", q)}
    used = {m for q in queries for m in re.findall(r"\bray_[a-z0-9_]+", q)}
    assert selected <= used, "every selected metric is a ray_ one"

    custom = {n for name, kind in CUSTOM_METRICS.items() for n in _exported_names(name, kind)}
    serve = {n for name, kind in SERVE_METRICS.items() for n in _exported_names(name, kind)}
    assert used <= custom | serve, sorted(used - custom - serve)
    for name, kind in CUSTOM_METRICS.items():
        assert _exported_names(name, kind) & used, f"no panel shows {name}"
    assert set(SERVE_METRICS) <= _ray_serve_metric_names(), "Serve metric names not in the installed Ray"

    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    # A histogram is listed by its _bucket series.
    undocumented = [m for m in sorted(used) if re.sub(r"_(sum|count)$", "_bucket", m) not in docs]
    assert undocumented == [], "docs/kubernetes.md lists every metric the dashboard uses"


def test_dashboard_has_a_row_per_pool():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "label_values(ray_chatglm2_requests_total, model)" in variables["model"]["query"]["query"]
    assert [p for p in dashboard["panels"] if p["type"] == "row" and p.get("repeat") == "model"]
    assert len({p["id"] for p in _panels(dashboard["panels"])}) == len(_panels(dashboard["panels"]))


# ---- locked down (issue 24 item 9) ---------------------------------------------------------------------------


def _ray_pod_templates(manifest) -> list[tuple[str, dict]]:
    cluster = _rayservice(manifest)["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_every_ray_container_runs_unprivileged_on_a_read_only_root(manifest):
    """checkov does not look inside a RayService's pod templates, so every head and worker container (and the
    autoscaler sidecar KubeRay adds) is checked here."""
    locked = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    cluster = _rayservice(manifest)["spec"]["rayClusterConfig"]
    assert cluster["autoscalerOptions"]["securityContext"] == locked
    for name, template in _ray_pod_templates(manifest):
        pod = template["spec"]
        assert pod["securityContext"] | {"fsGroup": 0} == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100,
                                                           "fsGroup": 0, "seccompProfile": {"type": "RuntimeDefault"}}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shm"]["emptyDir"] == {"medium": "Memory"} and volumes["tmp"]["emptyDir"] == {}
        for container in pod["containers"]:
            assert container["securityContext"] == locked, (name, container["name"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            # Ray's session dir and object store, the compilers' caches: the only places written.
            assert {"/tmp": "tmp", "/dev/shm": "shm", "/home/ray/.cache": "cache"}.items() <= mounts.items()
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["TRITON_CACHE_DIR"].startswith("/tmp/") and env["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/")


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_ray_is_authenticated_fault_tolerant_and_its_head_out_of_the_endpoint(manifest):
    service = _rayservice(manifest)["spec"]
    cluster = service["rayClusterConfig"]
    assert service["excludeHeadPodFromServeSvc"] is True
    assert cluster["authOptions"] == {"mode": "token"}
    store = cluster["gcsFaultToleranceOptions"]
    host, _, port = store["redisAddress"].partition(":")
    documents = _documents(manifest)
    (redis,) = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == host]
    assert redis["spec"]["ports"][0]["port"] == int(port)
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= redis["spec"]["selector"].items()
    secret = store["redisPassword"]["valueFrom"]["secretKeyRef"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": secret}} in container["env"]
    assert "--requirepass" in container["args"] and "$(REDIS_PASSWORD)" in container["args"]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_network_policies_admit_only_the_gateway_prometheus_the_operator_and_ray_itself(manifest):
    policies = {d["metadata"]["name"]: d["spec"] for d in _documents(manifest) if d["kind"] == "NetworkPolicy"}
    ray_pods = policies["chatglm2-ray-pods"]
    templates = _ray_pod_templates(manifest)
    for _, template in templates:  # the policy selects every Ray pod
        assert ray_pods["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert ray_pods["policyTypes"] == ["Ingress"]
    rules = {tuple(sorted(p["port"] for p in rule.get("ports", []))): rule["from"] for rule in ray_pods["ingress"]}
    assert set(rules) == {(8000, 9000), (8080,), (8265,), ()}
    assert rules[(8000, 9000)][0]["podSelector"]["matchLabels"] == {"chatglm2-serve/gateway": "true"}
    assert rules[(8080,)][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert rules[(8265,)][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    # All other ports (the GCS, the client, the object manager, the workers): only from Ray pods of this cluster.
    assert rules[()] == [{"podSelector": ray_pods["podSelector"]}]
    assert policies["chatglm2-redis"]["ingress"] == [{"from": [{"podSelector": ray_pods["podSelector"]}],
                                                      "ports": [{"port": 6379}]}]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_a_disruption_budget_keeps_gpu_workers_serving(manifest):
    (budget,) = [d for d in _documents(manifest) if d["kind"] == "PodDisruptionBudget"]
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "chatglm2-serve",
                                                         "ray.io/node-type": "worker"}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_every_nodes_http_proxy_cuts_off_readers_that_stop_reading(manifest):
    """Serve runs an HTTP proxy on the head and on every worker: each imports the stalled-reader guard."""
    cluster = _rayservice(manifest)["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {name: env.get(name) for name in PROXY_ENV} == PROXY_ENV
        assert float(env[SEND_TIMEOUT_ENV]) > 0
