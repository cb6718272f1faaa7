"""helm/osfn-dist, linted and rendered by the real Helm engine (helm-python-sdk, offline).

Rendered RayJobs are validated against the vendored KubeRay CRDs (tests/schemas/kuberay/), core
objects against the upstream Kubernetes schemas (kubernetes-validate), and the wiring between
objects (selectors, ports, Secrets, mounts, the entrypoint and its config) is checked by reading
the rendered manifests.
"""
from __future__ import annotations

import base64
import copy
import functools
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "osfn-dist"
RELEASE, NAMESPACE = "osfn", "ml"


sys.path.insert(0, str(ROOT / "tests" / "schemas"))  # tests/ is not a package
import manifest_validation as mv  # noqa: E402

VALUE_SETS = {
    "defaults": {},
    "cpu-smoke": yaml.safe_load((CHART / "ci" / "cpu-smoke-values.yaml").read_text()),
    "gpu": yaml.safe_load((CHART / "ci" / "gpu-values.yaml").read_text()),
    "monitoring-on": yaml.safe_load((CHART / "ci" / "monitoring-values.yaml").read_text()),
    "monitoring-off": {"metrics": {"enabled": False}, "grafanaDashboard": {"enabled": False}},
}
CORE_API_VERSIONS = {"v1", "apps/v1"}
MONITORING_API = "monitoring.coreos.com/v1"


@functools.lru_cache(maxsize=1)
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render_raw(values: dict) -> dict[str, str]:
    return chart().render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)


@functools.lru_cache(maxsize=None)
def _render_set(value_set: str) -> tuple[tuple[dict, ...], str]:
    raw = render_raw(VALUE_SETS[value_set])
    notes = raw.pop("osfn-dist/templates/NOTES.txt", "")
    objects = [doc for text in raw.values() for doc in mv.load_documents(text)]
    return tuple(objects), notes


def objects(value_set: str | dict) -> list[dict]:
    if isinstance(value_set, dict):
        raw = render_raw(value_set)
        raw.pop("osfn-dist/templates/NOTES.txt", None)
        return [doc for text in raw.values() for doc in mv.load_documents(text)]
    return copy.deepcopy(list(_render_set(value_set)[0]))


