"""Consistency checks of deploy/ that no off-the-shelf validator does: run by deploy/check.sh
with the Python of its virtual environment (PyYAML and promql-parser come from there).

Each subcommand prints what it checked and exits non-zero, naming every problem, when one
fails:
  settings     every variable the deploy files give the server is one that
               crates/bootstrap/src/settings.rs reads
  compose      the compose file's bind mounts exist; nginx's upstreams, Prometheus's
               targets and TRUSTED_PROXIES agree with the services and their addresses
  dockerfile   every workspace member's manifest is copied into the dependency layer, and
               .dockerignore lets every member's directory into the build context
  kustomize    kustomization.yaml lists exactly the manifests beside it
  dashboard    the Grafana dashboard: structure, and every PromQL expression parses and
               names only metrics the server exports (found in the code)
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SETTINGS_RS = ROOT / "crates/bootstrap/src/settings.rs"

problems: list[str] = []


def problem(text: str) -> None:
    problems.append(text)


def load_yaml(path: Path):
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def server_services(compose: dict) -> dict[str, dict]:
    """The compose services that run the server (built from deploy/Dockerfile)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if str(service.get("build", {}).get("dockerfile", "")).endswith("deploy/Dockerfile")
    }


def settings_names() -> set[str]:
    """The environment variables settings.rs reads: the upper-case string literals of its
    code (its tests excluded)."""
    code = SETTINGS_RS.read_text(encoding="utf-8").split("#[cfg(test)]")[0]
    return set(re.findall(r'"([A-Z][A-Z0-9_]*[A-Z0-9])"', code))


def check_settings() -> None:
    known = settings_names()
    if "DATABASE_URL" not in known or "REDIS_URL" not in known:
        problem(f"{SETTINGS_RS}: no variable names found; has the file moved?")
        return
    given: dict[str, set[str]] = {}
    apps = server_services(load_yaml(DEPLOY / "compose.yaml"))
    if not apps:
        problem("compose.yaml: no service is built from deploy/Dockerfile")
    for name, service in apps.items():
        given[f"compose.yaml service {name}"] = set(service.get("environment", {}))
    for manifest in ("configmap.yaml", "secret.yaml"):
        doc = load_yaml(DEPLOY / "k8s" / manifest)
        given[f"k8s/{manifest}"] = set(doc.get("data", {})) | set(doc.get("stringData", {}))
    env = set()
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").split("\nENV ")[1:]:
        env |= set(re.findall(r"([A-Z][A-Z0-9_]*)=", line.split("\n\n")[0]))
    given["Dockerfile ENV"] = env
    for where, names in given.items():
        for name in sorted(names - known):
            problem(f"{where}: {name} is not a variable the server reads ({SETTINGS_RS.name})")
    print(f"  {len(given)} places, {sum(len(n) for n in given.values())} variables, all read by settings.rs")


def check_compose() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")) and not (DEPLOY / source).resolve().exists():
                problem(f"compose.yaml service {name}: bind mount source {source} does not exist")
    apps = server_services(compose)
    http_port = {name: s["environment"]["HTTP_ADDR"].rsplit(":", 1)[1] for name, s in apps.items()}
    ops_port = {name: s["environment"]["OPS_ADDR"].rsplit(":", 1)[1] for name, s in apps.items()}
    upstreams = re.findall(
        r"^\s*server\s+([^\s:;]+):(\d+)", (DEPLOY / "nginx/upstreams.compose.conf").read_text(), re.M
    )
    want = sorted((name, http_port[name]) for name in apps)
    if sorted(upstreams) != want:
        problem(f"nginx/upstreams.compose.conf: servers {sorted(upstreams)}, want {want} (the app services' HTTP_ADDR)")
    prometheus = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    job = next((j for j in prometheus["scrape_configs"] if j["job_name"] == "concert-server"), None)
    targets = sorted(t for c in (job or {}).get("static_configs", []) for t in c["targets"])
    want_targets = sorted(f"{name}:{ops_port[name]}" for name in apps)
    if targets != want_targets:
        problem(f"prometheus/prometheus.yml: targets {targets}, want {want_targets} (the app services' OPS_ADDR)")
    nginx_address = services.get("nginx", {}).get("networks", {}).get("concert", {}).get("ipv4_address")
    for name, service in apps.items():
        if service["environment"].get("TRUSTED_PROXIES") != nginx_address:
            problem(f"compose.yaml service {name}: TRUSTED_PROXIES is not nginx's address {nginx_address}")
    print(f"  {len(apps)} instances; bind mounts, nginx upstreams, Prometheus targets and TRUSTED_PROXIES agree")


