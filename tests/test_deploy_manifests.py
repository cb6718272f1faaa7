"""deploy/: the RayJob examples, the `ray job submit` recipe, Prometheus and Grafana configs, and
the "Run on a GPU cluster" guide, each checked against the tool that will consume it (KubeRay CRDs,
Kubernetes schemas, the osfn-dist and ray CLIs, promtool, the Helm chart)."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAYJOBS = sorted((DEPLOY / "rayjob").glob("*.yaml"))
SUBMIT = DEPLOY / "rayjob" / "submit-existing-cluster.sh"
README = DEPLOY / "README.md"
CHART = ROOT / "helm" / "osfn-dist"


sys.path.insert(0, str(ROOT / "tests" / "schemas"))  # tests/ is not a package
import manifest_validation as mv  # noqa: E402


def docs(path: Path) -> list[dict]:
    return mv.load_documents(path.read_text())


def only(objs, kind):
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def pods(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_pin() -> str:
    (spec,) = [r for r in pyproject()["project"]["optional-dependencies"]["ray"] if r.startswith("ray[")]
    return spec.split("==")[1]


def train_args(argv: list[str]):
    """Parse `osfn-dist train ...` with the package's own parser (unknown flags fail)."""
    from osfn_dist.cli import build_parser

    assert argv[:2] == ["osfn-dist", "train"], argv
    return build_parser().parse_args(argv[1:])


def resolve_train_config(argv: list[str], config_text: str | None, tmp_path: Path):
    command = pytest.importorskip("osfn_dist.train.command", reason="train command not built yet")
    argv = list(argv)
    if config_text is not None:
        config_file = tmp_path / "train.yaml"
        config_file.write_text(config_text)
        argv[argv.index("--config") + 1] = str(config_file)
    return command.config_from_args(train_args(argv))


def workload_names() -> list[str]:
    from osfn_dist.workloads import workload_names as names

    return names()


# --- RayJob examples ----------------------------------------------------------------------------


def test_there_is_a_cpu_smoke_and_a_multi_gpu_example():
    assert {p.name for p in RAYJOBS} >= {"cpu-smoke.yaml", "multi-gpu.yaml"}


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_example_objects_validate_against_kuberay_and_kubernetes_schemas(path):
    for obj in docs(path):
        if obj["apiVersion"].startswith("ray.io/"):
            assert mv.ray_errors(obj) == [], obj["metadata"]["name"]
        else:
            assert obj["apiVersion"] in {"v1", "apps/v1"}, f"no validator for {obj['apiVersion']}"
            assert mv.core_errors(obj) == [], obj["metadata"]["name"]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_example_runs_the_pinned_ray_and_package_as_non_root(path):
    job = only(docs(path), "RayJob")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_pin()
    version = pyproject()["project"]["version"]
    for pod in pods(job):
        (container,) = pod["spec"]["containers"]
        assert container["image"].rsplit(":", 1)[1] == version
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == 1000


def test_cpu_smoke_needs_no_gpu_and_keeps_ray_auth_off_everywhere(tmp_path):
    job = only(docs(DEPLOY / "rayjob" / "cpu-smoke.yaml"), "RayJob")
    assert "nvidia.com/gpu" not in json.dumps(job)
    argv = shlex.split(job["spec"]["entrypoint"])
    cfg = resolve_train_config(argv, None, tmp_path)
    workers = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.backend == "ray" and cfg.address == "auto" and not cfg.use_gpu
    assert cfg.num_workers == workers
    assert cfg.workload in workload_names()
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "disabled"
    for pod in pods(job):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == "disabled"


