"""infra/k8s/ and the Dockerfile, read statically (no cluster, no docker here).

The manifests are checked against the fields and types KubeRay's CRDs (ray.io/v1
`ray.io_rayclusters.yaml`, `ray.io_rayjobs.yaml`, KubeRay 1.6+) declare, and against the checks
its controller makes before it creates anything; the RayJob's entry point against the image
the Dockerfile builds (its command, its WORKDIR, where it copies the pipelines) and against
mmflow's own command line and pipeline validation; the credentials against secrets.yaml.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import posixpath
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from mmflow.cli import build_parser
from mmflow.config import load_pipeline
from mmflow.redact import redact_uri
from tests.conftest import ROOT as _ROOT
from tests.infra.kuberay_schema import CLUSTER_SPEC, DNS_1035, JOB_SPEC, MAX_NAME

ROOT = Path(_ROOT)
K8S = ROOT / "infra" / "k8s"
S3_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}
MLFLOW_KEYS = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
SECRET_VALUES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def _cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": _one("raycluster.yaml", "RayCluster")["spec"],
        "rayjob.yaml": _one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
    }


def _groups(spec: dict) -> dict[str, dict]:
    """head and every worker group, by name."""
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first one


def _locked(package: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (version,) = [p["version"] for p in lock["package"] if p["name"] == package]
    return version


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


# --- the manifests against KubeRay ---------------------------------------------------------


def test_every_manifest_is_a_named_kubernetes_object():
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path.name):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name
            name = doc["metadata"]["name"]
            assert DNS_1035.match(name), f"{path.name}: {name!r} is not a DNS-1035 label"
            assert len(name) <= MAX_NAME.get(doc["kind"], 63), f"{path.name}: {name!r} too long"
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert doc["apiVersion"] == "ray.io/v1", path.name


def test_cluster_specs_have_the_fields_and_types_kuberay_requires():
    for where, spec in _cluster_specs().items():
        jsonschema.validate(spec, CLUSTER_SPEC)
        names = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert len(names) == len(set(names)), f"{where}: worker group names repeat"
        for g in spec["workerGroupSpecs"]:
            replicas = g.get("replicas", g["minReplicas"])
            assert g["minReplicas"] <= replicas <= g["maxReplicas"], f"{where}: {g['groupName']}"
        for name, group in _groups(spec).items():
            params = group.get("rayStartParams", {})
            # KubeRay refuses resources in both rayStartParams and the group's `resources`
            assert not (group.get("resources") and {"num-cpus", "num-gpus"} & params.keys())
            assert "labels" not in params, f"{where}: {name}: use the group's `labels`"


def test_the_cluster_runs_the_locked_ray_with_token_auth():
    for where, spec in _cluster_specs().items():
        # the Ray in the image; >= 2.53 makes KubeRay probe over HTTP, not with wget (which the
        # slim image lacks); token auth needs >= 2.52
        assert spec["rayVersion"] == _locked("ray"), where
        assert _version(spec["rayVersion"]) >= (2, 53), where
        assert spec["authOptions"]["mode"] == "token", where


def test_the_rayjob_makes_its_cluster_and_deletes_it():
    job = _one("rayjob.yaml", "RayJob")["spec"]
    jsonschema.validate(job, JOB_SPEC)
    assert ("rayClusterSpec" in job) != ("clusterSelector" in job), "exactly one of the two"
    assert job["shutdownAfterJobFinishes"] is True
    # KubeRay: ttlSecondsAfterFinished needs shutdownAfterJobFinishes
    assert job["ttlSecondsAfterFinished"] > 0
    specs = _cluster_specs()
    assert specs["rayjob.yaml"] == specs["raycluster.yaml"], "change both (see their headers)"


def test_gpu_group_requests_gpus_and_ray_is_told_the_same_resources():
    for where, spec in _cluster_specs().items():
        groups = _groups(spec)
        assert {"cpu", "gpu"} <= groups.keys(), where
        for name, group in groups.items():
            res = _ray_container(group)["resources"]
            limits, requests = res["limits"], res.get("requests", {})
            params = group.get("rayStartParams", {})
            gpus = int(limits.get("nvidia.com/gpu", 0))
            # Kubernetes: an extended resource's request, when given, equals its limit
            assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, f"{where}: {name}"
            assert int(params.get("num-gpus", gpus)) == gpus, f"{where}: {name}"
            if name == "head":
                # the driver (`mmflow run`) runs on the head; stage work goes to workers
                assert params["num-cpus"] == "0" and gpus == 0, where
                continue
            assert int(params.get("num-cpus", limits["cpu"])) == int(limits["cpu"]), name
            assert (gpus >= 1) == (name == "gpu"), f"{where}: {name} has {gpus} GPUs"
        tolerated = {t["key"] for t in groups["gpu"]["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated, f"{where}: GPU nodes are usually tainted"


# --- credentials ---------------------------------------------------------------------------


def _env_refs(container: dict) -> tuple[set[str], set[tuple[str, str]], set[str]]:
    """(secrets imported whole, (secret, key) pairs, names set to a literal value)."""
    whole = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    keyed, literal = set(), set()
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            keyed.add((ref["name"], ref["key"]))
        elif "value" in e:
            literal.add(e["name"])
    return whole, keyed, literal


def test_credentials_come_from_the_secrets_template_in_every_ray_container():
    secrets = {d["metadata"]["name"]: d for d in _docs("secrets.yaml") if d["kind"] == "Secret"}
    keys = {n: set(d.get("stringData", {})) | set(d.get("data", {})) for n, d in secrets.items()}
    assert set().union(*keys.values()) >= S3_KEYS | MLFLOW_KEYS
    for name, doc in secrets.items():
        for key in SECRET_VALUES & keys[name]:
            assert doc["stringData"][key] == "CHANGE_ME", f"{name}.{key}: a placeholder only"
    for where, spec in _cluster_specs().items():
        seen = []
        for group_name, group in _groups(spec).items():
            whole, keyed, literal = _env_refs(_ray_container(group))
            assert whole <= secrets.keys(), f"{where}: {group_name}: {whole - secrets.keys()}"
            for secret, key in keyed:
                assert key in keys.get(secret, ()), f"{where}: {group_name}: {secret}.{key}"
            assert not literal & (S3_KEYS | MLFLOW_KEYS), f"{where}: {group_name}: a literal"
            got = set().union(*(keys[s] for s in whole), {k for _, k in keyed})
            missing = (S3_KEYS | MLFLOW_KEYS) - got
            assert not missing, f"{where}: {group_name} misses {missing}"
            seen.append(got)
        assert all(s == seen[0] for s in seen), f"{where}: every pod writes to S3 and MLflow"


def test_the_job_spec_holds_no_credentials():
    # the dashboard and the job API show a job's entrypoint and runtime env to whoever reaches them
    job = _one("rayjob.yaml", "RayJob")["spec"]
    assert redact_uri(job["entrypoint"]) == job["entrypoint"]
    assert not set(shlex.split(job["entrypoint"])) & (S3_KEYS | MLFLOW_KEYS)
    assert "runtimeEnvYAML" not in job or not (S3_KEYS | MLFLOW_KEYS) & set(
        yaml.safe_load(job["runtimeEnvYAML"]).get("env_vars", {})
    )


def test_mlflow_reads_the_credential_names_the_secret_holds():
    from mlflow import environment_variables as mlflow_env

    names = {mlflow_env.MLFLOW_TRACKING_USERNAME.name, mlflow_env.MLFLOW_TRACKING_PASSWORD.name}
    assert names == MLFLOW_KEYS


# --- the RayJob's entry point against the image --------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1])
        for ln in lines
        if ln and not ln.startswith("#")
    ]


class Image:
    """What the Dockerfile's instructions leave in the image: its workdir, its PATH, where
    each copied repository path lands, and the RUN commands."""

    def __init__(self):
        self.base, self.workdir, self.path, self.copies, self.runs = None, "/", "", [], []
        for op, args in _dockerfile():
            if op == "FROM":
                self.base = args.split()[0]
            elif op == "WORKDIR":
                self.workdir = posixpath.join(self.workdir, args)
            elif op == "ENV" and args.startswith("PATH="):
                self.path = args.removeprefix("PATH=").strip('"')
            elif op == "COPY":
                *sources, dest = shlex.split(args)
                assert not any(s.startswith("--") for s in sources), "plain COPY only"
                dest = posixpath.normpath(posixpath.join(self.workdir, dest))
                for src in sources:
                    into_dir = len(sources) > 1 or not src.endswith("/")
                    lands = posixpath.join(dest, posixpath.basename(src)) if into_dir else dest
                    self.copies.append((src.rstrip("/"), lands))
            elif op == "RUN":
                self.runs.append((args, [s for s, _ in self.copies]))

    def source_of(self, image_path: str) -> str | None:
        """The repository path the image's file came from, or None."""
        for src, lands in self.copies:
            if image_path == lands or image_path.startswith(lands + "/"):
                return src + image_path[len(lands) :]
        return None


