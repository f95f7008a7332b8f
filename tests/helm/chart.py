"""Lints charts/kinsight and installs it into a cluster with Helm's own library (PyPI
helm-sdkpy, Helm v4). Usage: chart.py lint | chart.py install <kubeconfig> <namespace>
[<values as JSON>]. Prints one JSON object."""

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
        # No kubelet runs the pods here, so the install does not wait for them.
        result = await helm_sdkpy.Install(config).run(
            "kinsight", CHART, values=values, create_namespace=True, wait=False
        )
    print(json.dumps(result, default=str))


asyncio.run(main())