def only(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def head_pod(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]


def worker_groups(job: dict) -> list[dict]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def ray_containers(job: dict) -> list[dict]:
    pods = [head_pod(job)] + [g["template"] for g in worker_groups(job)]
    return [p["spec"]["containers"][0] for p in pods]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def train_config(objs: list[dict]) -> dict:
    (cm,) = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-train-config")]
    (text,) = cm["data"].values()
    return yaml.safe_load(text)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_pin() -> str:
    (spec,) = [r for r in pyproject()["project"]["optional-dependencies"]["ray"] if r.startswith("ray[")]
    return spec.split("==")[1]


def render_notes(values: dict) -> str:
    return render_raw(values)["osfn-dist/templates/NOTES.txt"]


def schema_error(values: dict) -> str:
    with pytest.raises(helm.HelmValuesError) as info:
        render_raw(values)
    return str(info.value)


def render_error(values: dict) -> str:
    with pytest.raises(helm.HelmError) as info:
        render_raw(values)
    return str(info.value)


# --- lint and schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_lints_without_warnings_in_strict_mode(value_set):
    report = helm.lint(CHART, values=copy.deepcopy(VALUE_SETS[value_set]), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_ray_objects_validate_against_the_kuberay_crds(value_set):
    ray_objects = [o for o in objects(value_set) if o["apiVersion"].startswith("ray.io/")]
    assert [o["kind"] for o in ray_objects] == ["RayJob"]
    for obj in ray_objects:
        assert mv.ray_errors(obj) == []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_core_objects_validate_against_the_kubernetes_schemas(value_set):
    objs = objects(value_set)
    unknown = {o["apiVersion"] for o in objs} - CORE_API_VERSIONS - {"ray.io/v1", MONITORING_API}
    assert not unknown, f"add a validator for {unknown}"
    core = [o for o in objs if o["apiVersion"] in CORE_API_VERSIONS]
    assert core, "every value set renders at least the train config ConfigMap"
    for obj in core:
        assert mv.core_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_crd_validation_catches_misspelt_fields_and_wrong_types():
    # The CRDs do not forbid unknown fields themselves (the API server prunes them); the helper
    # must, or a typo in the chart would pass.
    job = only(objects("defaults"), "RayJob")
    group = worker_groups(job)[0]
    group["replica"] = 2
    group["template"]["spec"]["nodeSelecter"] = {"a": "b"}
    job["spec"]["backoffLimit"] = "three"
    errors = "\n".join(mv.ray_errors(job))
    assert "'replica' was unexpected" in errors
    assert "'nodeSelecter' was unexpected" in errors
    assert "spec.backoffLimit" in errors


@pytest.mark.parametrize(
    ("values", "field", "why"),
    [
        ({"workers": {"gpus": -1}}, "/workers/gpus", "minimum"),
        ({"workers": {"replicas": 0}}, "/workers/replicas", "minimum"),
        ({"workers": {"gpu": 2}}, "/workers", "'gpu'"),
        ({"worker": {"gpus": 1}}, "", "'worker'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "IfNotPresent"),
        ({"ray": {"auth": {"mode": "none"}}}, "/ray/auth/mode", "token"),
        ({"train": {"steps": "many"}}, "/train/steps", "want"),
        ({"train": {"optimizer": {"name": "adam"}}}, "/train/optimizer/name", "osfn"),
        ({"train": {"optimizer": {"lr": 0}}}, "/train/optimizer/lr", "exclusiveMinimum"),
        ({"train": {"extraArgs": ["--workload='x'"]}}, "/train/extraArgs/0", "pattern"),
        ({"curvatureService": {"port": 70000}}, "/curvatureService/port", "maximum"),
        ({"workers": {"resources": {"limits": {"memory": "lots"}}}}, "/workers/resources/limits/memory", ""),
        ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "/metrics/serviceMonitor/interval", "pattern"),
        ({"job": {"submissionMode": "Batch"}}, "/job/submissionMode", "K8sJobMode"),
    ],
    ids=lambda p: json.dumps(p, separators=(",", ":")) if isinstance(p, dict) else None,
)
def test_bad_values_are_rejected_by_the_schema_naming_the_field(values, field, why):
    message = schema_error(values)
    assert f"at '{field}'" in message and why in message, message


def test_every_value_in_values_yaml_is_typed_and_described_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node):
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].split("/")[-1]] | {k: v for k, v in node.items() if k != "$ref"}
        return node

    missing = []

    def walk(value, node, path):
        node = resolve(node)
        if "description" not in node:
            missing.append(path)
        if isinstance(value, dict) and "properties" in node and node.get("additionalProperties") is False:
            for key, child in value.items():
                if key not in node["properties"]:
                    missing.append(f"{path}.{key} (not in schema)")
                else:
                    walk(child, node["properties"][key], f"{path}.{key}")

    for key, child in values.items():
        walk(child, schema["properties"].get(key, {}), key)
    assert missing == []


def test_every_value_is_listed_in_the_charts_readme():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def leaves(value, node, path):
        # A key is a leaf of the table when the schema stops listing sub-keys (free-form maps).
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].split("/")[-1]]
        if isinstance(value, dict) and value and node.get("additionalProperties") is False:
            for key, child in value.items():
                yield from leaves(child, node["properties"][key], f"{path}.{key}" if path else key)
        else:
            yield path

    missing = [p for p in leaves(values, schema, "") if f"| `{p}` |" not in readme]
    assert missing == []


# --- the training run ---------------------------------------------------------------------------