def test_image_installs_the_locked_environment_without_dev_tools():
    image = Image()
    assert re.fullmatch(r"python:(3\.\d+)-slim(-\w+)?", image.base), image.base
    python = re.match(r"python:(3\.\d+)", image.base).group(1)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{python}.0"), (python, requires)
    # the project's own sync: after the lock, the package and the README its build reads
    final = [copied for cmd, copied in image.runs if re.search(r"uv sync --frozen --no-dev$", cmd)]
    assert final, "a RUN `uv sync --frozen --no-dev` installs the project"
    assert {"pyproject.toml", "uv.lock", "mmflow", "README.md"} <= set(final[-1])
    (uv_pin,) = set(re.findall(r"uv==[\w.]+", (ROOT / ".ci" / "run").read_text()))
    assert any(uv_pin in cmd for cmd, _ in image.runs), f"the image's uv is not {uv_pin}"
    assert image.path.split(":")[0] == posixpath.join(image.workdir, ".venv", "bin")


def test_rayjob_entrypoint_is_the_images_mmflow_on_a_pipeline_it_copies():
    image = Image()
    argv = shlex.split(_one("rayjob.yaml", "RayJob")["spec"]["entrypoint"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]!r} is not a [project.scripts] command"
    assert scripts[argv[0]] == "mmflow.cli:main"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert posixpath.isabs(args.pipeline), "the driver's working directory is Ray's, not /app"
    source = image.source_of(args.pipeline)
    assert source, f"{args.pipeline} is not copied into the image"
    assert (ROOT / source).is_file(), f"{args.pipeline} comes from {source}, which is missing"
    # what `mmflow run` checks before it starts anything (exit 2 otherwise)
    pipeline = load_pipeline(str(ROOT / source), args.overrides, args.storage, args.tracking_uri)
    # every pod must reach the same storage and tracking server
    assert pipeline.storage.startswith("s3://") or posixpath.isabs(pipeline.storage)
    assert re.match(r"https?://", pipeline.tracking_uri), pipeline.tracking_uri


