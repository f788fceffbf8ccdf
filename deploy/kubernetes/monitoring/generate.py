#!/usr/bin/env python3
"""Generates the two derived files in this directory:

- prometheusrule.yaml: rules.yaml (the plain Prometheus rules file that promtool checks) wrapped
  in a PrometheusRule for the Prometheus Operator, comments and all, so the two cannot drift;
- grafana-dashboard.json: the Grafana dashboard, written here as a short list of panels rather
  than by hand as 1000 lines of JSON.

    python3 deploy/kubernetes/monitoring/generate.py           # rewrite both files
    python3 deploy/kubernetes/monitoring/generate.py --check   # fail if either is stale

Standard library only. Every metric name used here must exist in src/metrics.rs; deploy/check.sh
verifies that.
"""

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent

PROMETHEUS_RULE_HEADER = """\
# GENERATED from rules.yaml by generate.py: edit rules.yaml, then run
#   python3 deploy/kubernetes/monitoring/generate.py
# deploy/check.sh fails if this file is stale.
# The label below is what kube-prometheus-stack's Prometheus selects rules with by default
# (ruleSelector); change it to match yours.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: bearer-proxy
  labels:
    release: kube-prometheus-stack
spec:
"""


def prometheus_rule() -> str:
    """rules.yaml's `groups:` document indented under `spec:`, leading comments dropped."""
    lines = (HERE / "rules.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines[start:])
    return PROMETHEUS_RULE_HEADER + body + "\n"


# ---- dashboard ----

SEL = 'namespace=~"$namespace"'
TOKEN_SEL = SEL + ',token=~"$token"'
ROUTE_SEL = SEL + ',route=~"$route"'
DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(title, exprs, unit="short", kind="timeseries", description="", legend=None,
          stack=False, thresholds=None):
    """One panel; `exprs` is a list of (PromQL, legend format)."""
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": lf}
            for i, (e, lf) in enumerate(exprs)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "stacking": {"mode": "normal" if stack else "none"},
        }
        p["options"] = {
            "legend": {"displayMode": "table", "placement": "right", "calcs": legend or []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if thresholds:
        p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": thresholds}
    if kind == "stat":
        p["options"] = {"colorMode": "background", "graphMode": "none",
                        "reduceOptions": {"calcs": ["lastNotNull"]}}
    return p


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def quantile(q, route_sel):
    return (f"histogram_quantile({q}, sum by (le, route) "
            f"(rate(bearer_proxy_request_duration_seconds_bucket{{{route_sel}}}[$__rate_interval])))")


RED_GREEN = [{"color": "red", "value": None}, {"color": "green", "value": 1}]
EXPIRY = [{"color": "red", "value": None}, {"color": "orange", "value": 0},
          {"color": "green", "value": 60}]

PANELS = [
    row("Tokens"),
    panel("Token valid", [(f"min by (token) (bearer_proxy_token_valid{{{TOKEN_SEL}}})", "{{token}}")],
          kind="stat", thresholds=RED_GREEN,
          description="1 when every pod holds a valid token (min over pods); 0 means requests on "
                      "its routes get 503 after token_wait."),
    panel("Seconds to token expiry",
          [(f"min by (token) (bearer_proxy_token_expiry_timestamp_seconds{{{TOKEN_SEL}}} - time())",
            "{{token}}")],
          unit="s", thresholds=EXPIRY, legend=["min", "last"],
          description="Lowest over pods. A Flinks token (300s) is renewed with ~75s left; below 60s "
                      "refreshes are behind."),
    panel("Token refreshes by result",
          [(f"sum by (token, result) (increase(bearer_proxy_token_refreshes_total{{{TOKEN_SEL}}}[$__rate_interval]))",
            "{{token}} {{result}}")],
          stack=True, legend=["sum"]),
    panel("Token refresh errors by reason",
          [(f"sum by (token, reason) (increase(bearer_proxy_token_refresh_errors_total{{{TOKEN_SEL}}}[$__rate_interval])) > 0",
            "{{token}} {{reason}}")],
          stack=True, legend=["sum"],
          description="invalid_client / invalid_grant will not heal by retrying."),
    panel("Token request latency p99",
          [(f"histogram_quantile(0.99, sum by (le, token) (rate(bearer_proxy_token_refresh_duration_seconds_bucket{{{TOKEN_SEL}}}[$__rate_interval])))",
            "{{token}}")],
          unit="s", legend=["max", "last"]),
    panel("Time since last successful refresh",
          [(f"time() - max by (token) (bearer_proxy_token_last_success_timestamp_seconds{{{TOKEN_SEL}}})",
            "{{token}}")],
          unit="s", legend=["max", "last"]),
    panel("Forced refreshes (upstream rejected the token)",
          [(f"sum by (token) (increase(bearer_proxy_token_forced_refreshes_total{{{TOKEN_SEL}}}[$__rate_interval]))",
            "{{token}}")],
          legend=["sum"]),
    row("Requests"),
    panel("Requests by route and code",
          [(f"sum by (route, code) (rate(bearer_proxy_requests_total{{{ROUTE_SEL}}}[$__rate_interval]))",
            "{{route}} {{code}}")],
          unit="reqps", stack=True, legend=["mean", "max"]),
    panel("5xx ratio by route",
          [(f"sum by (route) (rate(bearer_proxy_requests_total{{{ROUTE_SEL},code=~\"5..\"}}[$__rate_interval]))"
            f" / sum by (route) (rate(bearer_proxy_requests_total{{{ROUTE_SEL}}}[$__rate_interval]))",
            "{{route}}")],
          unit="percentunit", legend=["mean", "max"]),
    panel("Latency p50 / p99 by route",
          [(quantile(0.5, ROUTE_SEL), "p50 {{route}}"), (quantile(0.99, ROUTE_SEL), "p99 {{route}}")],
          unit="s", legend=["mean", "max"],
          description="Request received to response headers sent, including the upstream."),
    panel("Upstream errors by route and kind",
          [(f"sum by (route, kind) (increase(bearer_proxy_upstream_errors_total{{{ROUTE_SEL}}}[$__rate_interval])) > 0",
            "{{route}} {{kind}}")],
          stack=True, legend=["sum"]),
    panel("Replays after a token rejection",
          [(f"sum by (route, result) (increase(bearer_proxy_replays_total{{{ROUTE_SEL}}}[$__rate_interval])) > 0",
            "{{route}} {{result}}")],
          stack=True, legend=["sum"],
          description="consent_revoked: the user must re-authorize; rejected_again: the new token "
                      "was refused too."),
    panel("Requests answered by the proxy itself",
          [(f"sum by (reason) (increase(bearer_proxy_rejected_requests_total{{{SEL}}}[$__rate_interval])) > 0",
            "{{reason}}")],
          stack=True, legend=["sum"],
          description="token_unavailable = 503 without a token; denied = unrouted host or CONNECT "
                      "refused by policy."),
    panel("Open connections and tunnels",
          [(f"sum by (pod) (bearer_proxy_open_connections{{{SEL}}})", "connections {{pod}}"),
           (f"sum by (pod) (bearer_proxy_open_tunnels{{{SEL}}})", "tunnels {{pod}}")],
          legend=["max", "last"]),
    panel("Versions running",
          [(f"count by (version) (bearer_proxy_build_info{{{SEL}}})", "{{version}}")],
          legend=["last"]),
]


def layout(panels):
    """Two panels per line (24 columns); rows take a full line."""
    x = y = 0
    for i, p in enumerate(panels):
        p["id"] = i + 1
        if p["type"] == "row":
            if x:
                x, y = 0, y + 8
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
            continue
        p["gridPos"] = {"h": 8, "w": 12, "x": x, "y": y}
        x += 12
        if x >= 24:
            x, y = 0, y + 8
    return panels


def variable(name, label, query):
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> str:
    d = {
        "uid": "bearer-proxy",
        "title": "bearer-proxy",
        "description": "Tokens, requests and upstreams of bearer-proxy (metrics from src/metrics.rs).",
        "tags": ["bearer-proxy", "oauth2", "flinks"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "graphTooltip": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            variable("namespace", "Namespace", "label_values(bearer_proxy_build_info, namespace)"),
            variable("token", "Token",
                     'label_values(bearer_proxy_token_valid{namespace=~"$namespace"}, token)'),
            variable("route", "Route",
                     'label_values(bearer_proxy_requests_total{namespace=~"$namespace"}, route)'),
        ]},
        "panels": layout(json.loads(json.dumps(PANELS))),
    }
    return json.dumps(d, indent=2) + "\n"


def main() -> int:
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] not in ([], ["--check"]):
        print(__doc__, file=sys.stderr)
        return 2
    stale = []
    for name, text in (("prometheusrule.yaml", prometheus_rule()),
                       ("grafana-dashboard.json", dashboard())):
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run deploy/kubernetes/monitoring/generate.py): " + ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
