"""The deployment files in deploy/: Kubernetes manifests, systemd units, config examples.

The manifests are checked against the Kubernetes API schemas that
kubernetes-validate bundles (offline) and every YAML file against
deploy/.yamllint; the units with ``systemd-analyze verify`` where systemd is
installed (a misspelt directive is only a warning there, so any line it prints
about our units fails the test); the configuration examples with carelay's
own loader; and the Containerfile for the package install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from configparser import ConfigParser
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from yamllint import linter
from yamllint.config import YamlLintConfig

from carelay.common.config import STOP_GRACE, STOP_LIMIT, Config, load_config
from carelay.common.keys import make_keys

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"

MANIFESTS = sorted(K8S.glob("*.yaml"))
YAML_FILES = sorted({*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), DEPLOY / ".yamllint"})
UNITS = ("carelay.service", "carelay-broker.service", "carelay-shard@.service")
EXAMPLES = ("carelay.toml.example", "carelay-multihost.toml.example")
#: The oldest Kubernetes the manifests are written for, and the newest schemas bundled.
K8S_VERSIONS = ("1.28.0", latest_version())

CONFIG_PATH = "/etc/carelay/carelay.toml"
KEYS_PATH = "/etc/carelay/keys"
CARELAY = "/opt/carelay/venv/bin/carelay"


# -- helpers ------------------------------------------------------------------


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _resources() -> dict[tuple[str, str], dict]:
    out = {}
    for path in MANIFESTS:
        for doc in _docs(path):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _one(kind: str) -> dict:
    found = [doc for (k, _), doc in _resources().items() if k == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S}, found {len(found)}"
    return found[0]


def _pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _container(workload: dict) -> dict:
    containers = _pod_spec(workload)["containers"]
    assert len(containers) == 1
    return containers[0]


def _mounts(workload: dict) -> dict[str, dict]:
    """mountPath -> {"mount": volumeMount, "volume": the volume or claim template}."""
    spec = _pod_spec(workload)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"claim": claim}
    return {
        m["mountPath"]: {"mount": m, "volume": volumes[m["name"]]}
        for m in _container(workload)["volumeMounts"]
    }


def _load_deployed(text: str, tmp_path: Path) -> Config:
    """Load configuration ``text`` as deployed: keys_dir, if set, must be KEYS_PATH.

    The real key directory is the mounted Secret or a copy made by the operator;
    here a fresh one made by `carelay keys` stands in for it.
    """
    overrides = {}
    keys_dir = tomllib.loads(text).get("keys_dir")
    if keys_dir is not None:
        assert keys_dir == KEYS_PATH
        overrides["keys_dir"] = tmp_path / "keys"
        make_keys(overrides["keys_dir"])
    path = tmp_path / "carelay.toml"
    path.write_text(text)
    return load_config(path, **overrides)


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("2Gi", "512M", "1000") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
    units |= {"G": 10**9, "T": 10**12}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    return int(number) * units.get(unit, 1)


def _configmap_text() -> str:
    return _one("ConfigMap")["data"]["carelay.toml"]


# -- Kubernetes -----------------------------------------------------------------


def test_manifests_are_there():
    kinds = {kind for kind, _ in _resources()}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "StatefulSet", "Deployment"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path, version):
    docs = _docs(path)
    assert docs, f"{path.name} holds no resource"
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"{path.name}: {doc.get('kind')} at {where}: {e.message}")
    assert not errors, "\n".join(errors)


def test_every_resource_is_in_the_namespace():
    namespace = _one("Namespace")["metadata"]["name"]
    for (kind, name), doc in _resources().items():
        if kind != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{kind}/{name}"


def test_configmap_holds_a_valid_configuration(tmp_path):
    config = _load_deployed(_configmap_text(), tmp_path)
    assert config.endpoints and len(config.endpoints) == config.shards
    # Endpoints beyond loopback: carelay requires keys, from the mounted Secret.
    assert config.keys_dir is not None
    # max_bytes' default follows the node's memory, not the pod's: it must be set,
    # below the memory limit of the broker, which mirrors every value.
    limit = _bytes(_container(_one("Deployment"))["resources"]["limits"]["memory"])
    assert "max_bytes" in tomllib.loads(_configmap_text())
    assert config.max_bytes < limit


def test_broker_runs_on_the_host_network():
    broker = _one("Deployment")
    spec = _pod_spec(broker)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert broker["spec"]["replicas"] == 1
    assert broker["spec"]["strategy"]["type"] == "Recreate"
    container = _container(broker)
    assert container["args"][:3] == ["broker", "--config", CONFIG_PATH]
    ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in container["ports"]}
    assert {(5064, "TCP"), (5064, "UDP")} <= ports


def test_shards_are_a_statefulset_behind_a_headless_service(tmp_path):
    sts = _one("StatefulSet")
    svc = _resources()[("Service", sts["spec"]["serviceName"])]
    config = _load_deployed(_configmap_text(), tmp_path)
    namespace = _one("Namespace")["metadata"]["name"]

    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sts["spec"]["replicas"] == config.shards

    # The index comes from the pod ordinal.
    script = " ".join(_container(sts)["command"])
    assert "carelay shard" in script and f"--config {CONFIG_PATH}" in script
    assert "${HOSTNAME##*-}" in script

    # endpoints[K] is pod K's name under the headless Service, on the shard's port.
    (port,) = [p["containerPort"] for p in _container(sts)["ports"]]
    assert {p["port"] for p in svc["spec"]["ports"]} == {port}
    pods, service = sts["metadata"]["name"], svc["metadata"]["name"]
    for k, endpoint in enumerate(config.endpoints):
        assert re.fullmatch(
            rf"tcp://{pods}-{k}\.{service}(\.{namespace}\.svc(\.[a-z0-9.-]+)?)?:{port}", endpoint
        ), endpoint

    # Each shard's store is on its own claim, mounted at data_dir.
    store = _mounts(sts)[str(config.data_dir)]["volume"]
    assert "claim" in store, "data_dir must be a volumeClaimTemplate"
    assert store["claim"]["spec"]["resources"]["requests"]["storage"]


@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"])
def test_workloads_mount_config_and_keys_and_are_limited(kind):
    workload = _one(kind)
    mounts = _mounts(workload)
    config = mounts[CONFIG_PATH]
    assert config["volume"]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert config["mount"]["subPath"] == "carelay.toml"
    keys = mounts[KEYS_PATH]
    assert keys["volume"]["secret"]["secretName"] == _one("Secret")["metadata"]["name"]
    assert keys["mount"]["readOnly"] is True

    container = _container(workload)
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys(), bound
    assert "livenessProbe" in container and "readinessProbe" in container
    pod_security = _pod_spec(workload)["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_secret_holds_the_files_carelay_keys_makes(tmp_path):
    made = {p.name for p in make_keys(tmp_path / "keys")}
    assert set(_one("Secret")["stringData"]) == made


# -- YAML style -------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_passes_yamllint(path):
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = list(linter.run(path.read_text(), conf, str(path)))
    assert not problems, "\n".join(
        f"{path.name}:{p.line}:{p.column}: [{p.level}] {p.desc} ({p.rule})" for p in problems
    )


# -- systemd ----------------------------------------------------------------------


def _unit(name: str) -> ConfigParser:
    parser = ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # directives are case-sensitive
    parser.read_string((SYSTEMD / name).read_text(), source=name)
    return parser


@pytest.mark.parametrize(
    "name, command",
    [
        ("carelay.service", f"{CARELAY} up --config {CONFIG_PATH}"),
        ("carelay-broker.service", f"{CARELAY} broker --config {CONFIG_PATH}"),
        ("carelay-shard@.service", f"{CARELAY} shard --config {CONFIG_PATH} --index %i"),
    ],
)
def test_unit_settings(name, command):
    service = _unit(name)["Service"]
    assert service["ExecStart"] == command
    assert service["KillSignal"] == "SIGTERM"
    # A shard is given time while it still writes its last flush (up to STOP_LIMIT):
    # systemd's SIGKILL must not come before.
    least = 10 if "broker" in name else STOP_LIMIT + STOP_GRACE
    assert int(service["TimeoutStopSec"]) >= least
    assert service["Restart"] == "on-failure"
    assert service["User"] == "carelay" and service["StateDirectory"] == "carelay"
    # Hardening must leave Channel Access its network.
    for directive in ("PrivateNetwork", "IPAddressDeny", "SocketBindDeny", "PrivateUsers"):
        assert directive not in service, f"{name}: {directive}= would cut CA off"
    families = service["RestrictAddressFamilies"].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    assert _unit(name)["Install"]["WantedBy"] == "multi-user.target"


def _verify(units: dict[str, str], tmp_path: Path) -> tuple[int, list[str], list[str]]:
    """``systemd-analyze verify`` on ``units`` (file name -> text).

    ExecStart points at a stand-in executable, so a missing carelay install
    does not count.  Returns (exit status, lines about our units, other lines).
    """
    stub = tmp_path / "bin" / "carelay"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    targets = []
    for name, text in units.items():
        (unit_dir / name).write_text(text.replace(CARELAY, str(stub)))
        targets.append(str(unit_dir / name.replace("@.", "@0.")))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *targets],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    ours, other = [], []
    for line in (proc.stdout + proc.stderr).splitlines():
        if not line.strip():
            continue
        (ours if str(unit_dir) in line or "carelay" in line else other).append(line)
    return proc.returncode, ours, other


def _verify_or_skip(units: dict[str, str], tmp_path: Path) -> tuple[int, list[str]]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    rc, ours, other = _verify(units, tmp_path)
    if rc != 0 and not ours:
        pytest.skip(f"systemd-analyze verify fails here for reasons outside the units: {other[:5]}")
    if other:
        print("systemd-analyze, about other units:", *other, sep="\n  ")
    return rc, ours


def test_units_pass_systemd_analyze_verify(tmp_path):
    units = {name: (SYSTEMD / name).read_text() for name in UNITS}
    rc, ours = _verify_or_skip(units, tmp_path)
    assert not ours, "\n".join(ours)
    assert rc == 0


@pytest.mark.parametrize(
    "good, bad",
    [
        ("Restart=on-failure", "Restart=on-falure"),  # a bad value: only a warning
        ("KillSignal=SIGTERM", "KilSignal=SIGTERM"),  # an unknown directive: only a warning
        ("[Service]", "[Servce]"),  # an unknown section
    ],
)
@pytest.mark.parametrize("name", UNITS)
def test_systemd_check_catches_a_typo(tmp_path, name, good, bad):
    """The check above is not vacuous: each of these typos fails it."""
    text = (SYSTEMD / name).read_text()
    assert good in text
    rc, ours = _verify_or_skip({name: text.replace(good, bad, 1)}, tmp_path)
    assert ours, f"systemd-analyze verify took {bad!r} in {name} without a word"


def test_sysusers_file_creates_the_user(tmp_path):
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed here")
    proc = subprocess.run(
        [
            "systemd-sysusers",
            "--dry-run",
            f"--root={tmp_path}",
            str(SYSTEMD / "carelay.sysusers.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Creating user 'carelay'" in out, out


# -- configuration examples -----------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_config_example_loads(name, tmp_path):
    config = _load_deployed((SYSTEMD / name).read_text(), tmp_path)
    # The units' StateDirectory=carelay is /var/lib/carelay, the only place they may write.
    assert config.data_dir == Path("/var/lib/carelay")
    if name == "carelay.toml.example":
        assert config.endpoints == () and config.keys_dir is None
    else:
        assert len(config.endpoints) == config.shards > 1
        assert all(ep.startswith("tcp://") for ep in config.endpoints)
        assert config.keys_dir is not None


def test_single_host_example_loads_as_it_stands():
    """What `carelay up --config` reads on a single host, with nothing else needed."""
    load_config(SYSTEMD / "carelay.toml.example")


# -- Containerfile ----------------------------------------------------------------


def _containerfile() -> list[str]:
    """Instructions of deploy/Containerfile, continuation lines joined."""
    text = (DEPLOY / "Containerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def test_containerfile_installs_the_package():
    lines = _containerfile()
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms and all(ln.split()[1] == "python:3.11-slim" for ln in froms)
    runs = " ".join(ln for ln in lines if ln.startswith("RUN "))
    assert re.search(r"pip install (-\S+ )*\.(\s|$)", runs), "no `pip install .`"

    # Everything `pip install .` builds from is copied in.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= set(project["tool"]["setuptools"]["package-dir"].values())
    copied = set()
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            copied |= {s.rstrip("/").removeprefix("./") for s in ln.split()[1:-1]}
    assert needed <= copied or "." in copied, f"not copied: {sorted(needed - copied)}"

    (user,) = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user.split(":")[0] not in ("root", "0")
    (entrypoint,) = [ln for ln in lines if ln.startswith("ENTRYPOINT ")]
    assert entrypoint == 'ENTRYPOINT ["carelay"]'


def test_readme_names_every_deploy_file():
    readme = (DEPLOY / "README.md").read_text()
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"]
    missing = [
        str(p.relative_to(DEPLOY)) for p in files if str(p.relative_to(DEPLOY)) not in readme
    ]
    assert not missing, f"deploy/README.md does not mention {missing}"


def test_containerfile_offers_pv_access():
    """``pva = true`` needs p4p: the image installs the extra when asked, and says
    which ports PV Access uses."""
    lines = _containerfile()
    assert 'ARG EXTRAS=""' in lines
    runs = " ".join(ln for ln in lines if ln.startswith("RUN "))
    assert 'pip install ".[$EXTRAS]"' in runs
    (expose,) = [ln for ln in lines if ln.startswith("EXPOSE ")]
    assert {"5075/tcp", "5076/udp"} <= set(expose.split()[1:])


@pytest.mark.parametrize(("kind", "status"), [("StatefulSet", "shard-0"), ("Deployment", "broker")])
def test_the_liveness_probe_tells_an_idle_process_from_a_hung_one(tmp_path, kind, status):
    """A process touches its status file every second and rewrites it only when what it
    says changed: an idle one's ``written`` grows old while the file stays fresh.  The
    probe must pass for it (before, it read ``written``, and restarted idle pods), and
    fail for a file untouched for more than 30 s."""
    import json
    import sys
    import time

    command = _container(_one(kind))["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    code = command[2].replace("/var/lib/carelay/run", str(tmp_path))
    path = tmp_path / f"{status}.json"
    path.write_text(json.dumps({"pid": 1, "written": time.time() - 3600}))

    def probe() -> int:
        # The shard's pod is named carelay-shard-K: its hostname says its index.
        fake_host = "import socket; socket.gethostname = lambda: 'carelay-shard-0'\n"
        return subprocess.run([sys.executable, "-c", fake_host + code]).returncode

    assert probe() == 0  # idle: touched just now, its "written" an hour old
    old = time.time() - 60
    os.utime(path, (old, old))
    assert probe() == 1  # hung: untouched for a minute
