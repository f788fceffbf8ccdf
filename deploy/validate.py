#!/usr/bin/env python3
"""Offline checks for deploy/check.sh (needs PyYAML, jsonschema and kubernetes-validate, which
deploy/install-tools.sh installs).

  validate.py manifests --kube-version V --rules-dir DIR RENDERED.yaml...
      Every object rendered by kustomize: built-in kinds against the Kubernetes OpenAPI schemas
      of version V (kubernetes-validate, strict: unknown fields fail); Prometheus Operator kinds
      and trust-manager's Bundle against the small schemas below; then cross-references (selectors that select something,
      ports, ConfigMaps and Secrets that exist). Each PrometheusRule's spec is written to
      DIR/<name>.rules.yaml for `promtool check rules`.

  validate.py metrics [--promql-out FILE] SRC/metrics.rs RULES.yaml DASHBOARD.json
      Every metric name in the alert expressions and dashboard queries is defined in
      src/metrics.rs (histograms only as _bucket/_sum/_count). With --promql-out, the
      dashboard's queries are also written as recording rules for `promtool check rules`.
"""

import argparse
import json
import pathlib
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

failures = []


def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}")


def ok(msg):
    print(f"  ok   {msg}")


# ---- Prometheus Operator kinds (and trust-manager's Bundle): kubernetes-validate has no schemas
# for CRDs ----
# Written from the monitoring.coreos.com/v1 API reference, only for the fields these manifests
# use (plus a few common ones); additionalProperties: false so that a misspelt field fails.
# Extend them when you use another field.

LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "any": {"type": "boolean"},
        "matchNames": {"type": "array", "items": {"type": "string"}},
    },
}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "targetPort": {"type": ["string", "integer"]},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": {"type": "object"}},
        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
    },
}


KEY_REF = {
    "type": "object",
    "required": ["name", "key"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
}
KEY_ONLY = {
    "type": "object",
    "required": ["key"],
    "additionalProperties": False,
    "properties": {"key": {"type": "string"}},
}


def metadata_schema():
    return {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }


def crd_schema(spec, api_version="monitoring.coreos.com/v1"):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"type": "string"},
            "metadata": metadata_schema(),
            "spec": spec,
        },
    }


CRD_SCHEMAS = {
    "PodMonitor": crd_schema({
        "type": "object",
        "required": ["selector", "podMetricsEndpoints"],
        "additionalProperties": False,
        "properties": {
            "jobLabel": {"type": "string"},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "selector": LABEL_SELECTOR,
            "namespaceSelector": NAMESPACE_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": ENDPOINT},
            "sampleLimit": {"type": "integer"},
        },
    }),
    "ServiceMonitor": crd_schema({
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "jobLabel": {"type": "string"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "selector": LABEL_SELECTOR,
            "namespaceSelector": NAMESPACE_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": ENDPOINT},
            "sampleLimit": {"type": "integer"},
        },
    }),
    # The rules themselves are checked by promtool (check rules and test rules); this only
    # checks the wrapper.
    "PrometheusRule": crd_schema({
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "properties": {"name": {"type": "string"}, "rules": {"type": "array"}},
                },
            },
        },
    }),
    # cert-manager trust-manager's Bundle (overlays/sidecar-https/trust-bundle.yaml), from its
    # trust.cert-manager.io/v1alpha1 API reference: cluster-scoped, so no namespace.
    "Bundle": crd_schema({
        "type": "object",
        "required": ["sources", "target"],
        "additionalProperties": False,
        "properties": {
            "sources": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        "useDefaultCAs": {"type": "boolean"},
                        "inLine": {"type": "string"},
                        "configMap": KEY_REF,
                        "secret": KEY_REF,
                    },
                },
            },
            "target": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "configMap": KEY_ONLY,
                    "secret": KEY_ONLY,
                    "additionalFormats": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"jks": KEY_ONLY, "pkcs12": KEY_ONLY},
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    }, api_version="trust.cert-manager.io/v1alpha1"),
}


