"""docker-compose.yml cannot run here (no Docker engine); keep it consistent with the code."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
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
