"""The deploy files stay honest: they parse, their commands and flags exist, their TSMON_* variables and
TOML are valid configuration, their metric names are metrics tsmon exports, their probes are endpoints it
serves, grace periods exceed the shutdown budget; README's configuration reference is the generated one.

No Docker engine runs here, so the images are not built; the container's entry command is run from the
Dockerfile as written (``tsmon --help`` and the default command's ``--help``) against this checkout.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.config import Config, load_config
from monitor.health import HealthServer
from monitor.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TSMON = str(Path(sys.executable).parent / "tsmon")


def _yaml(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _dockerfile(path: Path) -> dict[str, list[str]]:
    """Instructions of the last stage (continuation lines joined): {"ENV": [...], "CMD": [...], ...}."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    last = text.split("\nFROM ")[-1]
    out: dict[str, list[str]] = {}
    for line in last.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def _env_pairs(env_lines: list[str]) -> dict[str, str]:
    return dict(tok.split("=", 1) for line in env_lines for tok in shlex.split(line) if "=" in tok)


def _tsmon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TSMON, *args], capture_output=True, text=True, timeout=60, check=False)


def _accepts(args: list[str]) -> None:
    """``tsmon ARGS`` names an existing command and only options that command has."""
    command = [a for a in args if not a.startswith("-")][:1]
    r = _tsmon(*command, "--help")
    assert r.returncode == 0, (args, r.stderr)
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", r.stdout))
    for flag in (a for a in args if a.startswith("--")):
        assert flag.split("=")[0] in options, (flag, args, options)


def _config_valid(toml_text: str, env: dict[str, str], tmp_path: Path) -> Config:
    path = tmp_path / "tsmon.toml"
    path.write_text(toml_text)
    return load_config(path, env={k: v for k, v in env.items() if k.startswith("TSMON_")})


def test_every_deploy_file_parses() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml")]
    assert len(files) >= 10
    for p in files:
        assert _yaml(p), p
    json.loads((DEPLOY / "grafana" / "tsmon.json").read_text())


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_container_entry_command_runs(name: str, tmp_path: Path) -> None:
    d = _dockerfile(DEPLOY / name)
    entry, cmd = json.loads(d["ENTRYPOINT"][-1]), json.loads(d["CMD"][-1])
    assert entry == ["tsmon"] and _tsmon("--help").returncode == 0
    _accepts(cmd)
    assert "USER" in d and d["USER"][-1] not in ("root", "0")  # non-root
    env = _env_pairs(d["ENV"])
    # the environment wins over the file: a port, device or log format set by the image made those keys of a
    # mounted config do nothing (a port change there: probes on the new port, daemon on the old, a crash loop)
    assert {k for k in env if k.startswith("TSMON_")} == {"TSMON_HTTP__HOST"}
    cfg = load_config(None, {"models": [{"path": "/models/x"}]}, env={k: v for k, v in env.items()
                                                                       if k.startswith("TSMON_")})
    assert d["EXPOSE"] == [str(cfg.http.port)]
    health = d["HEALTHCHECK"][-1]
    assert f"127.0.0.1:{cfg.http.port}/healthz" in health