def load_docs(paths):
    docs = []
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    docs.append((path, doc))
    return docs


def name_of(doc):
    md = doc.get("metadata", {})
    return f"{doc.get('kind')}/{md.get('namespace', '-')}/{md.get('name')}"


def matches(selector, labels):
    """matchLabels only: that is all these manifests use."""
    want = (selector or {}).get("matchLabels", {})
    return bool(want) and all(labels.get(k) == v for k, v in want.items())


def pod_specs(docs):
    """(namespace, workload name, pod labels, pod spec) of every Deployment, StatefulSet and
    DaemonSet."""
    for _, d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            t = d["spec"]["template"]
            spec = dict(t["spec"])
            # A StatefulSet's volumeClaimTemplates are volumes of its pods too.
            spec["_claim_templates"] = [c["metadata"]["name"]
                                        for c in d["spec"].get("volumeClaimTemplates", [])]
            yield d["metadata"].get("namespace"), d["metadata"]["name"], \
                t["metadata"].get("labels", {}), spec


def containers(spec):
    return spec.get("containers", []) + spec.get("initContainers", [])


def cross_references(docs):
    """Things a schema cannot see: names and selectors that must point at something."""
    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    names = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for _, d in docs}
    pods = list(pod_specs(docs))

    for ns, name, labels, spec in pods:
        where = f"{name} (namespace {ns})"
        for v in spec.get("volumes", []):
            for kind, key, field in (("ConfigMap", "configMap", "name"),
                                     ("Secret", "secret", "secretName")):
                if key in v and (kind, ns, v[key][field]) not in names:
                    fail(f"{where}: volume {v['name']} refers to {kind} {v[key][field]}, not rendered")
        mounts = {m["name"] for c in containers(spec) for m in c.get("volumeMounts", [])}
        vols = {v["name"] for v in spec.get("volumes", [])} | set(spec["_claim_templates"])
        for missing in sorted(mounts - vols):
            fail(f"{where}: volumeMount {missing} has no volume")
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", ns, sa) not in names:
            fail(f"{where}: serviceAccountName {sa} is not rendered")
        for c in containers(spec):
            ports = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    fail(f"{where}: {c['name']} {probe} uses port {port}, not declared")
        ok(f"{where}: volumes, mounts, ServiceAccount and probe ports resolve")

    def selects_pods(kind, d, selector, ns):
        hits = [n for pns, n, labels, _ in pods if pns == ns and matches(selector, labels)]
        if hits:
            ok(f"{kind} {d['metadata']['name']} selects the pods of {', '.join(hits)}")
        else:
            fail(f"{kind} {d['metadata']['name']} selects no pods in namespace {ns}")

    for d in by_kind.get("Service", []):
        ns = d["metadata"].get("namespace")
        selects_pods("Service", d, {"matchLabels": d["spec"].get("selector", {})}, ns)
        for p in d["spec"]["ports"]:
            tp = p.get("targetPort")
            if isinstance(tp, str) and not any(
                    tp in {cp.get("name") for c in containers(spec) for cp in c.get("ports", [])}
                    for pns, _, labels, spec in pods
                    if pns == ns and matches({"matchLabels": d["spec"]["selector"]}, labels)):
                fail(f"Service {d['metadata']['name']}: targetPort {tp} is no container port")
    for d in by_kind.get("Bundle", []):
        # trust-manager writes a ConfigMap named after the Bundle: some pod must mount it, and
        # the files it writes must be the ones that pod's environment names.
        name, target = d["metadata"]["name"], d["spec"]["target"]
        keys = [target.get("configMap", {}).get("key")] + [
            f["key"] for f in target.get("additionalFormats", {}).values()]
        users = [(pn, spec) for _, pn, _, spec in pods
                 if any(v.get("configMap", {}).get("name") == name for v in spec.get("volumes", []))]
        if not users:
            fail(f"Bundle {name}: no pod mounts a ConfigMap {name}")
        for pn, spec in users:
            env = " ".join(e.get("value", "") for c in containers(spec) for e in c.get("env", []))
            unused = [k for k in filter(None, keys) if not re.search(rf"/{re.escape(k)}\b", env)]
            for k in unused:
                fail(f"Bundle {name}: {pn} mounts it but no environment variable names {k}")
            if not unused:
                ok(f"Bundle {name}: {pn} mounts it and uses {', '.join(filter(None, keys))}")
    for kind in ("PodDisruptionBudget",):
        for d in by_kind.get(kind, []):
            selects_pods(kind, d, d["spec"]["selector"], d["metadata"].get("namespace"))
    for d in by_kind.get("NetworkPolicy", []):
        selects_pods("NetworkPolicy", d, d["spec"]["podSelector"], d["metadata"].get("namespace"))
    for d in by_kind.get("HorizontalPodAutoscaler", []):
        ref = d["spec"]["scaleTargetRef"]
        if (ref["kind"], d["metadata"].get("namespace"), ref["name"]) in names:
            ok(f"HorizontalPodAutoscaler {d['metadata']['name']} targets {ref['kind']}/{ref['name']}")
        else:
            fail(f"HorizontalPodAutoscaler {d['metadata']['name']}: {ref['kind']}/{ref['name']} not rendered")

    # Monitors live in another namespace; they select across namespaces.
    def ns_ok(selector, ns):
        return (selector or {}).get("any") or ns in (selector or {}).get("matchNames", [])

    for d in by_kind.get("PodMonitor", []):
        port = {e["port"] for e in d["spec"]["podMetricsEndpoints"]}
        hits = [n for ns, n, labels, spec in pods
                if ns_ok(d["spec"].get("namespaceSelector"), ns)
                and matches(d["spec"]["selector"], labels)
                and port <= {p.get("name") for c in containers(spec) for p in c.get("ports", [])}]
        if hits:
            ok(f"PodMonitor {d['metadata']['name']} scrapes port(s) {sorted(port)} of {', '.join(hits)}")
        else:
            fail(f"PodMonitor {d['metadata']['name']} selects no pod with port(s) {sorted(port)}")
    for d in by_kind.get("ServiceMonitor", []):
        port = {e["port"] for e in d["spec"]["endpoints"]}
        hits = [s["metadata"]["name"] for s in by_kind.get("Service", [])
                if ns_ok(d["spec"].get("namespaceSelector"), s["metadata"].get("namespace"))
                and matches(d["spec"]["selector"], s["metadata"].get("labels", {}))
                and port <= {p.get("name") for p in s["spec"]["ports"]}]
        if hits:
            ok(f"ServiceMonitor {d['metadata']['name']} scrapes port(s) {sorted(port)} of Service {', '.join(hits)}")
        else:
            fail(f"ServiceMonitor {d['metadata']['name']} selects no Service with port(s) {sorted(port)}")


