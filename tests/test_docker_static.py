"""docker/Dockerfile and .dockerignore, checked without a Docker engine.

There is no engine on CI or dev machines, so the image is kept honest statically: the base image is
pinned and agrees with pyproject.toml, the pinned packages satisfy pyproject's requirements, the
image runs as a non-root user, its command exists in the package, the build context carries
everything `pip install .` needs and nothing heavy, and the ports agree with the Helm chart.
"""
from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def args_defaults() -> dict[str, str]:
    out = {}
    for name, rest in instructions():
        if name == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            out[key] = value.strip('"')
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_requirements() -> dict[str, Requirement]:
    """Every requirement pyproject.toml states, by package name (base deps and every extra)."""
    project = pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    out: dict[str, list[Requirement]] = {}
    for req in reqs:
        out.setdefault(req.name.lower(), []).append(req)
    return out


def image_pins() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: the image pins exact versions"
            pins[req.name.lower()] = Version(spec.version)
    return pins


def base_image() -> str:
    (from_args,) = [rest for name, rest in instructions() if name == "FROM"]
    image = from_args.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args_defaults()[m.group(1)], image)


def test_base_image_is_pinned_to_the_ray_and_python_of_pyproject():
    image = base_image()
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray" and tag and "latest" not in tag
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", tag.split("@")[0])
    assert match, f"{tag}: expected <ray version>-py3XX-<cuda flavour>"
    ray_version, major, minor, flavour = match.groups()
    assert ray_version == str(image_pins()["ray"])
    (ray_req,) = project_requirements()["ray"]
    assert str(ray_req.specifier) == f"=={ray_version}", "the base image must carry exactly pyproject's Ray"
    python = f"{major}.{minor}"
    assert Version(python) in SpecifierSet(pyproject()["project"]["requires-python"])
    runs = " ".join(rest for name, rest in instructions() if name == "RUN")
    assert f"sys.version_info[:2] == ({major}, {minor})" in runs, "the build checks the Python it was tagged for"
    assert flavour == "gpu" or flavour.startswith("cu"), "a CUDA base image"


def test_image_pins_satisfy_pyproject():
    requirements = project_requirements()
    pins = image_pins()
    assert {"torch", "ray"} <= pins.keys()
    for name, version in pins.items():
        assert name in requirements, f"{name} is pinned in the image but not a dependency in pyproject.toml"
        for req in requirements[name]:
            assert version in req.specifier, f"{name}=={version} violates pyproject's {req}"


def test_the_build_checks_cuda_torch_and_the_same_ray_it_pins():
    runs = " ".join(rest for name, rest in instructions() if name == "RUN")
    assert re.search(r"assert torch\.version\.cuda\b", runs), "the build must fail on a CPU-only torch wheel"
    for version in re.findall(r'ray\.__version__ == "([^"]+)"', runs):
        assert version == str(image_pins()["ray"])
    assert "--constraint" in runs and "constraints.txt" in runs
    assert "+cpu" not in DOCKERFILE.read_text() and "whl/cpu" not in DOCKERFILE.read_text()


def test_image_installs_the_package_with_extras_that_exist():
    extras = args_defaults()["OSFN_EXTRAS"].split(",")
    assert set(extras) <= set(pyproject()["project"]["optional-dependencies"])
    runs = [rest for name, rest in instructions() if name == "RUN"]
    assert any("pip install" in r and "[${OSFN_EXTRAS}]" in r for r in runs)


def test_image_runs_as_a_numeric_non_root_user():
    users = [rest for name, rest in instructions() if name == "USER"]
    assert users, "no USER: the image would run as the base image's user, unchecked"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric uid so Kubernetes runAsNonRoot can verify it"
    assert gid.isdigit()


def test_default_command_is_a_console_script_of_the_package():
    (cmd,) = [rest for name, rest in instructions() if name == "CMD"]
    argv = yaml.safe_load(cmd)  # exec form is a JSON array
    assert isinstance(argv, list), "exec-form CMD (no shell wrapper, signals reach the process)"
    target = pyproject()["project"]["scripts"][argv[0]]
    module, func = target.split(":")
    source = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(source.read_text())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not [rest for name, rest in instructions() if name == "ENTRYPOINT"], (
        "KubeRay sets the container command to `ray start`; an ENTRYPOINT would be prepended to it"
    )


def test_exposed_ports_match_the_chart_and_the_service_defaults():
    exposed = {int(p) for name, rest in instructions() if name == "EXPOSE" for p in rest.split()}
    values = yaml.safe_load((ROOT / "helm" / "osfn-dist" / "values.yaml").read_text())
    helpers = (ROOT / "helm" / "osfn-dist" / "templates" / "_helpers.tpl").read_text()
    train_port = int(re.search(r'define "osfn-dist.trainMetricsPort" -}}(\d+)', helpers).group(1))
    wanted = {values["curvatureService"]["port"], values["curvatureService"]["metricsPort"], train_port}
    wanted |= {6379, 8265, 10001, 8080}  # Ray: GCS, dashboard/job API, client, metrics
    assert wanted <= exposed


# --- .dockerignore ------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    # Docker's matcher: Go filepath.Match per path segment, plus `**` for any number of segments.
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out += pattern[i : j + 1]
            i = j + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the context: the last matching rule wins, and a rule
    matches a path when it matches the path or one of its parent directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negate, regex in dockerignore_rules():
        if any(regex.match(p) for p in prefixes):
            verdict = not negate
    return verdict


def test_dockerignore_matcher_follows_docker_rules():
    # The allow-list idiom this file relies on: exclude everything, re-include folders, then drop
    # build leftovers inside them.
    assert excluded(".venv/bin/python")
    assert not excluded("osfn_dist/cli.py")
    assert excluded("osfn_dist/__pycache__/cli.cpython-311.pyc")


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "osfn_dist/__init__.py", "osfn_dist/cli.py", "osfn_dist/py.typed", "docker/constraints.txt", "proto/osfn/v1/x.proto"],
)
def test_build_context_keeps_what_the_build_reads(path):
    assert not excluded(path)


def test_build_context_keeps_the_readme_pyproject_names():
    readme = pyproject()["project"].get("readme")
    if isinstance(readme, dict):
        readme = readme.get("file")
    assert readme and not excluded(readme)


def test_build_context_keeps_every_file_the_dockerfile_copies():
    for name, rest in instructions():
        if name == "COPY":
            sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            for source in sources:
                assert not excluded(source), f"COPY {source} but .dockerignore drops it"


@pytest.mark.parametrize(
    "path", [".venv/lib/python3.11/site.py", ".git/HEAD", "runs/x/ckpt.pt", ".ci-work/tmp/ray", "bench-out/a.png", "tests/test_x.py", "osfn_dist.egg-info/PKG-INFO"]
)
def test_build_context_drops_heavy_and_local_files(path):
    assert excluded(path)


def test_every_package_file_reaches_the_build_context():
    files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "osfn_dist").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files and not [f for f in files if excluded(f)]