def test_compose_services_use_real_commands_and_config(tmp_path: Path) -> None:
    compose = _yaml(DEPLOY / "compose.yaml")[0]
    s = compose["services"]
    assert {"kafka", "tsmon", "prometheus", "grafana"} <= set(s)
    assert s["kafka"]["image"].startswith("apache/kafka:") and "controller" in s["kafka"]["environment"][
        "KAFKA_PROCESS_ROLES"]
    train = shlex.split(s["train"]["command"][0].split("||")[1])  # the one-shot training job
    assert train[0] == "tsmon"
    _accepts(train[1:])
    _accepts(s["tsmon"]["command"])
    cfg = _config_valid((DEPLOY / "tsmon.toml").read_text(), s["tsmon"]["environment"], tmp_path)
    # tsmon refuses an input topic that is not there (it never creates one): a job creates it before it starts
    topics = s["topics"]["command"]
    assert s["topics"]["image"] == s["kafka"]["image"] and "--create" in topics and "--if-not-exists" in topics
    assert [topics[i + 1] for i, a in enumerate(topics) if a == "--topic"] == list(cfg.kafka.topics)
    assert s["tsmon"]["depends_on"]["topics"] == {"condition": "service_completed_successfully"}
    grace = int(s["tsmon"]["stop_grace_period"].rstrip("s"))
    assert grace > cfg.daemon.shutdown_timeout_s
    for mount in s["prometheus"]["volumes"] + s["grafana"]["volumes"] + s["tsmon"]["volumes"]:
        src = mount.split(":")[0]
        if src.startswith("./"):
            assert (DEPLOY / src).exists(), src
    # the control key signs operator commands: no published default; and nothing listens beyond the host
    # taken from the host's variable of the same name: exported for `tsmon ctl` too, which refuses a misspelt
    # TSMON_* variable (TSMON_CONTROL_KEY broke ctl, status and config check on that host)
    assert s["tsmon"]["environment"]["TSMON_CONTROL__KEY"].startswith("${TSMON_CONTROL__KEY:?")
    assert "TSMON_CONTROL_KEY" not in (DEPLOY / "compose.yaml").read_text() + (ROOT / "README.md").read_text()
    assert all(p.startswith("127.0.0.1:") for svc in s.values() for p in svc.get("ports", [])), "loopback only"
    target = _yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]["static_configs"][0]
    assert target["targets"] == [f"tsmon:{cfg.http.port}"]