def test_multi_gpu_config_matches_the_cluster_it_runs_on(tmp_path):
    objs = docs(DEPLOY / "rayjob" / "multi-gpu.yaml")
    job, config_map, claim = only(objs, "RayJob"), only(objs, "ConfigMap"), only(objs, "PersistentVolumeClaim")
    argv = shlex.split(job["spec"]["entrypoint"])
    config_path = Path(argv[argv.index("--config") + 1])
    cfg = resolve_train_config(argv, config_map["data"][config_path.name], tmp_path)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for g in groups)
    assert gpus > 1 and cfg.num_workers == gpus and cfg.use_gpu
    assert cfg.address == "auto" and cfg.workload in workload_names()
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"

    head = pods(job)[0]["spec"]
    (volume,) = [v for v in head["volumes"] if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == str(config_path.parent)
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in pods(job):
        spec = pod["spec"]
        (runs,) = [v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        (runs_mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == runs["name"]]
        assert Path(cfg.run_dir).is_relative_to(runs_mount["mountPath"]), "checkpoints must go to shared storage"
    for group in groups:
        # One metrics port per local rank: workers serve on metrics_port + local rank.
        container = group["template"]["spec"]["containers"][0]
        train_ports = sorted(p["containerPort"] for p in container["ports"] if p["name"].startswith("osfn-train-"))
        assert train_ports == [cfg.metrics_port + r for r in range(container["resources"]["limits"]["nvidia.com/gpu"])]
        tolerations = group["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        assert group["template"]["spec"]["nodeSelector"]


# --- ray job submit recipe ----------------------------------------------------------------------


def dry_run(tmp_path: Path, **env) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OSFN_"))}
    environment |= {"DRY_RUN": "1", **env}
    out = subprocess.run(["bash", str(SUBMIT)], env=environment, capture_output=True, text=True, timeout=30, check=True)
    return shlex.split(out.stdout)


def test_submit_script_is_valid_bash_and_executable():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True, timeout=30)
    assert os.access(SUBMIT, os.X_OK)


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        ({}, {"workers": 2, "gpu": False}),
        ({"NUM_WORKERS": "8", "USE_GPU": "1", "STEPS": "50", "WORKLOAD": "deep_linear", "RAY_AUTH_MODE": "token"}, {"workers": 8, "gpu": True}),
    ],
)
def test_submit_script_builds_a_command_ray_and_osfn_dist_accept(tmp_path, env, expect):
    from ray.dashboard.modules.job.cli import submit

    argv = dry_run(tmp_path, **env)
    assert argv[:3] == ["ray", "job", "submit"]
    params = submit.make_context("submit", argv[3:]).params  # unknown options raise here
    assert params["address"] == "http://127.0.0.1:8265"
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in json.loads(params["runtime_env_json"])["env_vars"]
    cfg = resolve_train_config(list(params["entrypoint"]), None, tmp_path)
    assert cfg.address == "auto" and cfg.backend == "ray"
    assert cfg.num_workers == expect["workers"] and bool(cfg.use_gpu) == expect["gpu"]
    assert cfg.workload in workload_names()


def test_submit_script_uploads_a_config_file_as_the_jobs_working_dir(tmp_path):
    from ray.dashboard.modules.job.cli import submit

    config = tmp_path / "mine.yaml"
    config.write_text("steps: 7\n")
    argv = dry_run(tmp_path, OSFN_CONFIG=str(config), RAY_ADDRESS="http://head:8265")
    params = submit.make_context("submit", argv[3:]).params
    assert params["address"] == "http://head:8265" and params["working_dir"]
    entry = list(params["entrypoint"])
    assert entry[entry.index("--config") + 1] == "train.yaml"  # relative: the job runs in the working dir


def test_submit_script_documents_ray_auth_mode():
    text = SUBMIT.read_text()
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_MODE=disabled" in text and "RAY_AUTH_TOKEN" in text


# --- Prometheus ---------------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


@needs_promtool
def test_local_prometheus_config_passes_promtool():
    out = subprocess.run([PROMTOOL, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_local_prometheus_config_scrapes_the_training_and_curvature_ports():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    targets = {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]] for job in config["scrape_configs"]}
    assert targets["osfn-train"] == ["localhost:9401", "localhost:9402"]  # default 2 workers, 9401 + local rank
    assert targets["osfn-curvature"] == [f"localhost:{values['curvatureService']['metricsPort']}"]


