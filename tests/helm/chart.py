"""Lints charts/kinsight and installs, upgrades or uninstalls it in a cluster with Helm's own
library (PyPI helm-sdkpy, Helm v4). Usage: chart.py lint | chart.py install|upgrade
<kubeconfig> <namespace> [<values as JSON>] | chart.py uninstall <kubeconfig> <namespace>.
Prints one JSON object."""

import asyncio
import json
import sys

import helm_sdkpy

CHART = "charts/kinsight"


async def main():
    if sys.argv[1] == "lint":
        result = await helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace="default")).run(CHART)
    else:
        kubeconfig, namespace = sys.argv[2], sys.argv[3]
        values = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {"image": {"tag": "test"}}
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
        # The callers wait for the pods themselves (and say what they saw).
        if sys.argv[1] == "install":
            result = await helm_sdkpy.Install(config).run(
                "kinsight", CHART, values=values, create_namespace=True, wait=False
            )
        elif sys.argv[1] == "upgrade":
            result = await helm_sdkpy.Upgrade(config).run(
                "kinsight", CHART, values=values, wait=False
            )
        elif sys.argv[1] == "uninstall":
            result = await helm_sdkpy.Uninstall(config).run("kinsight", wait=False)
        else:
            raise SystemExit(f"unknown action {sys.argv[1]!r}")
    print(json.dumps(result, default=str))


asyncio.run(main())
