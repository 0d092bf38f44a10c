"""Every file in clusters/ is checked here, offline: nothing is started and no cloud is called.

- Launcher configs (aws.yaml, gcp.yaml): merged with Ray's defaults and validated by the code
  `ray up` itself runs (``prepare_config`` + ``validate_config``: Ray 2.60's ray-schema.json),
  then checked for what that schema cannot see: resources that match the machines, a head with
  no GPU, GPU types on which raydag's own teacher placement fits, a setup that installs .[gpu].
- KubeRay manifests: walked against the KubeRay v1.6.2 schemas vendored in
  tests/kuberay/crds.json.gz the way the API server checks a structural schema (unknown
  fields, types, required fields, enums), errors naming the path; then checked for the
  autoscaling, GPU groups, job entrypoint and Serve config they are for.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from raydag.config import load_job
from raydag.resources import teacher_actor_resources

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
CRDS = Path(__file__).resolve().parent / "kuberay"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}
RAY_VERSION = ray.__version__  # 2.60.0: the version pyproject.toml pins
RAY_GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
# Where the launcher configs sync the project and clusters/Dockerfile copies it.
REMOTE_PROJECT = "/home/ray/raydag"

# (vCPUs, GPUs) of the machine types the launcher configs use, from the clouds' instance type
# tables; a node type must not advertise more CPUs, and must advertise exactly its GPUs.
MACHINES = {
    "m5.2xlarge": (8, 0), "g5.2xlarge": (8, 1), "p4d.24xlarge": (96, 8),
    "n2-standard-8": (8, 0), "g2-standard-8": (8, 1), "a2-highgpu-8g": (96, 8),
}
GCP_ACCELERATORS = {"g2-standard-8": "nvidia-l4", "a2-highgpu-8g": "nvidia-tesla-a100"}


def load_yaml(path: Path):
    """A YAML file as plain data; the JSON round trip unshares YAML aliases (&anchor/*alias),
    so a test can change one place without changing every place that shares it."""
    return json.loads(json.dumps(yaml.safe_load(path.read_text())))


def fits(request: dict[str, float], resources: dict[str, float]) -> bool:
    """Whether one actor's ``{"num_cpus", "num_gpus"}`` fits a node's Ray resources."""
    return (request["num_cpus"] <= resources.get("CPU", 0)
            and request["num_gpus"] <= resources.get("GPU", 0))


# ----------------------------------------------------------------------------------------------
# Cluster launcher configs
# ----------------------------------------------------------------------------------------------

def prepared(config: dict) -> dict:
    """The config as `ray up` sees it before validating: merged with the provider's defaults."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def validate(config: dict) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared(config))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_validator(name):
    validate(load_yaml(CLUSTERS / name))


def _unknown_top_key(c):
    c["max_wokers"] = 5


def _string_max_workers(c):
    c["max_workers"] = "5"


def _fractional_gpu_resource(c):
    c["available_node_types"]["gpu_1x_a10g"]["resources"]["GPU"] = 0.5


def _unknown_node_type_key(c):
    c["available_node_types"]["gpu_1x_a10g"]["min_worker"] = 0


def _docker_typo(c):
    c["docker"]["imag"] = RAY_GPU_IMAGE


@pytest.mark.parametrize("mutate", [_unknown_top_key, _string_max_workers, _fractional_gpu_resource,
                                    _unknown_node_type_key, _docker_typo])
def test_launcher_validator_rejects_a_broken_config(mutate):
    """The same validator fails on a planted mistake (so the test above can fail)."""
    config = load_yaml(CLUSTERS / "aws.yaml")
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        validate(config)


def node_types(config: dict) -> tuple[dict, dict[str, dict]]:
    """(head node type, {name: worker node type})."""
    types = config["available_node_types"]
    head = config["head_node_type"]
    return types[head], {name: t for name, t in types.items() if name != head}


def gpu_types(config: dict) -> tuple[dict, dict]:
    """(the 1-GPU worker type, the 8-GPU worker type)."""
    _, workers = node_types(config)
    by_gpus = {t["resources"].get("GPU", 0): t for t in workers.values()}
    return by_gpus[1], by_gpus[8]


def machine_type(node_type: dict) -> str:
    node_config = node_type["node_config"]
    return node_config.get("InstanceType") or node_config["machineType"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_node_types(name):
    config = load_yaml(CLUSTERS / name)
    head, workers = node_types(config)
    assert config["idle_timeout_minutes"] > 0
    # The head states GPU 0 and no worker slots: no engine or student is ever placed there.
    assert head["resources"].get("GPU") == 0 and head.get("max_workers", 0) == 0
    assert 0 < head["resources"]["CPU"] < MACHINES[machine_type(head)][0]
    # One 1-GPU type (7-8B teachers) and one 8-GPU type (70B, tensor parallel), from zero.
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 8]
    for worker in workers.values():
        assert worker["min_workers"] == 0 < worker["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    for node_type in [head, *workers.values()]:
        vcpus, gpus = MACHINES[machine_type(node_type)]
        assert node_type["resources"]["CPU"] <= vcpus
        assert node_type["resources"]["GPU"] == gpus
        if config["provider"]["type"] == "gcp" and gpus:
            # GCP attaches what guestAccelerators asks for; GPU VMs must stop for maintenance.
            node_config = node_type["node_config"]
            assert node_config["guestAccelerators"] == [{
                "acceleratorType": GCP_ACCELERATORS[machine_type(node_type)],
                "acceleratorCount": gpus}]
            assert node_config["scheduling"]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_gpu_types_fit_raydags_teacher_placement(name):
    config = load_yaml(CLUSTERS / name)
    head, _ = node_types(config)
    small, big = (t["resources"] for t in gpu_types(config))
    tp8 = teacher_actor_resources(None, 8, cluster_gpus=8)  # a 70B teacher, tensor parallel 8
    one = teacher_actor_resources(None, 1, 1)               # a 7-8B teacher on one GPU
    assert fits(tp8, big) and not fits(tp8, small)
    assert fits(one, small) and fits(one, big)
    assert not fits(one, head["resources"])


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_installs_raydag_with_gpu_extras(name):
    config = load_yaml(CLUSTERS / name)
    remote = {local: remote for remote, local in config["file_mounts"].items()}
    assert remote["."] == REMOTE_PROJECT  # `ray up` runs from the project root
    assert f'pip install -q -e "{REMOTE_PROJECT}[gpu]"' in config["setup_commands"]
    assert any(f"ray.__version__ == '{RAY_VERSION}'" in c for c in config["setup_commands"])
    assert config["docker"]["image"] == RAY_GPU_IMAGE
    # output_dir's shared storage: mounted on the host, then into the container.
    assert any("/mnt/shared" in c and "mount" in c for c in config["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    # The HF token file lies in a folder that file_mounts syncs to every node.
    token_path = next(o.split("=", 1)[1] for o in config["docker"]["run_options"]
                      if o.startswith("--env HF_TOKEN_PATH="))
    assert any(token_path.startswith(r + "/") for r in config["file_mounts"])


# ----------------------------------------------------------------------------------------------
# KubeRay manifests against the CRD schemas
# ----------------------------------------------------------------------------------------------

def load_trim_crds():
    spec = importlib.util.spec_from_file_location("trim_crds", CRDS / "trim_crds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def crds() -> dict:
    return json.loads(gzip.decompress((CRDS / "crds.json.gz").read_bytes()))


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _is(value, expected: str) -> bool:
    if expected in ("integer", "number"):
        kinds = (int,) if expected == "integer" else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)
    return isinstance(value, _TYPES[expected])


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(value, schema: dict, defs: dict, path: str, errors: list[str]) -> None:
    while "$ref" in schema:
        schema = defs[schema["$ref"]]
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            errors.append(f"{path}: must be an integer or a string, got {value!r}")
        return
    expected = schema.get("type")
    if expected is not None:
        options = expected if isinstance(expected, list) else [expected]
        if not any(_is(value, t) for t in options):
            errors.append(f"{path}: must be {'/'.join(options)}, got {type(value).__name__} {value!r}")
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: must be one of {schema['enum']}, got {value!r}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: must be >= {schema['minimum']}, got {value!r}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        # A node that names no properties and no additionalProperties is free-form (like the
        # top-level metadata: {type: object}); one that names properties rejects others.
        free = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True or (
            not properties and extra is None)
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{_join(path, key)}: required field missing")
        for key, sub in value.items():
            if key in properties:
                _check(sub, properties[key], defs, _join(path, key), errors)
            elif isinstance(extra, dict):
                _check(sub, extra, defs, _join(path, key), errors)
            elif not free:
                errors.append(f"{_join(path, key)}: unknown field")
    elif isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: needs at least {schema['minItems']} item(s)")
        for index, item in enumerate(value):
            _check(item, schema.get("items", {}), defs, f"{path}[{index}]", errors)


def crd_errors(doc: dict, crds: dict) -> list[str]:
    """What the API server would refuse in ``doc`` (a ray.io/v1 object), one line per problem."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion: must be ray.io/v1, got {doc.get('apiVersion')!r}"]
    if doc.get("kind") not in crds["kinds"]:
        return [f"kind: must be one of {sorted(crds['kinds'])}, got {doc.get('kind')!r}"]
    errors: list[str] = []
    _check(doc, crds["kinds"][doc["kind"]], crds["definitions"], "", errors)
    name = (doc.get("metadata") or {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"metadata.name: must be a lowercase DNS label, got {name!r}")
    return errors


def manifest(name: str) -> dict:
    return load_yaml(KUBERAY / name)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_matches_the_kuberay_crd(name, crds):
    doc = manifest(name)
    assert doc["kind"] == MANIFESTS[name]
    assert crd_errors(doc, crds) == []


def _set(doc: dict, dotted: str, value) -> None:
    """Set ``a.b[0].c`` (or ``a["key.with.dots"]``) in a manifest (``None`` deletes the key)."""
    parts = re.findall(r'\["[^"]+"\]|\[\d+\]|[^.\[\]]+', dotted)
    keys = [p[2:-2] if p.startswith('["') else int(p[1:-1]) if p.startswith("[") else p
            for p in parts]
    node = doc
    for key in keys[:-1]:
        node = node[key]
    last = keys[-1]
    if value is None:
        del node[last]
    else:
        node[last] = value


WORKER0 = "spec.workerGroupSpecs[0]"
CONTAINER0 = f"{WORKER0}.template.spec.containers[0]"


@pytest.mark.parametrize("name, path, value, error", [
    # unknown fields, in KubeRay's types and in the Kubernetes ones they embed
    ("raycluster.yaml", f"{CONTAINER0}.gpus", 1, f"{CONTAINER0}.gpus: unknown field"),
    ("raycluster.yaml", "spec.headGroupSpec.minReplicas", 0,
     "spec.headGroupSpec.minReplicas: unknown field"),
    ("rayjob.yaml", "spec.shutdownAfterJobFinish", True, "spec.shutdownAfterJobFinish: unknown field"),
    # wrong types
    ("raycluster.yaml", f"{WORKER0}.rayStartParams.num-gpus", 1,
     f"{WORKER0}.rayStartParams.num-gpus: must be string, got int 1"),
    ("raycluster.yaml", "spec.enableInTreeAutoscaling", "yes",
     "spec.enableInTreeAutoscaling: must be boolean"),
    ("rayservice.yaml", "spec.rayClusterConfig.workerGroupSpecs[0].maxReplicas", "4",
     "spec.rayClusterConfig.workerGroupSpecs[0].maxReplicas: must be integer"),
    ("rayjob.yaml", "spec.entrypoint", ["python", "-m", "raydag.cli"], "spec.entrypoint: must be string"),
    ("raycluster.yaml", f'{CONTAINER0}.resources.limits["nvidia.com/gpu"]', True,
     f"{CONTAINER0}.resources.limits.nvidia.com/gpu: must be an integer or a string"),
    # required fields, enums, names
    ("raycluster.yaml", "spec.headGroupSpec", None, "spec.headGroupSpec: required field missing"),
    ("raycluster.yaml", f"{CONTAINER0}.name", None, f"{CONTAINER0}.name: required field missing"),
    ("raycluster.yaml", "spec.autoscalerOptions.upscalingMode", "Fast",
     "spec.autoscalerOptions.upscalingMode: must be one of ['Default', 'Aggressive', 'Conservative']"),
    ("rayservice.yaml", "metadata.name", "Raydag_Judge", "metadata.name: must be a lowercase DNS label"),
])
def test_crd_check_reports_a_planted_mistake(name, path, value, error, crds):
    doc = manifest(name)
    _set(doc, path, value)
    errors = crd_errors(doc, crds)
    assert any(e.startswith(error) for e in errors), errors


def test_crd_check_refuses_another_api_version(crds):
    doc = manifest("raycluster.yaml")
    doc["apiVersion"] = "ray.io/v1alpha1"
    assert crd_errors(doc, crds) == ["apiVersion: must be ray.io/v1, got 'ray.io/v1alpha1'"]


# ----------------------------------------------------------------------------------------------
# KubeRay manifests: what they are for
# ----------------------------------------------------------------------------------------------

def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def quantity(value) -> float:
    """A Kubernetes CPU or GPU quantity as a number ("500m" -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def group_resources(group: dict) -> dict[str, float]:
    """The Ray resources of one pod of the group, as KubeRay derives them (rayStartParams
    first, else the Ray container's limits)."""
    limits = containers(group)[0]["resources"]["limits"]
    params = group["rayStartParams"]
    return {"CPU": quantity(params.get("num-cpus", limits["cpu"])),
            "GPU": quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}


def repo_path(path: str) -> Path:
    """A job file named as the image / the synced project holds it, in this repository."""
    if path.startswith(REMOTE_PROJECT + "/"):
        path = path[len(REMOTE_PROJECT) + 1:]
    return ROOT / path


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_cluster_shape(name):
    doc = manifest(name)
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["autoscalerOptions"]["upscalingMode"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(head))
    images = {c["image"] for g in [head, *spec["workerGroupSpecs"]] for c in containers(g)}
    assert len(images) == 1, images  # one image for every pod
    for group in spec["workerGroupSpecs"]:
        gpus = containers(group)[0]["resources"]["limits"]["nvidia.com/gpu"]
        # Ray's GPU count agrees with the pod's; requests equal limits (one pod per slot).
        assert group["rayStartParams"]["num-gpus"] == str(gpus)
        assert containers(group)[0]["resources"]["requests"] == containers(group)[0]["resources"]["limits"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_raycluster_has_a_1_gpu_and_an_8_gpu_group_from_zero():
    spec = cluster_spec(manifest("raycluster.yaml"))
    groups = {group_resources(g)["GPU"]: g for g in spec["workerGroupSpecs"]}
    assert sorted(groups) == [1, 8]
    for group in groups.values():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    small, big = group_resources(groups[1]), group_resources(groups[8])
    tp8 = teacher_actor_resources(None, 8, cluster_gpus=8)
    one = teacher_actor_resources(None, 1, 1)
    assert fits(tp8, big) and not fits(tp8, small)
    assert fits(one, small)
    assert not fits(one, group_resources(spec["headGroupSpec"]))


def _mounted(group: dict, path: str) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
               for m in containers(group)[0].get("volumeMounts", []))


def test_rayjob_runs_a_raydag_job_and_cleans_up():
    doc = manifest("rayjob.yaml")
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "raydag.cli", "run"]
    job_file = repo_path(argv[4])
    assert job_file.is_file(), job_file
    job = load_job(job_file, argv[5:])  # the job and its overrides load as on the cluster
    # The shards are written on the GPU pods and read on the head: a volume they all mount.
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    assert all(_mounted(g, job.output_dir) for g in groups), job.output_dir
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    teacher = teacher_actor_resources(job.teacher.num_gpus, job.teacher.tensor_parallel_size, 1)
    assert any(fits(teacher, group_resources(g)) for g in spec["rayClusterSpec"]["workerGroupSpecs"])


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_rayservice_serves_raydags_judge():
    from ray.serve.schema import ServeDeploySchema

    import raydag.serve

    doc = manifest("rayservice.yaml")
    config = serve_config(doc)
    ServeDeploySchema.model_validate(config)  # Ray Serve's own check of a config file
    app = config["applications"][0]
    assert app["import_path"] == "raydag.serve:build_app"
    assert callable(raydag.serve.build_app)
    assert app["route_prefix"] == "/"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    job_file = repo_path(app["args"]["job"])
    assert job_file.is_file(), job_file
    job = load_job(job_file, app["args"].get("overrides", []))
    assert raydag.serve.judge_stage(job).type == "judge"
    spec = doc["spec"]["rayClusterConfig"]
    head, workers = spec["headGroupSpec"], spec["workerGroupSpecs"]
    assert {"containerPort": 8000, "name": "serve"} in containers(head)[0]["ports"]
    # The bearer token: named by the job, read from the Secret in every pod (the app is built
    # on the head, the replicas run on the GPU pods), never written in the manifest.
    assert job.serve.token_env
    for group in [head, *workers]:
        env = {e["name"]: e for e in containers(group)[0]["env"]}
        assert "secretKeyRef" in env[job.serve.token_env]["valueFrom"]
        assert "value" not in env[job.serve.token_env]
    # Replicas ask for GPUs whatever the cluster has when the app is built, fit a GPU pod,
    # and the group has a pod for each replica Serve may start.
    assert job.teacher.num_gpus is not None
    replica = teacher_actor_resources(job.teacher.num_gpus, job.teacher.tensor_parallel_size, 0)
    assert replica["num_gpus"] >= 1
    (gpu_group,) = workers
    per_pod = group_resources(gpu_group)
    assert fits(replica, per_pod) and not fits(replica, group_resources(head))
    replicas_per_pod = int(per_pod["GPU"] // replica["num_gpus"])
    assert job.serve.autoscaling.max_replicas <= gpu_group["maxReplicas"] * replicas_per_pod
    assert gpu_group["minReplicas"] >= 1  # a warm replica: no cold start of minutes


def test_serve_config_check_catches_a_bad_config():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(manifest("rayservice.yaml"))
    config["applications"][0]["import_path"] = "build_app"  # no module
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate(config)


# ----------------------------------------------------------------------------------------------
# Across all cluster files
# ----------------------------------------------------------------------------------------------

CONFIG_FILES = [CLUSTERS / n for n in LAUNCHER_FILES] + [KUBERAY / n for n in MANIFESTS]
ALL_FILES = CONFIG_FILES + [CLUSTERS / "Dockerfile", CLUSTERS / "README.md"]


def test_every_image_runs_ray_2_60_0():
    # The Ray that pyproject.toml pins is the Ray installed here and in every image.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'"ray\[[\w,]+\]=={re.escape(RAY_VERSION)}"', pyproject)
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [RAY_GPU_IMAGE]
    assert 'pip install --no-cache-dir -e ".[gpu]"' in dockerfile
    assert f"ray.__version__ == '{RAY_VERSION}'" in dockerfile
    for folder in ("raydag", "jobs"):  # the code, and the job files the manifests name
        assert re.search(rf"^COPY .*\b{folder} ", dockerfile, re.M), folder
    for name in LAUNCHER_FILES:
        docker = load_yaml(CLUSTERS / name)["docker"]
        for key in ("image", "head_image", "worker_image"):
            assert docker.get(key, RAY_GPU_IMAGE) == RAY_GPU_IMAGE
    for name in MANIFESTS:
        spec = cluster_spec(manifest(name))
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for container in containers(group):
                # The image built from clusters/Dockerfile, tagged with its Ray version.
                assert container["image"].endswith(f"/raydag:0.1.0-ray{RAY_VERSION}"), container["image"]


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_referenced_job_files_exist(path):
    for name in re.findall(r"(?<![\w.-])((?:/home/ray/raydag/)?jobs/[\w./-]+\.yaml)", path.read_text()):
        assert repo_path(name).is_file(), f"{path.name} names {name}, which does not exist"


def test_placeholders_are_all_documented():
    """Every CHANGE_ME_* value is listed in clusters/README.md's table of fields to fill."""
    readme = (CLUSTERS / "README.md").read_text()
    found = set()
    for path in CONFIG_FILES:
        found |= set(re.findall(r"CHANGE_ME_[A-Z_]+", path.read_text()))
    assert found, "expected placeholders (project id, registry, shared storage)"
    missing = {token for token in found if f"`{token}`" not in readme}
    assert not missing, f"clusters/README.md does not explain {sorted(missing)}"


def readme_commands() -> list[list[str]]:
    """The raydag commands in clusters/README.md's code blocks, as argv lists."""
    text = (CLUSTERS / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if "raydag.cli" in argv or any(a in ("raydag", "RAY_ADDRESS=auto") for a in argv[:1]):
                commands.append(argv)
    return commands


def test_readme_commands_load_their_jobs():
    """Every job and override the README runs loads with raydag, as on the cluster, and states
    the teacher's GPUs (an autoscaling cluster has none when the job starts)."""
    commands = [c for c in readme_commands() if {"run", "submit", "serve"} & set(c)]
    assert len(commands) >= 6
    for argv in commands:
        index = next(i for i, a in enumerate(argv) if a.endswith(".yaml"))
        overrides = [a for a in argv[index + 1:] if "=" in a and not a.startswith("-")]
        job = load_job(repo_path(argv[index]), overrides)
        assert job.teacher.num_gpus is not None and job.teacher.num_gpus >= 1, argv
        if "run" in argv or "submit" in argv:
            assert job.output_dir.startswith("/mnt/shared/"), argv


def test_readme_raydag_commands_parse():
    """The README's raydag command lines are ones raydag's own CLI accepts (flags and order)."""
    from raydag.cli import build_parser

    parsed = 0
    for argv in readme_commands():
        if "raydag" in argv[:2]:
            args = build_parser().parse_args(argv[argv.index("raydag") + 1:])
            assert args.command in ("run", "submit", "serve", "status", "logs", "stop")
            parsed += 1
    assert parsed >= 8


def test_readme_covers_every_cluster_file():
    readme = (CLUSTERS / "README.md").read_text()
    for path in CONFIG_FILES + [CLUSTERS / "Dockerfile"]:
        assert str(path.relative_to(ROOT)) in readme, path


# ----------------------------------------------------------------------------------------------
# The vendored schemas
# ----------------------------------------------------------------------------------------------

def test_vendored_crds_match_the_kuberay_transcription(crds):
    """crds.json.gz is what trim_crds.py builds from kuberay_v1.6.2_types.yaml (regenerate it
    after editing the transcription), and every Kubernetes type it refers to is in it."""
    trim_crds = load_trim_crds()
    transcription = yaml.safe_load((CRDS / "kuberay_v1.6.2_types.yaml").read_text())
    kinds, roots = trim_crds.kind_schemas(transcription)
    assert crds["kinds"] == kinds
    assert crds["kuberay_version"] == "v1.6.2"
    assert trim_crds.K8S_WHEEL in crds["source"]["kubernetes"]
    seen, todo = set(), set(roots)
    while todo:
        name = todo.pop()
        assert name in crds["definitions"], f"{name} is referenced but not vendored"
        seen.add(name)
        todo |= trim_crds._refs(crds["definitions"][name]) - seen
    assert seen == set(crds["definitions"])  # nothing vendored that nothing uses
    assert (CRDS / "crds.json.gz").stat().st_size < 1_000_000


def test_trim_keeps_structure_and_drops_descriptions(tmp_path):
    """The path for real CRD files: descriptions go, validation keywords stay."""
    trim_crds = load_trim_crds()
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "spec": {"names": {"kind": "RayJob"}, "versions": [{"name": "v1", "schema": {
               "openAPIV3Schema": {"type": "object", "description": "RayJob", "properties": {
                   "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                   "metadata": {"type": "object"},
                   "spec": {"type": "object", "description": "spec", "required": ["entrypoint"],
                            "properties": {
                                "entrypoint": {"type": "string", "description": "cmd"},
                                "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                                "params": {"type": "object", "additionalProperties": {"type": "string"}},
                                "port": {"x-kubernetes-int-or-string": True, "anyOf": [
                                    {"type": "integer"}, {"type": "string"}]}}}}}}}]}}
    path = tmp_path / "ray.io_rayjobs.yaml"
    path.write_text(yaml.safe_dump(crd))
    built = trim_crds.build_from_crds([path], "test")
    spec = built["kinds"]["RayJob"]["properties"]["spec"]
    assert "description" not in json.dumps(built) and "default" not in json.dumps(built)
    assert spec["required"] == ["entrypoint"]
    assert spec["properties"]["mode"]["enum"] == ["a", "b"]
    assert spec["properties"]["port"]["x-kubernetes-int-or-string"] is True
    errors = crd_errors({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"},
                         "spec": {"mode": "c", "params": {"k": 1}}}, built)
    assert errors == ["spec.entrypoint: required field missing",
                      "spec.mode: must be one of ['a', 'b'], got 'c'",
                      "spec.params.k: must be string, got int 1"]