def test_defaults_render_a_rayjob_with_a_head_and_a_gpu_worker_group():
    job = only(objects("defaults"), "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_pin()
    head = head_pod(job)["spec"]["containers"]
    assert head[0]["name"] == "ray-head", "KubeRay takes the first container as the Ray container"
    (group,) = worker_groups(job)
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert {c["image"] for c in ray_containers(job)} == {f"osfn-dist:{version}"}
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_gpu_values_set_gpus_node_selector_tolerations_image_and_storage():
    values = VALUE_SETS["gpu"]
    objs = objects("gpu")
    job = only(objs, "RayJob")
    (group,) = worker_groups(job)
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["limits"]["cpu"] == "32"
    assert pod["nodeSelector"] == values["workers"]["nodeSelector"]
    assert pod["tolerations"] == values["workers"]["tolerations"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert container["image"] == "registry.example.com/ml/osfn-dist:0.1.0"
    assert group["replicas"] == 2
    assert head_pod(job)["spec"]["nodeSelector"] == values["head"]["nodeSelector"]
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    config = train_config(objs)
    # Checkpoints must land on the shared volume, seen at the run directory from every pod.
    for spec in [head_pod(job)["spec"], pod]:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert claims == {"runs": "osfn-runs"} and mounts["runs"] == config["run_dir"]
    assert config["num_workers"] == 8 and config["use_gpu"] is True
    assert config["optimizer"] == values["train"]["optimizer"]
    assert config["log_every"] == 50 and config["batch_size"] == 4096 and config["steps"] == 5000


def test_cpu_smoke_requests_no_gpu_and_disables_ray_auth_consistently():
    objs = objects("cpu-smoke")
    job = only(objs, "RayJob")
    assert "nvidia.com/gpu" not in json.dumps(objs)
    config = train_config(objs)
    assert config["use_gpu"] is False and config["num_workers"] == 2
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "disabled"}
    for container in ray_containers(job):
        env = env_of(container)
        assert env["RAY_AUTH_MODE"] == "disabled"
        assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.1"
    assert not of_kind(objs, "Deployment") and not of_kind(objs, "Secret")


def test_token_auth_is_left_to_kuberay_and_can_use_an_existing_secret():
    job = only(objects({"ray": {"auth": {"mode": "token", "secretName": "ray-token"}}}), "RayJob")
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    # KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN itself; a value of ours would fight it.
    assert all("RAY_AUTH_MODE" not in env_of(c) for c in ray_containers(job))


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_entrypoint_runs_osfn_dist_train_with_the_mounted_config(value_set):
    objs = objects(value_set)
    job = only(objs, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["osfn-dist", "train"]
    assert argv[argv.index("--address") + 1] == "auto"
    config_path = Path(argv[argv.index("--config") + 1])
    (cm,) = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-train-config")]
    assert list(cm["data"]) == [config_path.name]
    spec = head_pod(job)["spec"]
    (volume,) = [v for v in spec["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == str(config_path.parent)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_entrypoint_and_config_are_accepted_by_the_real_train_command(value_set, tmp_path):
    # The package's own parser and TrainConfig: a flag or config key the CLI does not know fails.
    command = pytest.importorskip("osfn_dist.train.command", reason="train command not built yet")
    from osfn_dist.cli import build_parser

    objs = objects(value_set)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(train_config(objs)))
    argv = shlex.split(only(objs, "RayJob")["spec"]["entrypoint"])
    argv[argv.index("--config") + 1] = str(config_file)
    args = build_parser().parse_args(argv[1:])
    cfg = command.config_from_args(args)
    assert cfg.backend == "ray" and cfg.address == "auto"
    assert cfg.num_workers == train_config(objs)["num_workers"]
    from osfn_dist.workloads import workload_names

    assert cfg.workload in workload_names()


def test_num_workers_default_to_the_gpus_of_the_worker_group():
    config = train_config(objects({"workers": {"replicas": 3, "gpus": 2}}))
    assert config["num_workers"] == 6
    config = train_config(objects({"workers": {"replicas": 3, "gpus": 2}, "train": {"numWorkers": 4}}))
    assert config["num_workers"] == 4


def test_more_workers_than_gpus_is_refused_with_the_numbers():
    message = render_error({"workers": {"replicas": 1, "gpus": 2}, "train": {"numWorkers": 3}})
    assert "train.numWorkers=3" in message and "= 2" in message


def test_extra_config_cannot_override_keys_the_chart_derives():
    message = render_error({"train": {"extraConfig": {"num_workers": 64}}})
    assert "train.extraConfig.num_workers" in message


def test_extra_args_are_quoted_into_the_entrypoint():
    job = only(objects({"train": {"extraArgs": ["--seed", "7", "--workload", "pkg.mod:build net"]}}), "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[-4:] == ["--seed", "7", "--workload", "pkg.mod:build net"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_pod_runs_as_the_images_non_root_user(value_set):
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    uid, gid = re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile, re.M)[-1]
    objs = objects(value_set)
    pods = [head_pod(only(objs, "RayJob"))] + [g["template"] for g in worker_groups(only(objs, "RayJob"))]
    pods += [d["spec"]["template"] for d in of_kind(objs, "Deployment")]
    for pod in pods:
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
        for container in pod["spec"]["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


# --- the curvature service ----------------------------------------------------------------------


def curvature(objs):
    deployment = only(objs, "Deployment")
    service = only(objs, "Service")
    return deployment, service, deployment["spec"]["template"]["spec"]["containers"][0]


def arg(container: dict, flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def test_curvature_service_exposes_grpc_and_reads_its_token_from_the_secret():
    objs = objects("defaults")
    deployment, service, container = curvature(objs)
    assert container["args"][:2] == ["osfn-dist", "serve"]
    assert deployment["spec"]["replicas"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    grpc = {p["name"]: p for p in service["spec"]["ports"]}["grpc"]
    assert grpc["port"] == 50051 and grpc["appProtocol"] == "grpc"
    assert grpc["targetPort"] in {p["name"] for p in container["ports"]}
    assert arg(container, "--port") == "50051" and arg(container, "--host") == "0.0.0.0"
    # --token-file points into the volume that holds the rendered Secret's key.
    secret = only(objs, "Secret")
    token_file = Path(arg(container, "--token-file"))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert token_file.name in secret["data"]
    token = base64.b64decode(secret["data"][token_file.name]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token)


def test_curvature_probes_ask_the_grpc_health_service_unless_tls_is_on():
    from osfn_dist.service.server import SERVICE_NAME

    _, _, container = curvature(objects({"curvatureService": {"port": 50777}}))
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        # the serving port by number (Kubernetes' grpc probe takes no port names), and the
        # whole-server health entry the server registers (it also registers SERVICE_NAME)
        assert probe["grpc"] == {"port": 50777} and "tcpSocket" not in probe
    assert SERVICE_NAME and arg(container, "--port") == "50777"
    _, _, container = curvature(objects("monitoring-on"))  # TLS on: the kubelet's probe can't speak it
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert probe["tcpSocket"] == {"port": "grpc"} and "grpc" not in probe


def test_curvature_token_from_values_or_an_existing_secret():
    secret = only(objects({"curvatureService": {"auth": {"token": "s3cr3t", "secretKey": "auth"}}}), "Secret")
    assert base64.b64decode(secret["data"]["auth"]).decode() == "s3cr3t"
    objs = objects({"curvatureService": {"auth": {"existingSecret": "mine"}}})
    assert not of_kind(objs, "Secret")
    deployment, _, _ = curvature(objs)
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "mine"
    assert "only one of" in render_error({"curvatureService": {"auth": {"existingSecret": "a", "token": "b"}}})


def test_curvature_tls_mounts_the_certificate_secret():
    deployment, _, container = curvature(objects("monitoring-on"))
    cert, key = Path(arg(container, "--tls-cert")), Path(arg(container, "--tls-key"))
    assert (cert.name, key.name) == ("tls.crt", "tls.key")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(cert.parent)]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "osfn-curvature-tls"
    assert "tls.secretName" in render_error({"curvatureService": {"tls": {"enabled": True}}})


@pytest.mark.parametrize("value_set", ["defaults", "monitoring-on"])
def test_curvature_server_args_and_the_notes_status_command_parse_with_the_real_cli(value_set):
    pytest.importorskip("osfn_dist.service.command", reason="serve command not built yet")
    from osfn_dist.cli import build_parser

    objs = objects(value_set)
    deployment, service, container = curvature(objs)
    args = build_parser().parse_args(container["args"][1:])
    assert args.command == "serve" and args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.port == ports["grpc"] and args.metrics_port == ports["metrics"]
    assert args.token_file
    tls = value_set == "monitoring-on"
    assert bool(args.tls_cert) is tls and bool(args.tls_key) is tls
    notes = render_notes(VALUE_SETS[value_set])
    (status_line,) = [line.strip() for line in notes.splitlines() if line.strip().startswith("osfn-dist status")]
    status = build_parser().parse_args(shlex.split(status_line)[1:])
    assert status.address.endswith(f":{service['spec']['ports'][0]['port']}") and status.token_file


def test_curvature_state_survives_restarts_on_a_volume():
    deployment, _, container = curvature(objects({"curvatureService": {"persistence": {"existingClaim": "curv"}}}))
    state = Path(arg(container, "--state-file"))
    (mount,) = [m for m in container["volumeMounts"] if state.is_relative_to(m["mountPath"])]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "curv"
    assert "--state-file" not in curvature(objects("defaults"))[2]["args"]


# --- monitoring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ["defaults", "monitoring-off"])
def test_monitoring_off_renders_no_monitors_and_no_dashboard(value_set):
    objs = objects(value_set)
    assert not [o for o in objs if o["apiVersion"] == MONITORING_API]
    assert not [o for o in of_kind(objs, "ConfigMap") if "osfn-dashboard.json" in o.get("data", {})]


def test_metrics_off_removes_every_metrics_port():
    objs = objects("monitoring-off")
    assert "metrics_port" not in train_config(objs)
    for container in ray_containers(only(objs, "RayJob")):
        assert "ports" not in container
    _, service, container = curvature(objs)
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]
    assert [p["name"] for p in container["ports"]] == ["grpc"]


def test_service_monitor_scrapes_the_curvature_services_metrics_port():
    objs = objects("monitoring-on")
    monitor = only(objs, "ServiceMonitor")
    _, service, container = curvature(objs)
    assert monitor["apiVersion"] == MONITORING_API
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    port = {p["name"]: p for p in service["spec"]["ports"]}[endpoint["port"]]
    assert port["port"] == int(arg(container, "--metrics-port")) == 9400
    assert endpoint["interval"] == "15s"


def test_pod_monitor_scrapes_the_training_metrics_port_of_every_ray_pod():
    objs = objects("monitoring-on")
    monitor = only(objs, "PodMonitor")
    job = only(objs, "RayJob")
    config = train_config(objs)
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for pod, container in zip([head_pod(job)] + [g["template"] for g in worker_groups(job)], ray_containers(job)):
        labels = pod["metadata"]["labels"]
        assert selector["matchLabels"].items() <= labels.items()
        assert labels[expression["key"]] in expression["values"]
    # Each GPU worker serves metrics_port + local rank (osfn_dist/train/ray_worker.py).
    (group,) = worker_groups(job)
    ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    train_ports = {name: port for name, port in ports.items() if name.startswith("osfn-train-")}
    assert sorted(train_ports.values()) == [config["metrics_port"] + rank for rank in range(gpus)]
    assert set(train_ports) | {"metrics"} == endpoints


@pytest.mark.parametrize(("values", "head_ports", "worker_ports"), [
    ({"workers": {"gpus": 8}}, [], [9401 + r for r in range(8)]),
    ({"workers": {"gpus": 0}}, [9401], [9401]),
    ({"workers": {"gpus": 0}, "metrics": {"ranksPerPod": 3}}, [9401], [9401, 9402, 9403]),
])
def test_training_metrics_ports_follow_the_workers_per_pod(values, head_ports, worker_ports):
    job = only(objects(values), "RayJob")
    head, worker = ray_containers(job)
    listed = lambda c: sorted(p["containerPort"] for p in c["ports"] if p["name"].startswith("osfn-train-"))
    assert listed(head) == head_ports and listed(worker) == worker_ports


def test_monitors_without_metrics_ports_are_refused():
    message = render_error({"metrics": {"enabled": False, "podMonitor": {"enabled": True}}})
    assert "metrics.enabled=true" in message


def test_dashboard_configmap_carries_the_charts_dashboard_file():
    template = (CHART / "templates" / "grafana-dashboard.yaml").read_text()
    assert '.Files.Get "files/osfn-dashboard.json"' in template
    (cm,) = [o for o in of_kind(objects("monitoring-on"), "ConfigMap") if "osfn-dashboard.json" in o["data"]]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "files" / "osfn-dashboard.json").read_text())
    assert json.loads(cm["data"]["osfn-dashboard.json"]) == shipped


# --- metadata -----------------------------------------------------------------------------------


def test_chart_versions_agree_with_pyproject():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert meta["appVersion"] == pyproject()["project"]["version"]
    assert values["ray"]["version"] == ray_pin()


def test_notes_tell_how_to_follow_the_job_and_reach_the_service():
    notes = _render_set("defaults")[1]
    job = only(objects("defaults"), "RayJob")
    _, service, _ = curvature(objects("defaults"))
    assert f"get rayjob {job['metadata']['name']}" in notes
    assert f"{service['metadata']['name']}.{NAMESPACE}.svc:50051" in notes
    assert "RAY_AUTH_MODE" in notes
    assert "WARNING" not in notes
    assert "no shared run storage" in render_notes({"workers": {"replicas": 2}})
    assert "WARNING" not in render_notes(VALUE_SETS["gpu"])  # 2 pods with a shared volume


def test_monitors_keep_our_job_and_worker_labels():
    """Our series carry their own ``job``/``worker`` labels, which the dashboard filters on;
    without honorLabels Prometheus renames them exported_job and the dashboard goes empty."""
    objs = objects("monitoring-on")
    monitors = of_kind(objs, "ServiceMonitor") + of_kind(objs, "PodMonitor")
    assert monitors
    for mon in monitors:
        endpoints = mon["spec"].get("endpoints") or mon["spec"].get("podMetricsEndpoints")
        assert endpoints and all(ep.get("honorLabels") is True for ep in endpoints), mon["metadata"]["name"]


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_scrape_configs_keep_our_labels(config):
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / config).read_text())
    ours = [j for j in cfg["scrape_configs"] if j["job_name"].startswith("osfn")]
    assert ours and all(j.get("honor_labels") is True for j in ours)
