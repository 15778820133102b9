"""docker-compose.yml cannot run here (no Docker engine); keep it consistent with the code."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli_parser import build_parser
from pipeline.config import ENV_PREFIX, load_settings

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _supcon_services(compose: dict) -> dict[str, dict]:
    return {
        n: s
        for n, s in compose["services"].items()
        if s.get("image", "").startswith("supcon-stream")
    }


def test_expected_services(compose):
    services = set(compose["services"])
    assert {
        "kafka",
        "redis",
        "topics",
        "sidecar",
        "learner-supcon",
        "learner-ce",
        "replay",
        "serve",
    } <= services


def test_serve_reads_the_bundles_the_supcon_learner_exports(compose):
    services = compose["services"]
    settings = load_settings(ROOT / "configs" / "compose.yaml", environ={})
    models = str(settings.export.dir)
    assert settings.export.every_checkpoints > 0
    assert f"models:{models}" in services["learner-supcon"]["volumes"]
    assert f"models:{models}:ro" in services["serve"]["volumes"]
    assert services["serve"]["environment"]["SUPCON_STREAM__SERVE__LEARNER"] == "supcon"


def test_redis_persists_with_aof(compose):
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_kafka_is_kraft_and_advertises_what_the_config_uses(compose):
    env = compose["services"]["kafka"]["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"]
    settings = load_settings(ROOT / "configs" / "compose.yaml", environ={})
    host, port = settings.kafka.bootstrap_servers.split(":")
    assert f"PLAINTEXT://{host}:{port}" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert f"{port}:{port}" in compose["services"]["kafka"]["ports"]
    assert settings.redis.url.startswith("redis://redis:6379")


def test_every_service_command_parses_and_its_config_loads(compose):
    parser = build_parser()
    services = _supcon_services(compose)
    assert services
    for name, svc in services.items():
        command = svc["command"]
        if isinstance(command, str):
            command = shlex.split(command)
        args = parser.parse_args(command)
        assert args.config == Path("configs/compose.yaml"), name
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        assert all(k.startswith(ENV_PREFIX) for k in env), name
        settings = load_settings(ROOT / args.config, environ=env)  # unknown keys would raise
        if name.startswith("learner-"):
            assert settings.learner_name == name.removeprefix("learner-")
            assert settings.train.objective == settings.learner_name


def test_learners_keep_checkpoints_on_a_volume(compose):
    settings = load_settings(ROOT / "configs" / "compose.yaml", environ={})
    for name in ("learner-supcon", "learner-ce"):
        mounts = compose["services"][name]["volumes"]
        targets = [m.split(":")[1] for m in mounts]
        assert any(str(settings.checkpoint.dir).startswith(t) for t in targets), name


# ---- monitoring stack (issue: Prometheus, Alertmanager, Grafana, healthchecks, GPU) --------

DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose not installed (make system-deps)"
)


@needs_compose
@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]]
)
def test_docker_compose_config_validates(files: list[str]) -> None:
    """Debian's docker-compose 1.29 validates the file (and the GPU override) without an engine."""
    assert DOCKER_COMPOSE is not None
    args = [a for f in files for a in ("-f", f)]
    done = subprocess.run(
        [DOCKER_COMPOSE, *args, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_monitoring_services_and_their_files(compose):
    services = compose["services"]
    assert {"prometheus", "alertmanager", "grafana"} <= set(services)
    for name in ("prometheus", "alertmanager", "grafana"):
        for mount in services[name].get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)


def test_prometheus_scrapes_the_ports_the_services_serve(compose):
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    by_name = {j["job_name"]: j for j in scrape["scrape_configs"]}
    jobs = {
        n: j["static_configs"][0]["targets"] for n, j in by_name.items() if "static_configs" in j
    }
    settings = load_settings(ROOT / "configs" / "compose.yaml", environ={})
    learners = [n for n in compose["services"] if n.startswith("learner-")]
    assert sorted(jobs["supcon-learner"]) == sorted(
        f"{n}:{settings.health.http_port}" for n in learners
    )
    assert jobs["supcon-sidecar"] == [f"sidecar:{settings.sidecar.http_port}"]
    # serve scales (--scale serve=N): every replica the service name resolves to.
    (serve,) = by_name["supcon-serve"]["dns_sd_configs"]
    assert serve["names"] == ["serve"]
    assert serve["port"] == settings.serve.http_port
    assert scrape["rule_files"] == ["alerts.yml"]


def test_learners_and_sidecar_have_healthchecks_on_their_ports(compose):
    settings = load_settings(ROOT / "configs" / "compose.yaml", environ={})
    ports = {"sidecar": settings.sidecar.http_port, "serve": settings.serve.http_port}
    ports.update({n: settings.health.http_port for n in compose["services"] if "learner-" in n})
    for name, port in ports.items():
        test = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in test, name


def test_gpu_override_reserves_a_gpu_for_each_learner():
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    for name, svc in gpu["services"].items():
        assert name.startswith("learner-")
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert svc["environment"]["SUPCON_STREAM__TRAIN__DEVICE"] == "cuda"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_compose_prometheus_config_is_valid():
    done = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"],
        cwd=ROOT / "deploy" / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed")
def test_compose_alertmanager_config_is_valid():
    done = subprocess.run(
        ["amtool", "check-config", "alertmanager.yml"],
        cwd=ROOT / "deploy" / "alertmanager",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