def test_kubernetes_manifests(tmp_path: Path) -> None:
    docs = {d["kind"]: d for p in (DEPLOY / "k8s").glob("*.yaml") for d in _yaml(p) if "kind" in d}
    assert {"Deployment", "Secret", "Service", "PodDisruptionBudget", "ScaledObject"} <= set(docs)
    # scaled on what is left to read: KEDA's kafka scaler reads committed offsets, which tsmon holds back while a
    # stream has a partial window (up to idle_evict_s), and scaled out for an hour with no backlog
    triggers = docs["ScaledObject"]["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["prometheus"]
    assert set(re.findall(r"\btsmon_[a-z_]+", triggers[0]["metadata"]["query"])) == {"tsmon_consumer_lag"}
    # the config is generated from its file (a name with its content's hash: a change rolls the pods), the one the
    # Deployment mounts; a fixed-name ConfigMap changed nothing in running pods (subPath mounts are never updated)
    kustomization = docs.pop("Kustomization")
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    assert "ConfigMap" not in docs and all((DEPLOY / "k8s" / r).exists() for r in kustomization["resources"])
    mounted = {v["configMap"]["name"] for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]
               if "configMap" in v}
    assert mounted == {"tsmon-config"} and generated["tsmon-config"] == ["tsmon.toml"]
    docs["ConfigMap"] = {"kind": "ConfigMap", "metadata": {"name": "tsmon-config"},
                         "data": {"tsmon.toml": (DEPLOY / "k8s" / "tsmon.toml").read_text()}}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    _accepts(c["args"])
    env = {e["name"]: "x" for e in c.get("env", [])} | docs["Secret"]["stringData"]
    cfg = _config_valid(docs["ConfigMap"]["data"]["tsmon.toml"], env, tmp_path)
    assert cfg.daemon.device == "cuda" and cfg.kafka.sasl_password is not None and cfg.control.key is not None
    assert pod["terminationGracePeriodSeconds"] > cfg.daemon.shutdown_timeout_s
    assert c["ports"][0]["containerPort"] == cfg.http.port
    # liveness must not be /readyz: a broker outage makes the daemon not-ready, and it must not be restarted for it
    paths = {p: c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert all(c[p]["timeoutSeconds"] >= 3 for p in paths)  # the kubelet's 1 s is one SYN retry under a flood
    assert docs["Service"]["spec"]["publishNotReadyAddresses"] is True  # status in an outage, when all are unready
    server = HealthServer("127.0.0.1", 0, Metrics().registry, lambda: (True, ""), lambda: (True, ""), list)
    assert all(server.respond(p)[0] == 200 for p in paths.values())  # endpoints the daemon serves
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}  # "restricted" Pod Security
    # what the pods mount and kustomize does not create is named for the operator to create first
    needed = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    needed |= {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    created = {d["metadata"]["name"] for d in docs.values() if d["kind"] not in ("Secret", "Kustomization")}
    howto = (DEPLOY / "k8s" / "kustomization.yaml").read_text()
    assert needed - created and all(n in howto for n in needed - created), needed
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    # the worst case of what the config lets one replica hold fits its memory limit (README "Memory bounds": 62.3 kB
    # a stream held, up to 93 kB a document of one not held; the runtime ~1 GiB): the default 50 000 documents did not
    limit = _bytes(c["resources"]["limits"]["memory"])
    assert cfg.limits.max_streams * 62.3e3 + cfg.state.max_documents * 93e3 + 2**30 < limit
    # every scale is a rebalance: the HPA KEDA creates is told to go one pod at a time (KEDA's cooldownPeriod only
    # acts on a scale to zero, which minReplicaCount >= 1 rules out: 1 → 4 went at once)
    scaled = docs["ScaledObject"]["spec"]
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert scaled["minReplicaCount"] >= 1 and "cooldownPeriod" not in scaled
    for way in ("scaleUp", "scaleDown"):
        policies = behavior[way]["policies"]
        assert behavior[way]["stabilizationWindowSeconds"] >= 60 and len(policies) == 1
        assert (policies[0]["type"], policies[0]["value"]) == ("Pods", 1) and policies[0]["periodSeconds"] >= 60


def _bytes(quantity: str) -> float:
    """A Kubernetes memory quantity (4Gi, 512Mi, 4G) in bytes."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", quantity).groups()  # type: ignore[union-attr]
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    return float(number) * ((1024 if unit.endswith("i") else 1000) ** powers[unit[0]] if unit else 1)


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "tsmon.service")
    exec_start = shlex.split(unit["Service"]["ExecStart"])
    assert Path(exec_start[0]).name == "tsmon"
    _accepts(exec_start[1:])
    assert int(unit["Service"]["TimeoutStopSec"]) > Config().daemon.shutdown_timeout_s
    # a start while Kafka is away exits (clients cannot bootstrap): the unit must keep restarting it, not hit a
    # start limit and stay failed once the outage outlasts it
    assert unit["Service"]["User"] != "root" and unit["Service"]["Restart"] in ("on-failure", "always")
    assert unit["Unit"].get("StartLimitIntervalSec") == "0" and "StartLimitBurst" not in unit["Unit"]
    text = (DEPLOY / "systemd" / "tsmon.service").read_text()
    assert "useradd --system" in text  # User= must exist
    # PyPI's default Linux torch is a CUDA 13 build: gigabytes on a CPU host, no GPU under an older driver
    installs = re.findall(r"pip install (torch==\S+.*)", text)
    assert installs and all("--index-url https://download.pytorch.org/whl/" in i for i in installs), installs
    # the daemon notifies (READY, WATCHDOG from its loop): the watchdog must outlast the loop's longest bounded
    # waits (stall_s, with room for a commit or a flush with the broker away), or systemd would kill a healthy daemon
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) > Config().http.stall_s + 60 and int(svc["TimeoutStartSec"]) >= 120
    env = dict(e.split("=", 1) for e in shlex.split(unit["Service"].get("Environment", "")))
    # as for the images: a setting the unit gives wins over /etc/tsmon/tsmon.toml, so a key of the file did nothing
    # (log_format = "console" there: JSON all the same, and config_file_values_overridden at every start); the
    # journal is no terminal, so the log is JSON without a word
    assert not [k for k in env if k.startswith("TSMON_")], env
    cfg = load_config(None, env=env)
    # the unit ships no config: the worst case of the defaults fits its memory cap (as for the Kubernetes limit; 4G
    # did not). systemd's K/M/G/T are powers of 1024
    number, unit_ = re.fullmatch(r"(\d+)([KMGT])", svc["MemoryMax"]).groups()  # type: ignore[union-attr]
    cap = int(number) * 1024 ** ("KMGT".index(unit_) + 1)
    assert cfg.limits.max_streams * 62.3e3 + cfg.state.max_documents * 93e3 + 2**30 < cap


def _known_series() -> set[str]:
    names = set()
    metrics = Metrics()
    metrics.watch_scoring_process(os.getpid)  # a scoring process's series, as a CPU daemon exports them
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def test_dashboard_and_alert_rules_use_exported_metrics() -> None:
    known = _known_series()
    dashboard = json.loads((DEPLOY / "grafana" / "tsmon.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = _yaml(DEPLOY / "prometheus" / "alerts.yml")[0]["groups"][0]["rules"]
    exprs += [r["expr"] for r in rules]
    used = {m for e in exprs for m in re.findall(r"\btsmon_[a-z_]+", e)}
    assert used and used <= known, used - known
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("throughput", "lag", "latency", "batch size", "threshold", "alert", "dead letter"):
        assert wanted in titles, wanted
    assert {"TsmonNotConsuming", "TsmonLagGrowing", "TsmonDeadLettersRising"} <= {r["alert"] for r in rules}
    # output the broker refuses for good is given up (the input would wait forever): lost, so someone is paged
    lost = [r for r in rules if "tsmon_undeliverable_messages_total" in r["expr"]]
    assert lost and lost[0]["labels"]["severity"] == "critical"
    # a broker outage or a paused input has rules of its own: "not consuming" (restart it) must not page beside them
    stuck = next(r for r in rules if r["alert"] == "TsmonNotConsuming")["expr"]
    assert re.search(r"unless on ?\(instance\) \(tsmon_broker_up == 0 or tsmon_consumption_paused == 1\)", stuck)
    assert "tsmon_undeliverable_messages_total" in " ".join(exprs[: -len(rules)])  # and on the dashboard
    # control messages that fail verification (a forger, or an operator with another key) reach someone
    assert any('tsmon_commands_total{outcome="rejected"}' in r["expr"] for r in rules)
    # one unreadable partition among readable ones: the instance consumes, TsmonNotConsuming cannot see it (a review)
    unreadable = next(r for r in rules if 'tsmon_commit_retries_total{cause="input"}' in r["expr"])
    assert unreadable["labels"]["severity"] == "critical" and "for" in unreadable


def test_readme_configuration_reference_is_the_generated_one() -> None:
    from monitor.config_reference import embedded, reference_markdown

    assert embedded((ROOT / "README.md").read_text()) == reference_markdown(), (
        "README.md's configuration reference is stale: paste the output of `tsmon config reference` between "
        "the config-reference markers")


def test_alert_runbook_links_point_at_readme_sections() -> None:
    """Each rule's runbook is a README anchor (GitHub's heading slug), and the runbook item it names exists."""
    readme = (ROOT / "README.md").read_text()
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", readme, flags=re.MULTILINE)}
    rules = _yaml(DEPLOY / "prometheus" / "alerts.yml")[0]["groups"][0]["rules"]
    for rule in rules:
        link = rule["annotations"]["runbook"]
        anchor, _, item = link.removeprefix("README.md#").partition(", item ")
        assert anchor in slugs, link
        assert not item or f"- **{item}**" in readme, link


def test_the_cuda_image_names_its_torch_cuda_build() -> None:
    """The image was an nvidia/cuda 12.8 base with PyPI's default torch wheel, whose CUDA version is PyPI's choice (13
    from torch 2.11 on: a 12.8-era driver then saw no GPU, and the image carried a CUDA torch never used). The wheel
    brings its own CUDA; the image names which one."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile.cuda").read_text())
    images = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert images and not [i for i in images if i.startswith("nvidia/cuda")]
    assert re.search(r'"torch==[\d.]+" --index-url "https://download\.pytorch\.org/whl/\$\{TORCH_CUDA\}"', text)
    assert re.search(r"^ARG TORCH_CUDA=cu1\d\d$", text, re.MULTILINE)


def test_the_readme_configuration_example_is_a_valid_configuration(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's TOML example is what users copy: every key in it must load (a renamed key is an error), and
    its models are the ones the README's Usage trains."""
    from monitor.config import load_config

    for name in [n for n in os.environ if n.startswith("TSMON_")]:  # the file alone, not this shell's settings
        monkeypatch.delenv(name)
    readme = (ROOT / "README.md").read_text()
    trained = set(re.findall(r"^tsmon train .*--out (\S+)", readme, re.MULTILINE))
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.toml"
        path.write_text(block)
        cfg = load_config(path)
        assert cfg.models and {str(m.path) for m in cfg.models} <= trained, (cfg.models, trained)