def cmd_manifests(args):
    docs = load_docs(args.files)
    rules_dir = pathlib.Path(args.rules_dir)
    print(f"schemas (Kubernetes {args.kube_version}, strict):")
    for path, d in docs:
        what = f"{pathlib.Path(path).name}: {name_of(d)}"
        schema = CRD_SCHEMAS.get(d.get("kind"))
        if schema is not None:
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=str)
            for e in errors:
                fail(f"{what}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
            if not errors:
                ok(f"{what} (own schema for {d['kind']})")
            if d["kind"] == "PrometheusRule":
                out = rules_dir / f"{d['metadata']['name']}.rules.yaml"
                out.write_text(yaml.safe_dump(d["spec"], sort_keys=False))
            continue
        try:
            kubernetes_validate.validate(d, args.kube_version, strict=True)
            ok(what)
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{what}: no schema for {d.get('apiVersion')} {d.get('kind')}")
        except kubernetes_validate.ValidationError as e:
            fail(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
    print("cross-references:")
    cross_references(docs)


# ---- metric names ----

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "offset", "and", "or", "unless", "inf", "nan", "atan2"}


def defined_metrics(metrics_rs):
    src = pathlib.Path(metrics_rs).read_text()
    names = set(re.findall(r'"(bearer_proxy_[a-z0-9_]+)"', src))
    histograms = set(re.findall(r'histogram_vec\(\s*&\w+,\s*"(bearer_proxy_[a-z0-9_]+)"', src))
    if not names or not histograms:
        sys.exit(f"validate.py: found no metric definitions in {metrics_rs}; has its layout changed?")
    for h in histograms:
        # A histogram is exported only as these three series; its bare name matches nothing.
        names.discard(h)
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    return names, histograms


def metric_names(expr):
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {...} or by/without/on/ignoring (...)) or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                       # string literals
    e = re.sub(r"\$\{?\w+\}?", "1", e)                                 # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)                                   # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def cmd_metrics(args):
    known, histograms = defined_metrics(args.metrics_rs)
    print(f"{len(known)} metric names defined in {args.metrics_rs} "
          f"(histograms: {', '.join(sorted(histograms))})")
    exprs = []  # (where, expr)
    with open(args.rules) as f:
        for g in yaml.safe_load(f)["groups"]:
            for r in g["rules"]:
                exprs.append((f"{args.rules}: {r.get('alert') or r.get('record')}", r["expr"]))
    try:
        with open(args.dashboard) as f:
            dash = json.load(f)
        ok(f"{args.dashboard} parses as JSON")
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{args.dashboard}: {e}")
        return
    panels = []
    for p in dash.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))  # collapsed rows
    records = []
    for p in panels:
        for t in p.get("targets", []):
            exprs.append((f"{args.dashboard}: panel {p.get('title')!r}", t["expr"]))
            # Grafana's variables replaced by values, so that promtool can parse the query.
            q = t["expr"].replace("$__rate_interval", "5m")
            q = re.sub(r"\$\{?\w+\}?", ".*", q)
            records.append({"record": f"dashboard:panel{p.get('id')}:{t.get('refId', 'A')}", "expr": q})
    if args.promql_out:
        with open(args.promql_out, "w") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": records}]}, f,
                           sort_keys=False)
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q or "")
        if v.get("type") == "query":
            if not m:
                fail(f"{args.dashboard}: variable {v['name']}: expected label_values(metric, label)")
                continue
            exprs.append((f"{args.dashboard}: variable {v['name']}", m.group(1)))
    for where, expr in exprs:
        used = metric_names(expr)
        unknown = sorted(used - known)
        if not used:
            fail(f"{where}: no metric name found in {expr!r}")
        elif unknown:
            fail(f"{where}: not defined in {args.metrics_rs}: {', '.join(unknown)}")
        else:
            ok(f"{where}: {', '.join(sorted(used))}")
    unused = sorted(known - {n for _, e in exprs for n in metric_names(e)}
                    - {h + s for h in histograms for s in ("_sum", "_count")})
    if unused:
        print(f"  note: not shown anywhere: {', '.join(unused)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("--kube-version", required=True)
    m.add_argument("--rules-dir", required=True)
    m.add_argument("files", nargs="+")
    n = sub.add_parser("metrics")
    n.add_argument("metrics_rs")
    n.add_argument("rules")
    n.add_argument("dashboard")
    n.add_argument("--promql-out", help="write the dashboard's queries as recording rules here, "
                   "for `promtool check rules` to parse")
    args = ap.parse_args()
    {"manifests": cmd_manifests, "metrics": cmd_metrics}[args.cmd](args)
    if failures:
        print(f"validate.py {args.cmd}: {len(failures)} problem(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
