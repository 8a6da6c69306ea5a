"""Render and lint the chart with the real Helm v4 library (PyPI helm-python-sdk).

usage: render.py CHART VALUES_JSON
prints one JSON object: {"rendered": {template: text}, "lint": report, "schema_error": str|null,
"crds": [names], "helm": version}
"""
import json
import sys

import helm_python
from helm_python import chart as hc


def main():
    path, values = sys.argv[1], json.loads(sys.argv[2])
    out = {"helm": helm_python.helm_sdk_version(), "schema_error": None}
    c = hc.Chart.load(path)
    try:
        c.validate_schema(values)
    except helm_python.HelmValuesError as e:
        out["schema_error"] = str(e)
    out["crds"] = sorted(x["name"] for x in (c.crds or []))
    if out["schema_error"] is None:
        out["rendered"] = c.render(values, name="kvm", namespace="kvm-system", is_install=True)
    out["lint"] = helm_python.lint(path, values, strict=True, namespace="kvm-system", kube_version="v1.31.0")
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
