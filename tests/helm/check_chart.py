"""Lints the Helm chart with the real Helm library (helm-python-sdk, offline), renders it with
every values file of values/, validates each rendered manifest against the Kubernetes schemas
(kubernetes-validate), and checks that each file of bad-values/ is rejected by the chart's
values.schema.json. Exit 0 only if all of that holds.

    python3 tests/helm/check_chart.py                 # the checks
    python3 tests/helm/check_chart.py --rules FILE    # print the rendered rules ConfigMap's data (JSON)
"""

import json
import pathlib
import sys

import helm_python as helm
import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
CHART = HERE.parent.parent / "helm" / "sluice"
KUBERNETES = "1.33.0"
# Custom resources have no schema in kubernetes-validate: checked by shape here.
CUSTOM = {"ServiceMonitor": "monitoring.coreos.com/v1"}


def load_values(path):
    values = yaml.safe_load(path.read_text()) or {}
    assert isinstance(values, dict), f"{path}: values must be a mapping"
    return values


def render(chart, values):
    manifests = chart.render(values, name="sluice", namespace="sluice", is_install=True)
    docs = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((template, doc))
    return docs


def check():
    failures = []
    report = helm.lint(str(CHART), strict=True)
    for message in report.get("messages", []):
        level = message.get("severity")
        print(f"lint [{level}] {message.get('path')}: {message.get('error')}")
        if level and level >= 2:
            failures.append(f"lint: {message.get('error')}")
    failures += [f"lint: {e}" for e in report.get("errors", []) or []]

    chart = helm.Chart.load(str(CHART))
    for path in sorted((HERE / "values").glob("*.yaml")):
        values = load_values(path)
        try:
            chart.validate_schema(values)
            docs = render(chart, values)
        except Exception as error:  # noqa: BLE001 - every failure is reported
            failures.append(f"{path.name}: {error}")
            continue
        kinds = []
        for template, doc in docs:
            kind = doc.get("kind")
            kinds.append(kind)
            if kind in CUSTOM:
                if doc.get("apiVersion") != CUSTOM[kind] or not doc.get("spec"):
                    failures.append(f"{path.name}: {template}: malformed {kind}")
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            except Exception as error:  # noqa: BLE001
                failures.append(f"{path.name}: {template}: {kind}: {error}")
        print(f"{path.name}: {len(docs)} manifests valid for Kubernetes {KUBERNETES}: {', '.join(sorted(kinds))}")

    for path in sorted((HERE / "bad-values").glob("*.yaml")):
        try:
            chart.validate_schema(load_values(path))
        except Exception as error:  # noqa: BLE001
            print(f"{path.name}: rejected as it should be: {' '.join(str(error).split())}")
            continue
        failures.append(f"{path.name}: the schema accepted values it should reject")

    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


def rules(values_file):
    chart = helm.Chart.load(str(CHART))
    values = load_values(pathlib.Path(values_file)) if values_file != "-" else {}
    for _, doc in render(chart, values):
        if doc.get("kind") == "ConfigMap":
            print(json.dumps(doc["data"]))
            return 0
    print("no rules ConfigMap rendered", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rules":
        sys.exit(rules(sys.argv[2]))
    sys.exit(check())