def test_every_ray_container_runs_the_one_image():
    images = {
        _ray_container(g)["image"]
        for spec in _cluster_specs().values()
        for g in _groups(spec).values()
    }
    assert len(images) == 1, images


def test_dockerignore_leaves_out_local_state_and_keeps_what_the_image_copies():
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    spec = importlib.util.spec_from_file_location("submit", ROOT / "jobs" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    assert {".venv", "mmflow-data", "mlruns", "mlflow.db", *submit.EXCLUDES} <= set(patterns)
    for src, _ in Image().copies:
        assert not any(fnmatch.fnmatch(src, p) for p in patterns), f"{src} is ignored"


# --- the docs name files that exist --------------------------------------------------------


@pytest.mark.parametrize("doc", ["docs/cluster.md", "infra/README.md"])
def test_docs_name_the_k8s_files_that_exist(doc):
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"infra/k8s/[\w.-]+\.yaml", text)) | {
        f"infra/k8s/{m}" for m in re.findall(r"`k8s/([\w.-]+\.yaml)`", text)
    }
    assert named, f"{doc} names no infra/k8s file"
    for path in named:
        assert (ROOT / path).is_file(), f"{doc} names {path}, which does not exist"
    assert {f"infra/k8s/{p.name}" for p in K8S.glob("*.yaml")} <= named, f"{doc} misses some"
