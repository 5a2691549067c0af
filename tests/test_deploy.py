"""The deployment files in ``deploy/``, checked against the code they deploy.

No Docker engine or cluster here: the Dockerfiles are parsed and their entrypoint
command line is run in this virtual environment; Compose files and Kubernetes
manifests are parsed, the overlays rendered (a small strategic-merge below, the
subset of Kustomize the overlays use) and validated against the Kubernetes API
schemas; nginx's configuration goes through ``nginx -t`` when nginx is installed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tei_manager.config import ENV_OVERRIDES, ManagerConfig, parse_config

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
COMPOSE = DEPLOY / "compose"
KUBE = DEPLOY / "kubernetes"
DEFAULTS = ManagerConfig()
ENV_VARS = {var for var, _, _ in ENV_OVERRIDES} | {"TEI_MANAGER_CONFIG"}
KUBERNETES_VERSION = "1.33.0"
PROBES = {
    "startupProbe": "/health/startup",
    "livenessProbe": "/health/live",
    "readinessProbe": "/health/ready",
}


# --- Dockerfiles ------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _json_arg(stage: list[tuple[str, str]], word: str) -> list[str]:
    (value,) = [rest for w, rest in stage if w == word]
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{word} must be exec form"
    return [str(p) for p in parsed]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_the_images_run_the_manager_as_a_non_root_user_under_tini(name: str) -> None:
    steps = _instructions(DOCKER / name)
    assert sum(word == "FROM" for word, _ in steps) >= 2, "multi-stage"
    stage = _final_stage(DOCKER / name)
    words = [word for word, _ in stage]
    user = [rest for word, rest in stage if word == "USER"]
    assert user and not user[-1].startswith(("root", "0")), user
    assert _json_arg(stage, "ENTRYPOINT")[:3] == ["/usr/bin/tini", "-g", "--"]
    assert _json_arg(stage, "ENTRYPOINT")[3:] + _json_arg(stage, "CMD")[:1] == [
        "tei-manager",
        "serve",
    ]
    (health,) = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert f"127.0.0.1:{DEFAULTS.api_port}/health/live" in health
    (volume,) = [rest for word, rest in stage if word == "VOLUME"]
    env = _env(stage)
    assert set(json.loads(volume)) == {"/data", "/models"}
    assert Path(env["TEI_MANAGER_STATE_FILE"]).parent == Path("/data")
    assert Path(env["TEI_MANAGER_LOG_DIR"]).parent == Path("/data")
    assert env["HF_HOME"] == "/models"
    # The manager and TEI read the same cache (TEI's image points its name at /data).
    assert env["HF_HUB_CACHE"] == env["HUGGINGFACE_HUB_CACHE"] == "/models/hub"
    assert env["TEI_MANAGER_CONFIG"] == "/etc/tei-manager/config.toml"
    labels = " ".join(rest for word, rest in stage if word == "LABEL")
    for label in ("title", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels
    exposed = {int(p) for word, rest in stage if word == "EXPOSE" for p in rest.split()}
    assert exposed == {DEFAULTS.api_port, DEFAULTS.grpc_port}
    assert "tini" in " ".join(rest for word, rest in stage if word == "RUN")
    assert "COPY" in words


def test_the_gpu_image_is_built_on_teis_grpc_image() -> None:
    steps = _instructions(DOCKER / "Dockerfile.gpu")
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for w, rest in steps
        if w == "ARG" and "=" in rest
    }
    image = args["TEI_IMAGE"]
    assert image.startswith("ghcr.io/huggingface/text-embeddings-inference:")
    assert image.endswith("-grpc"), "only the -grpc images serve tei.v1 over gRPC"
    assert _final_stage(DOCKER / "Dockerfile.gpu")[0] == ("FROM", "${TEI_IMAGE}")
    assert "command -v text-embeddings-router" in (DOCKER / "Dockerfile.gpu").read_text()


def test_the_cpu_image_pins_torch_as_the_readme_does() -> None:
    readme_pin = re.search(r"torch==([0-9.]+)", (ROOT / "README.md").read_text())
    assert readme_pin is not None
    assert f"ARG TORCH_VERSION={readme_pin[1]}" in (DOCKER / "Dockerfile.cpu").read_text()
    assert '".[worker,otel]"' in (DOCKER / "Dockerfile.cpu").read_text()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_what_the_build_stage_copies_is_enough_to_build_the_package(
    name: str, tmp_path: Path
) -> None:
    """The build stage's ``COPY`` lines (not ``--from``) give pip a buildable project."""
    steps = _instructions(DOCKER / name)
    copies = [rest.split() for word, rest in steps if word == "COPY" and "--from" not in rest]
    context = tmp_path / "context"
    context.mkdir()
    for *sources, _target in copies:
        for source in sources:
            if source.startswith("deploy/"):
                continue  # the runtime stage's config file
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(
                    path, context / source, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(path, context / source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("tei_manager-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "tei_manager/cli.py" in names and "tei_manager/_proto/tei/v1/tei_pb2.py" in names


def test_the_image_config_is_valid_and_the_managers_defaults() -> None:
    config = parse_config((DOCKER / "config.toml").read_bytes(), env={"HOME": "/data"})
    for field in ("api_port", "grpc_port", "instance_port_start", "instance_port_end"):
        assert getattr(config, field) == getattr(DEFAULTS, field), field


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status)
    except OSError:
        return 0


def test_the_cpu_images_entrypoint_starts_serves_live_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """ENTRYPOINT + CMD as Docker would run them, with the image's ENV, paths moved
    under ``tmp_path``; tini is left out when it is not installed here."""
    stage = _final_stage(DOCKER / "Dockerfile.cpu")
    argv = _json_arg(stage, "ENTRYPOINT") + _json_arg(stage, "CMD")
    tini = shutil.which("tini")
    if tini is None:
        argv = argv[argv.index("--") + 1 :]
    else:
        argv[0] = tini
    # The console script of this environment, importing this checkout.
    script = Path(sys.executable).parent / argv[0]
    argv[0] = str(script) if script.exists() else argv[0]
    if not script.exists():
        argv[:1] = [sys.executable, "-m", "tei_manager"]
    moved = {
        "/data": str(tmp_path / "data"),
        "/models": str(tmp_path / "models"),
        "/etc/tei-manager/config.toml": str(DOCKER / "config.toml"),
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith("TEI_")}
    for key, value in _env(stage).items():
        if key == "PATH":
            continue
        for old, new in moved.items():
            value = value.replace(old, new) if value.startswith(old) else value
        env[key] = value
    api, grpc = _free_port(), _free_port()
    start = _free_port()
    env.update(
        TEI_MANAGER_API_PORT=str(api),
        TEI_MANAGER_GRPC_PORT=str(grpc),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    # Ports of the range are not touched: no instance is configured.
    del start
    process = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{api}/health/live") != 200:
            assert process.poll() is None, process.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "never live"
            time.sleep(0.2)
        # The HEALTHCHECK's own command, pointed at this port.
        (health,) = [rest for word, rest in stage if word == "HEALTHCHECK"]
        check = json.loads(health[health.index("CMD") + 3 :].strip())
        check = [sys.executable if part == "python" else part for part in check]
        check = [part.replace(f":{DEFAULTS.api_port}/", f":{api}/") for part in check]
        assert subprocess.run(check, env=env, timeout=30).returncode == 0
        assert _get(f"http://127.0.0.1:{api}/health/ready") == 200
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
        assert process.returncode == 0, output[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (tmp_path / "data" / "state.toml").exists(), "state on the /data volume"
    assert json.loads(output.splitlines()[-1])["message"] == "shutdown complete"


# --- Compose ----------------------------------------------------------------------


def _compose(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((COMPOSE / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def _config_mount(service: dict[str, Any]) -> Path:
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if target == service["environment"]["TEI_MANAGER_CONFIG"]:
            return COMPOSE / source
    raise AssertionError("no config file mounted where TEI_MANAGER_CONFIG points")


@pytest.mark.parametrize("name", ["compose.yaml", "compose.mtls.yaml"])
def test_compose_runs_the_manager_with_its_ports_volumes_and_config(name: str) -> None:
    service = _compose(name)["services"]["tei-manager"]
    env = service["environment"]
    assert set(env) - {"HF_HOME", "HF_TOKEN"} <= ENV_VARS
    config = parse_config(_config_mount(service).read_bytes(), env={"HOME": "/data"})
    assert (config.api_port, config.grpc_port) == (DEFAULTS.api_port, DEFAULTS.grpc_port)
    targets = {v.split(":")[1] for v in service["volumes"]}
    assert Path(env["TEI_MANAGER_STATE_FILE"]).parent.as_posix() in targets
    assert Path(env["TEI_MANAGER_LOG_DIR"]).parent.as_posix() in targets
    assert env["HF_HOME"] in targets
    assert service["restart"] == "unless-stopped"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    grace = float(service["stop_grace_period"].rstrip("s"))
    assert grace > config.graceful_shutdown_timeout_secs
    assert "/health/live" in " ".join(service["healthcheck"]["test"])
    published = service.get("ports", [])
    if name == "compose.yaml":
        assert published == [
            f"{config.api_port}:{config.api_port}",
            f"{config.grpc_port}:{config.grpc_port}",
        ]
    else:
        assert published == [], "behind nginx the manager's ports are not published"
    # Instance ports stay inside the container: instances listen on loopback.
    for port in published:
        assert not config.instance_port_start <= int(port.split(":")[0]) <= config.instance_port_end


def test_the_mtls_variant_trusts_exactly_nginx_and_requires_its_header() -> None:
    compose = _compose("compose.mtls.yaml")
    service = compose["services"]["tei-manager"]
    config = parse_config(_config_mount(service).read_bytes(), env={"HOME": "/data"})
    auth = config.auth
    assert auth.enabled and auth.providers == ("mtls",) and auth.require_cert_headers
    nginx_ip = compose["services"]["nginx"]["networks"]["tei"]["ipv4_address"]
    assert auth.trusted_proxies == (f"{nginx_ip}/32",)
    assert auth.mtls is not None and auth.mtls.ca_cert is not None
    mounted = {v.split(":")[1] for v in service["volumes"]}
    assert auth.mtls.ca_cert in mounted
    nginx = _compose("compose.mtls.yaml")["services"]["nginx"]
    assert nginx["ports"] == ["443:443"]


def _nginx_conf() -> str:
    return (COMPOSE / "nginx.conf").read_text()


def test_nginx_verifies_clients_and_forwards_the_certificate_as_the_manager_reads_it() -> None:
    conf = _nginx_conf()
    assert re.search(r"ssl_verify_client\s+on;", conf)
    # The header the auth layer reads (api/auth.py, multiplexer/auth.py), with the
    # variable whose URL-escaped PEM auth.certs.parse_cert_header decodes.
    rest_auth = (ROOT / "tei_manager" / "api" / "auth.py").read_text()
    assert '"X-SSL-Client-Cert"' in rest_auth
    assert re.search(r"proxy_set_header\s+X-SSL-Client-Cert\s+\$ssl_client_escaped_cert;", conf)
    assert re.search(r"grpc_set_header\s+X-SSL-Client-Cert\s+\$ssl_client_escaped_cert;", conf)
    assert "server tei-manager:9000;" in conf and "server tei-manager:9001;" in conf
    assert "grpc_pass grpc://tei_grpc;" in conf


def test_the_header_nginx_sends_is_the_one_the_authenticator_accepts(tmp_path: Path) -> None:
    """``$ssl_client_escaped_cert`` is the URL-escaped PEM; parse it as the manager does."""
    from tei_manager.auth.certs import parse_cert_header
    from tests.auth_pki import make_pki

    pki = make_pki(tmp_path)
    assert parse_cert_header(pki["allowed"].header) == pki["allowed"].cert


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    from tests.auth_pki import make_pki

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    conf = _nginx_conf()
    conf = conf.replace("/etc/nginx/pki/server.key", str(pki.server_key))
    conf = conf.replace("/etc/nginx/pki/", f"{pki.directory}/")
    conf = conf.replace("tei-manager:", "127.0.0.1:").replace(
        "/tmp/nginx.pid", str(tmp_path / "pid")
    )
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    assert found is not None, version
    if tuple(map(int, found.groups())) < (1, 25, 1):
        # "http2 on" arrived in 1.25.1; older nginx spells it on the listen line.
        conf = conf.replace("listen 443 ssl;\n        http2 on;", "listen 443 ssl http2;")
    conf = f"error_log {tmp_path / 'error.log'};\n" + conf
    (tmp_path / "nginx.conf").write_text(conf)
    (tmp_path / "logs").mkdir()
    result = subprocess.run(
        [
            "nginx",
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-e",
            str(tmp_path / "error.log"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes -------------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as Kustomize does it for what our patches touch: maps merge,
    lists of maps with a ``name`` merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        merged = [dict(i) for i in base]
        for item in patch:
            match = [i for i, old in enumerate(merged) if old["name"] == item["name"]]
            if match:
                merged[match[0]] = _merge(merged[match[0]], item)
            else:
                merged.append(item)
        return merged
    return copy.deepcopy(patch)


def _render(directory: Path) -> list[dict[str, Any]]:
    """The resources of a kustomization: ``resources``, ``namespace``, ``images`` and
    ``patches`` (strategic merge, matched by kind and name)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
    assert set(kustomization) <= known, set(kustomization) - known
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += _render(path) if path.is_dir() else _documents(path)
    for patch_ref in kustomization.get("patches", []):
        (patch,) = _documents(directory / patch_ref["path"])
        key = (patch["kind"], patch["metadata"]["name"])
        matches = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == key]
        assert len(matches) == 1, f"patch {patch_ref['path']} matches {len(matches)} resources"
        docs[matches[0]] = _merge(docs[matches[0]], patch)
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
        return []
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return containers


def _one(docs: list[dict[str, Any]], kind: str, name: str = "tei-manager") -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


OVERLAYS = ["cpu", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rendered_overlays_are_valid_kubernetes(overlay: str) -> None:
    validate = pytest.importorskip("kubernetes_validate")
    docs = _render(KUBE / "overlays" / overlay)
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
    }
    for doc in docs:
        validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_manifest_with_a_mistake_fails_validation() -> None:
    validate = pytest.importorskip("kubernetes_validate")
    deployment = _one(_render(KUBE / "overlays" / "cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(validate.ValidationError):
        validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _k8s_config(docs: list[dict[str, Any]]) -> ManagerConfig:
    data = _one(docs, "ConfigMap", "tei-manager-config")["data"]["config.toml"]
    # Key files are mounted from the Secret; parse the TOML as the manager would.
    return parse_config(data, env={"HOME": "/data"})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_probes_ports_volumes_and_grace_match_the_manager(overlay: str) -> None:
    docs = _render(KUBE / "overlays" / overlay)
    config = _k8s_config(docs)
    deployment = _one(docs, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.api_port, "grpc": config.grpc_port}
    for probe, path in PROBES.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    assert pod["terminationGracePeriodSeconds"] > config.graceful_shutdown_timeout_secs
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) - {"HF_HOME", "HOME"} <= ENV_VARS
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state_dir = str(Path(env["TEI_MANAGER_STATE_FILE"]).parent)
    assert volumes[mounts[state_dir]["name"]]["persistentVolumeClaim"]["claimName"] == (
        "tei-manager-data"
    )
    assert volumes[mounts[env["HF_HOME"]]["name"]]["persistentVolumeClaim"]
    assert mounts[env["TEI_MANAGER_CONFIG"]]["subPath"] == "config.toml"
    assert volumes[mounts[env["TEI_MANAGER_CONFIG"]]["name"]]["configMap"]["name"] == (
        "tei-manager-config"
    )
    # Every key file the config names comes from the Secret.
    secret = _one(docs, "Secret", "tei-manager-secrets")
    secret_dir = next(p for p, m in mounts.items() if volumes[m["name"]].get("secret"))
    assert config.auth.api_key is not None
    for key in config.auth.api_key.keys:
        assert key.file is not None and Path(key.file).parent == Path(secret_dir)
        assert Path(key.file).name in secret["stringData"]
    # Read-only root; everything written goes to a volume.
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {state_dir, env["HF_HOME"], "/tmp"} and env["HOME"] in writable
    assert set(config.auth.public_paths) >= set(PROBES.values())
    limits = container["resources"].get("limits", {})
    assert ("nvidia.com/gpu" in limits) == (overlay == "gpu")
    assert container["image"].endswith(f"-{overlay}")


def test_the_service_exposes_rest_and_grpc_and_never_an_instance_port() -> None:
    docs = _render(KUBE / "overlays" / "cpu")
    config = _k8s_config(docs)
    service = _one(docs, "Service")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"http": config.api_port, "grpc": config.grpc_port}
    policy = _one(docs, "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {config.api_port, config.grpc_port}
    pdb = _one(docs, "PodDisruptionBudget")
    selector = _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert service["spec"]["selector"] == selector


def test_the_service_monitor_scrapes_metrics_keeping_the_instance_label() -> None:
    (monitor,) = _render(KUBE / "monitoring")
    assert (
        monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    # Our series carry an "instance" label (the instance's name): without
    # honorLabels Prometheus would rename it exported_instance.
    assert endpoint == {**endpoint, "port": "http", "path": "/metrics", "honorLabels": True}
    service = _one(_render(KUBE / "overlays" / "cpu"), "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )


def test_the_configmap_is_the_image_default_plus_auth() -> None:
    config = _k8s_config(_render(KUBE / "base"))
    image = parse_config((DOCKER / "config.toml").read_bytes(), env={"HOME": "/data"})
    assert msgspec_fields(config, exclude={"auth"}) == msgspec_fields(image, exclude={"auth"})


def msgspec_fields(config: ManagerConfig, *, exclude: set[str]) -> dict[str, Any]:
    import msgspec

    fields = msgspec.structs.asdict(config)
    return {k: v for k, v in fields.items() if k not in exclude}


@pytest.mark.skipif(
    shutil.which("yamllint") is None and not (Path(sys.executable).parent / "yamllint").exists(),
    reason="yamllint is not installed",
)
def test_yamllint_passes() -> None:
    tool = Path(sys.executable).parent / "yamllint"
    command = [
        str(tool) if tool.exists() else "yamllint",
        "-s",
        "-c",
        str(DEPLOY / ".yamllint"),
        str(DEPLOY),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_toml_in_deploy_is_all_parseable() -> None:
    for path in DEPLOY.rglob("*.toml"):
        tomllib.loads(path.read_text())


# --- Many nodes: pools, Gateway API routes, nginx, autoscaling ------------------------

POOLS = KUBE / "pools"
GATEWAY = KUBE / "gateway"
NGINX_POOLS = DEPLOY / "nginx" / "tei-pools.conf"
GATEWAY_API = "gateway.networking.k8s.io/v1"


def _pool_members(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("StatefulSet", "DaemonSet")]


def _pool_config(docs: list[dict[str, Any]], member: dict[str, Any]) -> ManagerConfig:
    pod = member["spec"]["template"]["spec"]
    (name,) = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    data = _one(docs, "ConfigMap", name)["data"]["config.toml"]
    return parse_config(data, env={"HOME": "/data"})


def _served_by(docs: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(header, value) -> the pools' Services serving it, from the pools' own configs."""
    served: dict[tuple[str, str], set[str]] = {}
    for member in _pool_members(docs):
        service = member["metadata"]["name"]
        for seed in _pool_config(docs, member).instances:
            served.setdefault(("x-tei-model", seed.model_id), set()).add(service)
            served.setdefault(("x-tei-instance", seed.name), set()).add(service)
    return served


def test_the_pools_and_the_autoscaler_are_valid_kubernetes() -> None:
    validate = pytest.importorskip("kubernetes_validate")
    docs = _render(POOLS) + _render(KUBE / "autoscaling")
    assert {d["kind"] for d in docs} >= {
        "StatefulSet", "DaemonSet", "Service", "ConfigMap", "HorizontalPodAutoscaler",
    }  # fmt: skip
    for doc in docs:
        validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_has_no_schema_for_the_gateway_api() -> None:
    """Why the routes are checked field by field below: the Gateway API's CRDs are
    not among kubernetes-validate's schemas (its CLI only warns)."""
    validate = pytest.importorskip("kubernetes_validate")
    for doc in _render(GATEWAY):
        assert doc["apiVersion"] == GATEWAY_API
        with pytest.raises(validate.SchemaNotFoundError):
            validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_pool_members_run_as_the_single_node_deployment_with_their_configs_seeds() -> None:
    single = _render(KUBE / "overlays" / "cpu")
    (reference,) = _containers(_one(single, "Deployment"))
    base_config = _k8s_config(single)
    docs = _render(POOLS)
    members = _pool_members(docs)
    assert {m["kind"] for m in members} == {"StatefulSet", "DaemonSet"}
    for member in members:
        name = member["metadata"]["name"]
        spec = member["spec"]
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        for key in ("args", "ports", "env", "startupProbe", "livenessProbe", "readinessProbe",
                    "securityContext", "volumeMounts"):  # fmt: skip
            assert container[key] == reference[key], (name, key)
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"] == labels
        config = _pool_config(docs, member)
        # Same manager settings as the single node; only the seeds differ by pool, and
        # a member is ready (in its Services) only once they run.
        pool_only = {"instances", "ready_requires_instances"}
        assert msgspec_fields(config, exclude=pool_only) == msgspec_fields(
            base_config, exclude=pool_only
        )
        assert config.ready_requires_instances and not base_config.ready_requires_instances
        assert len(config.instances) >= 2
        # A member's state is its config: /data is an emptyDir, seeded at every start.
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["data"]
        assert pod["terminationGracePeriodSeconds"] > config.graceful_shutdown_timeout_secs
        # One Service for the pool (REST, gRPC), one headless for client-side balancing.
        service = _one(docs, "Service", name)
        assert service["spec"]["selector"] == labels
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
            "http": config.api_port, "grpc": config.grpc_port,
        }  # fmt: skip
        headless = _one(docs, "Service", f"{name}-pods")
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["selector"] == labels
        # gRPC only: the ServiceMonitor (port "http") scrapes each pod once, not twice.
        assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
        if member["kind"] == "StatefulSet":
            assert spec["serviceName"] == headless["metadata"]["name"]
            claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
            assert claims == {"models"}
        else:
            assert pod["nodeSelector"]["tei-manager/pool"] == labels["tei-manager/pool"]
            assert "nvidia.com/gpu" in container["resources"]["limits"]


def test_the_gateway_routes_send_each_header_to_the_pools_serving_it() -> None:
    from tei_manager._proto.tei_multiplexer.v1 import multiplexer_grpc
    from tei_manager.api.inference import INFERENCE_PREFIXES
    from tei_manager.core.routing_key import INSTANCE_HEADER, MAX_KEY_CHARS, MODEL_HEADER

    pools = _render(POOLS)
    served = _served_by(pools)
    routes = _render(GATEWAY)
    gateway = _one(routes, "Gateway", "tei")
    (listener,) = gateway["spec"]["listeners"]
    services = {d["metadata"]["name"]: d for d in pools if d["kind"] == "Service"}
    for kind, port_name in (("HTTPRoute", "http"), ("GRPCRoute", "grpc")):
        (route,) = [d for d in routes if d["kind"] == kind]
        assert route["apiVersion"] == GATEWAY_API
        assert route["spec"]["parentRefs"] == [{"name": "tei", "sectionName": listener["name"]}]
        routed: dict[tuple[str, str], set[str]] = {}
        for rule in route["spec"]["rules"]:
            backends = set()
            for ref in rule["backendRefs"]:
                ports = {p["name"]: p["port"] for p in services[ref["name"]]["spec"]["ports"]}
                assert ref["port"] == ports[port_name], ref
                backends.add(ref["name"])
            paths = set()
            for match in rule["matches"]:
                (header,) = match["headers"]
                assert header["type"] == "Exact"
                assert header["name"] in (MODEL_HEADER, INSTANCE_HEADER)
                assert 0 < len(header["value"]) <= MAX_KEY_CHARS
                key = (header["name"], header["value"])
                assert routed.setdefault(key, backends) == backends, key
                if kind == "HTTPRoute":
                    assert match["path"]["type"] == "PathPrefix"
                    paths.add(match["path"]["value"] + "/")
                else:
                    assert match["method"] == {
                        "type": "Exact", "service": multiplexer_grpc.TeiMultiplexer.NAME,
                    }  # fmt: skip
            if kind == "HTTPRoute":
                assert paths == set(INFERENCE_PREFIXES)
        assert routed == served, kind


def _nginx_maps(conf: str) -> dict[tuple[str, str], str]:
    """(header, value) -> upstream pool of the config's two ``map`` blocks."""
    found: dict[tuple[str, str], str] = {}
    for variable, body in re.findall(r"map \$http_(x_tei_\w+) \$\w+ \{(.*?)\}", conf, re.S):
        header = variable.replace("_", "-")
        for line in body.strip().splitlines():
            key, value = line.strip().rstrip(";").split()
            if key != "default":
                found[(header, key.strip('"'))] = value
    return found


def test_nginx_routes_each_header_to_the_members_of_the_pools_serving_it() -> None:
    conf = NGINX_POOLS.read_text()
    served = _served_by(_render(POOLS))
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\}", conf, re.S))
    maps = _nginx_maps(conf)
    assert set(maps) == set(served)
    for key, pool in maps.items():
        for door, port in (("rest", 9000), ("grpc", 9001)):
            members = re.findall(r"server ([\w.-]+):(\d+)", upstreams[f"{pool}_{door}"])
            assert {int(p) for _, p in members} == {port}
            # pool-a-1.internal -> the Kubernetes pool tei-pool-a, and so on.
            pools = {"tei-" + host.rsplit("-", 1)[0] for host, _ in members}
            assert pools == served[key], (key, door)
    from tei_manager.api.inference import INFERENCE_MAX_BODY_BYTES

    assert f"client_max_body_size {INFERENCE_MAX_BODY_BYTES >> 20}m;" in conf
    # Both doors pass to the pool the header chose; a dead member is skipped.
    assert "grpc_pass grpc://${tei_pool}_grpc;" in conf
    assert "proxy_pass http://${tei_pool}_rest;" in conf
    assert re.search(r"proxy_next_upstream\s+error timeout http_503 non_idempotent;", conf)
    assert re.search(r"grpc_next_upstream\s+error timeout non_idempotent;", conf)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_pools_configuration(tmp_path: Path) -> None:
    from tests.auth_pki import make_pki

    pki = make_pki(tmp_path)
    conf = re.sub(r"pool-[ab]-\d\.internal:", "127.0.0.1:", NGINX_POOLS.read_text())
    conf = conf.replace("/etc/nginx/pki/server.pem", str(pki.server_cert))
    conf = conf.replace("/etc/nginx/pki/server.key", str(pki.server_key))
    conf = conf.replace("/tmp/nginx-tei-pools.pid", str(tmp_path / "pid"))
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    assert found is not None, version
    if tuple(map(int, found.groups())) < (1, 25, 1):
        conf = conf.replace("listen 443 ssl;\n        http2 on;", "listen 443 ssl http2;")
    (tmp_path / "nginx.conf").write_text(f"error_log {tmp_path / 'error.log'};\n" + conf)
    (tmp_path / "logs").mkdir()
    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
         "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_autoscaler_scales_a_pool_on_the_adapters_queue_depth_metric() -> None:
    docs = _render(KUBE / "autoscaling")
    hpa = _one(docs, "HorizontalPodAutoscaler", "tei-pool-a")
    adapter = _one(docs, "ConfigMap", "adapter-config")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    target = hpa["spec"]["scaleTargetRef"]
    member = _one(_render(POOLS), target["kind"], target["name"])
    assert target["apiVersion"] == member["apiVersion"] and member["kind"] == "StatefulSet"
    assert hpa["metadata"]["namespace"] == "tei-manager"
    assert adapter["metadata"]["namespace"] == "monitoring"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith("tei_manager_inference_queue_depth{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert (
        1 <= hpa["spec"]["minReplicas"] <= member["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    )
