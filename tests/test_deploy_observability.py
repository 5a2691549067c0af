"""The Grafana dashboard and the Prometheus alerts use only metrics the manager exports.

A real manager (fake instance processes) serves its REST API on a real socket; its
``/metrics`` is scraped and every ``tei_manager_*`` name in the dashboard's and the
rules' PromQL must be there. promtool (Debian's ``prometheus`` package) checks the
rules, unit-tests them, and parses every dashboard query; those tests skip when it
is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tei_manager.api.server import serve_api
from tei_manager.config import InstanceConfig, ManagerConfig
from tei_manager.core.instances import InstanceStatus
from tei_manager.core.ondemand import StartPolicy
from tei_manager.core.restart import RestartPolicy
from tei_manager.gateway.relay import create_gateway
from tei_manager.manager.service import Manager
from tei_manager.multiplexer.metrics import MultiplexerMetrics
from tei_manager.multiplexer.server import shared_routing
from tests.fake_processes import FakeHost, run_inline
from tests.httpclient import http_request
from tests.waiting import wait_for

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "tei-manager.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
ADAPTER = ROOT / "deploy" / "kubernetes" / "autoscaling" / "prometheus-adapter.yaml"
_METRIC_RE = re.compile(r"\btei_manager_[a-z0-9_]+")
# Grafana's variables, replaced by values PromQL accepts.
_GRAFANA_VARS = {"$__rate_interval": "5m", "$instance": ".*"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def _alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _adapter_queries() -> list[str]:
    """The series prometheus-adapter reads for the HPA (deploy/kubernetes/autoscaling)."""
    config = yaml.safe_load(yaml.safe_load(ADAPTER.read_text())["data"]["config.yaml"])
    return [rule["seriesQuery"] for rule in config["rules"]]


def exported_names(text: str) -> set[str]:
    """Every series name ``text`` (Prometheus exposition) offers, with the suffixes
    its family type implies even when no labelled child has a sample yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


async def _scrape(tmp_path: Path) -> str:
    config = ManagerConfig(
        state_file=str(tmp_path / "state.toml"),
        log_dir=str(tmp_path / "logs"),
        api_host="127.0.0.1",
        api_port=0,
        grpc_port=0,
        instance_port_start=20000,
        instance_port_end=20009,
    )
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, ready_after=0.01)
        manager = Manager(
            config,
            spawner=host.spawn,
            prober=host.probe,
            gpu_count=0,
            port_probe=lambda port: True,
            explicit_port_probe=lambda port: True,
            policy=RestartPolicy.from_config(config),
            run_blocking=run_inline,
        )
        # As serve() does: the multiplexer's metrics and the HTTP inference gateway
        # on the manager's registry, both doors sharing routing and the on-demand hook.
        MultiplexerMetrics(manager.metrics.prometheus)
        shared = shared_routing(
            config,
            manager.instances,
            activity=manager.ondemand.activity,
            starter=manager.ensure_running,
        )
        gateway = create_gateway(
            config,
            manager.instances,
            manager.metrics.prometheus,
            shared,
        )
        await nursery.start(manager.run)
        await nursery.start(shared.pool.run)
        port = await nursery.start(partial(serve_api, gateway=gateway), manager, "127.0.0.1", 0)
        await manager.create_instance(InstanceConfig(name="a", model_id="org/model"))
        await wait_for(
            lambda: manager.get_instance("a").status is InstanceStatus.RUNNING,
            within=10,
            what="instance a running",
        )
        await http_request(port, "GET", "/instances")
        # A request to an idle on-demand instance: a cold start, and an inference
        # request (answered 503: the fake process speaks no gRPC).
        on_demand = InstanceConfig(name="od", model_id="org/od", start=StartPolicy.ON_DEMAND)
        await manager.create_instance(on_demand)
        body = b'{"model": "od", "input": "hi"}'
        await http_request(port, "POST", "/v1/embeddings", body=body)
        answer = await http_request(port, "GET", "/metrics")
        nursery.cancel_scope.cancel()
    assert answer.status == 200
    return answer.body.decode()


async def test_every_metric_the_dashboard_and_alerts_use_is_exported(tmp_path: Path) -> None:
    text = await _scrape(tmp_path)
    exported = exported_names(text)
    used = {
        name
        for query in _dashboard_queries() + _alert_queries() + _adapter_queries()
        for name in _METRIC_RE.findall(query)
    }
    assert len(used) >= 15, used
    assert used - exported == set(), f"not exported by the manager: {sorted(used - exported)}"
    # The series the dashboard's first panels read have samples, with real labels.
    assert 'tei_manager_instance_status{instance="a",status="running"} 1.0' in text
    assert re.search(r'tei_manager_storage_free_bytes\{volume="model_cache"\} \d', text)
    assert re.search(r'tei_manager_http_request_duration_seconds_count\{.*route="/instances"', text)
    assert 'tei_manager_cold_starts_total{instance="od"} 1.0' in text
    assert "tei_manager_cold_start_seconds_count 1.0" in text
    assert 'tei_manager_inference_requests_total{model="org/od",route="/v1/embeddings"} 1.0' in text


def test_the_name_check_understands_histogram_and_counter_suffixes() -> None:
    text = (
        "# TYPE x_seconds histogram\n"
        'x_seconds_bucket{le="+Inf"} 1.0\nx_seconds_sum 1.0\nx_seconds_count 1.0\n'
        "# TYPE y counter\n"
        "# TYPE z gauge\n"
    )
    names = exported_names(text)
    assert {"x_seconds_bucket", "x_seconds_count", "y_total", "z"} <= names
    assert "x_seconds_total" not in names and "y_bucket" not in names and "w" not in names


def test_every_dashboard_panel_has_a_query_and_a_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_accepts_the_alert_rules() -> None:
    result = _run([_promtool(), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = _run([_promtool(), "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_scrape_config_keeps_the_instance_label_and_loads_the_rules() -> None:
    config = yaml.safe_load((ALERTS.parent / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["honor_labels"] is True and job["metrics_path"] == "/metrics"
    assert config["rule_files"] == [ALERTS.name]
    result = _run([_promtool(), "check", "config", str(ALERTS.parent / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each query becomes a recording rule, which ``promtool check rules`` parses."""
    promtool = _promtool()
    rules: list[dict[str, Any]] = []
    for i, query in enumerate(_dashboard_queries()):
        if query.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        for variable, value in _GRAFANA_VARS.items():
            query = query.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": query})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    # And a broken query is caught the same way.
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(("}]}]})
    )
    assert _run([promtool, "check", "rules", str(path)]).returncode != 0