def check_dockerfile() -> None:
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split("\n")
    for member in members:
        if f"COPY {member}/Cargo.toml {member}/" not in dockerfile:
            problem(f"deploy/Dockerfile: no `COPY {member}/Cargo.toml {member}/` in the dependency layer")
        top = member.split("/")[0]
        if f"COPY {top} {top}" not in dockerfile:
            problem(f"deploy/Dockerfile: no `COPY {top} {top}` for the sources")
        if f"!{top}/" not in ignore:
            problem(f".dockerignore: {top}/ is not let into the build context (`!{top}/`)")
    print(f"  {len(members)} workspace members copied into the build")


def check_kustomize() -> None:
    k8s = DEPLOY / "k8s"
    listed = load_yaml(k8s / "kustomization.yaml")["resources"]
    present = sorted(p.name for p in k8s.glob("*.yaml") if p.name != "kustomization.yaml")
    if sorted(listed) != present:
        problem(f"k8s/kustomization.yaml: resources {sorted(listed)}, files {present}")
    print(f"  {len(listed)} manifests listed")


# Grafana's interval variables, replaced by a duration so that the expression parses.
GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")


def exported_metrics() -> tuple[set[str], set[str]]:
    """(every metric name the code records, the histograms among them). Counters end in
    `_total` here, so a counter named through a helper (the cache's `count`) is found by
    its literal too."""
    names: set[str] = set()
    histograms: set[str] = set()
    for path in (ROOT / "crates").rglob("*.rs"):
        code = path.read_text(encoding="utf-8")
        for kind, name in re.findall(r'\b(counter|gauge|histogram)!\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', code):
            names.add(name)
            if kind == "histogram":
                histograms.add(name)
        names |= set(re.findall(r'"([a-z][a-z0-9_]*_total)"', code))
    return names, histograms


def selectors(node) -> list[str]:
    """The metric names an expression's vector selectors name."""
    if isinstance(node, promql_parser.VectorSelector):
        return [node.name] if node.name else []
    if isinstance(node, promql_parser.MatrixSelector):
        return selectors(node.vector_selector)
    found: list[str] = []
    for attribute in ("lhs", "rhs", "expr", "param"):
        child = getattr(node, attribute, None)
        if child is not None and not isinstance(child, (str, int, float)):
            found += selectors(child)
    for arg in getattr(node, "args", None) or []:
        found += selectors(arg)
    return found


def check_dashboard() -> None:
    path = DEPLOY / "grafana/dashboards/concert-server.json"
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    names, histograms = exported_metrics()
    allowed = names | {f"{h}_{suffix}" for h in histograms for suffix in ("bucket", "sum", "count")}
    if len(names) < 10:
        problem(f"only {len(names)} metric names found in crates/: has the code moved?")
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        if key not in dashboard:
            problem(f"{path.name}: no {key}")
    if not isinstance(dashboard.get("schemaVersion"), int):
        problem(f"{path.name}: schemaVersion is not a number")
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problem(f"{path.name}: no datasource variable")
    datasource_uid = None
    for source in load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]:
        if source["type"] == "prometheus":
            datasource_uid = source["uid"]
    if variables.get("datasource", {}).get("current", {}).get("value") != datasource_uid:
        problem(f"{path.name}: the datasource variable does not default to the provisioned uid {datasource_uid}")
    ids: set[int] = set()
    used: set[str] = set()
    expressions = 0
    for panel in dashboard.get("panels", []):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problem(f"{path.name}: panel id {panel.get('id')} twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")) or grid["x"] + grid["w"] > 24:
            problem(f"{path.name}: panel {title!r}: gridPos {grid} is not within the 24-column grid")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problem(f"{path.name}: panel {title!r} does not use the datasource variable")
        targets = panel.get("targets", [])
        if not targets:
            problem(f"{path.name}: panel {title!r} has no query")
        for target in targets:
            expr = target.get("expr", "")
            expressions += 1
            try:
                tree = promql_parser.parse(GRAFANA_DURATIONS.sub("5m", expr))
            except ValueError as error:
                problem(f"{path.name}: panel {title!r}: {expr!r} does not parse: {error}")
                continue
            found = selectors(tree)
            if not found:
                problem(f"{path.name}: panel {title!r}: {expr!r} names no metric")
            for name in found:
                used.add(name)
                if name not in allowed:
                    problem(f"{path.name}: panel {title!r}: {name} is not a metric the server exports")
    print(f"  {len(ids)} panels, {expressions} expressions over {len(used)} metric series, all exported by the code")


CHECKS = {
    "settings": check_settings,
    "compose": check_compose,
    "dockerfile": check_dockerfile,
    "kustomize": check_kustomize,
    "dashboard": check_dashboard,
}


def main(names: list[str]) -> int:
    for name in names or list(CHECKS):
        CHECKS[name]()
    for text in problems:
        print(f"  FAIL {text}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