@needs_promtool
def test_kubernetes_prometheus_config_passes_promtool_apart_from_discovery(tmp_path):
    # Debian's promtool is built without Kubernetes discovery; swap it for a static target so that
    # everything else (relabel rules, regexes, intervals) is still checked by the real parser.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
        job["static_configs"] = [{"targets": ["localhost:1"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _meta_label(prefix: str, key: str) -> str:
    return prefix + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def discovered_targets(job_config: dict, pod: dict, namespace: str = "default") -> list[str]:
    """Which container ports of ``pod`` a Prometheus pod-role job keeps: one target per port,
    with the meta labels Kubernetes discovery sets, filtered by the job's keep/drop rules."""
    kept = []
    for container in pod["spec"]["containers"]:
        for port in container.get("ports", []):
            labels = {_meta_label("__meta_kubernetes_pod_label_", k): v for k, v in pod["metadata"].get("labels", {}).items()}
            labels |= {"__meta_kubernetes_pod_container_port_name": port.get("name", ""), "__meta_kubernetes_namespace": namespace}
            keep = True
            for rule in job_config.get("relabel_configs", []):
                if rule.get("action") not in ("keep", "drop"):
                    continue
                value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
                matched = re.fullmatch(rule.get("regex", "(.*)"), value) is not None
                keep &= matched if rule["action"] == "keep" else not matched
            if keep:
                kept.append(f"{port['name']}:{port['containerPort']}")
    return kept


def chart_pods() -> dict[str, dict]:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        rendered = chart.render({}, name="osfn-dist", namespace="default")
    objs = [d for name, text in rendered.items() if not name.endswith("NOTES.txt") for d in mv.load_documents(text)]
    job = only(objs, "RayJob")
    head, *workers = copy.deepcopy(pods(job))
    # KubeRay adds ray.io/node-type to the pods it creates from these templates.
    head["metadata"]["labels"]["ray.io/node-type"] = "head"
    for worker in workers:
        worker["metadata"]["labels"]["ray.io/node-type"] = "worker"
    curvature = only(objs, "Deployment")["spec"]["template"]
    return {"head": head, "worker": workers[0], "curvature": curvature}


def test_kubernetes_prometheus_config_finds_the_pods_the_chart_creates():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    found = {(job, name): discovered_targets(jobs[job], pod) for job in jobs for name, pod in chart_pods().items()}
    assert found[("osfn-train", "head")] == []  # GPU workers never run on the head
    assert found[("osfn-train", "worker")] == ["osfn-train-0:9401"]
    assert found[("osfn-train", "curvature")] == []
    assert found[("osfn-curvature", "curvature")] == ["metrics:9400"]
    assert found[("osfn-curvature", "head")] == found[("osfn-curvature", "worker")] == []
    assert found[("ray", "head")] == found[("ray", "worker")] == ["metrics:8080"]
    assert found[("ray", "curvature")] == []


def test_kubernetes_prometheus_config_finds_the_multi_gpu_example_pods():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    (train_job,) = [j for j in config["scrape_configs"] if j["job_name"] == "osfn-train"]
    job = only(docs(DEPLOY / "rayjob" / "multi-gpu.yaml"), "RayJob")
    head, *workers = pods(job)
    assert discovered_targets(train_job, head) == []
    for pod in workers:
        assert discovered_targets(train_job, pod) == [f"osfn-train-{r}:{9401 + r}" for r in range(4)]


# --- Grafana provisioning -----------------------------------------------------------------------


def test_grafana_datasource_points_at_prometheus_with_a_fixed_uid():
    provisioning = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "osfn-prometheus.yaml").read_text())
    assert provisioning["apiVersion"] == 1
    (source,) = provisioning["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["isDefault"] is True
    assert re.fullmatch(r"https?://[^/]+:9090/?", source["url"])


def test_grafana_dashboard_provider_path_is_where_the_guide_mounts_the_dashboard():
    provisioning = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "osfn.yaml").read_text())
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    mounts = re.findall(r'-v "\$PWD/([^:]+):([^:]+):ro"', README.read_text())
    targets = {src: dst for src, dst in mounts}
    dashboard = "deploy/grafana/osfn-dashboard.json"
    assert (ROOT / dashboard).is_file()
    assert Path(targets[dashboard]).parent == Path(provider["options"]["path"])
    for src in ("deploy/grafana/provisioning/datasources", "deploy/grafana/provisioning/dashboards"):
        assert targets[src].startswith("/etc/grafana/provisioning/") and (ROOT / src).is_dir()
    assert targets["deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


# --- the guide ----------------------------------------------------------------------------------


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_guide_has_the_run_on_a_gpu_cluster_section():
    assert re.search(r"^## Run on a GPU cluster$", README.read_text(), re.M)


def test_every_repository_path_in_the_guide_exists():
    text = README.read_text()
    paths = set(re.findall(r"\b((?:deploy|helm|docker|tests)/[\w./-]*\w)", text))
    assert {"deploy/rayjob/cpu-smoke.yaml", "deploy/rayjob/multi-gpu.yaml", "helm/osfn-dist"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []


def test_the_guides_values_and_set_flags_pass_the_chart_schema_crds_and_train_config(tmp_path):
    import helm_python as helm

    (values_text,) = [b for b in readme_blocks("yaml") if b.startswith("# my-values.yaml")]
    values = yaml.safe_load(values_text)
    commands = " ".join(readme_blocks("bash")).replace("\\\n", " ")
    for expression in re.findall(r"--set (\S+)", commands):
        values = helm_merge(values, helm.parse_set_string(expression))
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="osfn-dist", namespace="ml")
    objs = [d for name, text in rendered.items() if not name.endswith("NOTES.txt") for d in mv.load_documents(text)]
    job = only(objs, "RayJob")
    assert mv.ray_errors(job) == []
    (config_map,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-train-config")]
    (config_text,) = config_map["data"].values()
    cfg = resolve_train_config(shlex.split(job["spec"]["entrypoint"]), config_text, tmp_path)
    assert cfg.workload in workload_names() and cfg.num_workers == 8 and cfg.use_gpu
    # Names the guide tells the reader to type are the names the chart creates.
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("RayJob", "osfn-dist") in names and f"get rayjob {job['metadata']['name']}" in README.read_text()
    assert ("Secret", "osfn-dist-curvature-token") in names
    assert ("Service", "osfn-dist-curvature") in names
    assert {"ServiceMonitor", "PodMonitor"} <= {kind for kind, _ in names}


def helm_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = helm_merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def test_the_guides_smoke_install_renders_with_its_values_file():
    import helm_python as helm

    commands = " ".join(readme_blocks("bash")).replace("\\\n", " ")
    files = re.findall(r"-f (helm/osfn-dist/ci/\S+)", commands)
    assert files
    with helm.Chart.load(CHART) as chart:
        for values_file in files:
            values = yaml.safe_load((ROOT / values_file).read_text())
            rendered = chart.render(values, name="smoke", namespace="ml")
            assert "name: smoke-osfn-dist\n" in rendered["osfn-dist/templates/rayjob.yaml"]
    assert "get rayjob smoke-osfn-dist" in README.read_text()


def test_guide_explains_ray_auth_mode():
    text = README.read_text()
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_MODE=disabled" in text and "ray.auth.mode" in text
