"""What KubeRay's CRDs declare for ray.io/v1 RayCluster and RayJob (KubeRay 1.6+), as JSON Schema.

Facts read from KubeRay's `ray-operator/config/crd/bases/ray.io_rayclusters.yaml` and
`ray.io_rayjobs.yaml` and written down here (nothing copied): the required fields, the types of
the fields mmflow's manifests use, and every property the group and job specs know (a misspelt
field is pruned or refused by the API server, so these schemas refuse unknown ones). Pod
templates are checked only as far as KubeRay needs them: a `spec.containers` list, the first
container running Ray.
"""

from __future__ import annotations

import re

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {
    "type": ["integer", "string"],
    "pattern": r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[numkMGTPE])?$",
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "resources": {
            "type": "object",
            "properties": {
                "limits": {"type": "object", "additionalProperties": QUANTITY},
                "requests": {"type": "object", "additionalProperties": QUANTITY},
            },
        },
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "envFrom": {"type": "array", "items": {"type": "object"}},
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}},
        }
    },
}
HEAD_GROUP = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "serviceType": {"type": "string"},
        "enableIngress": {"type": "boolean"},
        "labels": STRING_MAP,
        "resources": STRING_MAP,
        **{k: {} for k in ("headService", "ingressOptions")},
    },
}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "labels": STRING_MAP,
        "resources": STRING_MAP,
        "idleTimeoutSeconds": {"type": "integer"},
        "numOfHosts": {"type": "integer"},
        "suspend": {"type": "boolean"},
        **{k: {} for k in ("priority", "scaleStrategy")},
    },
}
CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "properties": {
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "version": {"enum": ["v1", "v2"]},
            },
        },
        "authOptions": {
            "type": "object",
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            },
        },
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "suspend": {"type": "boolean"},
        **{
            k: {}
            for k in (
                "gcsFaultToleranceOptions",
                "headServiceAnnotations",
                "historyServerOptions",
                "managedBy",
                "networkPolicy",
                "tlsOptions",
                "upgradeStrategy",
            )
        },
    },
}
JOB_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "rayClusterSpec": CLUSTER_SPEC,
        "clusterSelector": STRING_MAP,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "runtimeEnvYAML": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "suspend": {"type": "boolean"},
        **{
            k: {}
            for k in (
                "deletionStrategy",
                "jobId",
                "managedBy",
                "metadata",
                "preRunningDeadlineSeconds",
                "submitterConfig",
                "submitterPodTemplate",
            )
        },
    },
}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # KubeRay: a RayJob's cluster name adds 6 characters
