"""deploy/: the compose, Prefect, Helm and Kubernetes files parse, and every command, path and name they use exists.

gradprune and mlflow commands are checked against their click command trees (sub-commands and options); prefect
commands against `prefect ... --help`; entry points against the flows they name; the GPU job template's placeholders
against its declared variables.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
from pathlib import Path

import pytest
import typer
import yaml
from mlflow.cli import cli as mlflow_cli
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from gradprune_mlflow.cli import app

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TOOLS = ("gradprune", "prefect", "mlflow")


def load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def commands_in(command) -> list[list[str]]:
    """The gradprune/prefect/mlflow invocations in a compose or Kubernetes command (a list, or a shell script)."""
    if isinstance(command, list) and command and command[0] in TOOLS:
        return [command]
    script = " ".join(command) if isinstance(command, list) else command
    found = []
    for part in re.split(r"&&|\|\||;|\n", script):
        words = [w for w in shlex.split(part) if not re.match(r"^\d?>", w)]
        while words and words[0] in ("until", "do", "then", "!"):
            words = words[1:]
        if words and words[0] in TOOLS:
            found.append(words)
    return found


def check_click(root, words: list[str]) -> None:
    """Fail unless `words` (after the program name) names a sub-command of `root` and only options it has."""
    command, rest = root, words[1:]
    # Duck-typed: recent typer carries its own copy of click, whose groups are not click.Group.
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        assert rest[0] in command.commands, f"{' '.join(words)}: no sub-command {rest[0]!r}"
        command, rest = command.commands[rest[0]], rest[1:]
    known = {opt for param in command.params for opt in param.opts}
    for word in rest:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{' '.join(words)}: {word.split('=')[0]} is not an option"


def all_commands() -> list[list[str]]:
    compose = load("docker-compose.yml")
    found = [c for svc in compose["services"].values() for key in ("command", "entrypoint") if key in svc
             for c in commands_in(svc[key])]
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / "receiver.yaml").read_text()):
        if doc["kind"] == "Deployment":
            found += [c for ctr in doc["spec"]["template"]["spec"]["containers"] for c in commands_in(ctr["command"])]
    return found


def test_every_gradprune_and_mlflow_command_exists():
    commands = all_commands()
    ours = [c for c in commands if c[0] == "gradprune"]
    assert {" ".join(c[:3]) for c in ours} >= {"gradprune webhook serve", "gradprune webhook register"}
    for words in ours:
        check_click(typer.main.get_command(app), words)
    for words in (c for c in commands if c[0] == "mlflow"):
        check_click(mlflow_cli, words)


@pytest.mark.slow
def test_every_prefect_command_exists():
    commands = [c for c in all_commands() if c[0] == "prefect"]
    assert {"server", "worker", "deploy"} <= {w for c in commands for w in c[1:3]}
    prefect = Path(sys.executable).parent / "prefect"

    def helps(words):
        rest = words[1:]
        while rest and rest[0].startswith("-"):  # global options such as --no-prompt
            rest = rest[1:]
        path = []
        for word in rest[:2]:  # the sub-command path ends at the first option
            if word.startswith("-"):
                break
            path.append(word)
        return subprocess.run([str(prefect), *path, "--help"], capture_output=True, text=True, timeout=300)

    distinct = {tuple(c): c for c in commands}.values()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(helps, distinct))
    for words, result in zip(distinct, results, strict=True):
        assert result.returncode == 0, f"{' '.join(words)}: {result.stderr[-300:]}"
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in result.stdout, f"{' '.join(words)}: {word} is not an option"


def test_compose_builds_from_the_repository_and_mounts_files_that_exist():
    compose = load("docker-compose.yml")
    services = compose["services"]
    assert {"postgres", "s3", "mlflow", "prefect-server", "worker", "receiver"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (DEPLOY / svc["build"]["context"]).resolve()
            assert context == REPO and (context / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            if volume.startswith("."):
                assert (DEPLOY / volume.split(":")[0]).exists(), f"{name}: {volume}"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https"
    assert mlflow_env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    assert "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY" in mlflow_env


def test_the_dockerfile_copies_what_exists_and_works_where_prefect_yaml_pulls():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), source
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    pulls = [step for d in load("prefect.yaml")["deployments"] for step in d.get("pull") or []]
    assert pulls and {s["prefect.deployments.steps.set_working_directory"]["directory"] for s in pulls} == {workdir}


def test_prefect_yaml_names_real_flows_triggers_and_deployments():
    from gradprune_flows.deployments import model_version_trigger

    config = load("prefect.yaml")
    deployments = {d["name"]: d for d in config["deployments"]}
    flow_names = {}
    for name, d in deployments.items():
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file(), path
        flow = getattr(import_module(path.removesuffix(".py").replace("/", ".")), func)
        flow_names[name] = flow.name
        for trigger in d.get("triggers", []):
            parsed = DeploymentEventTrigger.model_validate({k: v for k, v in trigger.items() if k != "type"})
            ours = model_version_trigger()
            assert (parsed.expect, parsed.match, parsed.parameters) == (ours.expect, ours.match, ours.parameters)
        target = d.get("parameters", {}).get("dispatch")
        if target:
            flow_name, deployment = target.split("/")
            assert deployment in deployments, target
            assert deployments[deployment]["work_pool"]["name"] == d["work_pool"]["name"]
            assert d["schedules"][0]["interval"] == 600
    for name, flow_name in flow_names.items():
        for d in deployments.values():
            target = d.get("parameters", {}).get("dispatch", "")
            if target.endswith(f"/{name}"):
                assert target == f"{flow_name}/{name}"
    pools = {d["work_pool"]["name"] for d in deployments.values()}
    assert pools == {"gradprune-process", "gradprune-k8s"}
    compose_worker = load("docker-compose.yml")["services"]["worker"]["command"]
    assert compose_worker[compose_worker.index("--pool") + 1] == "gradprune-process"
    assert load("k8s/prefect-worker-values.yaml")["worker"]["config"]["workPool"] == "gradprune-k8s"


def test_the_gpu_job_template_asks_for_a_gpu_and_declares_every_variable_it_uses():
    template = json.loads((DEPLOY / "k8s" / "gpu-job-template.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_the_receiver_service_selects_the_receiver_pods():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "receiver.yaml").read_text())}
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= pod_labels.items()
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    port = container["command"][container["command"].index("--port") + 1]
    assert container["ports"][0]["containerPort"] == int(port)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("name", ["docker-compose.yml", "prefect.yaml", "k8s/prefect-worker-values.yaml"])
def test_yaml_files_parse_to_mappings(name):
    assert isinstance(load(name), dict)
