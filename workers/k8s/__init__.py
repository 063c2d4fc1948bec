"""Kubernetes monitor family: Pods, Services, EndpointSlices, NetworkPolicies, Nodes.

``k8s-informer`` (primary, the ``kubernetes`` client: list + watch) and
``kubectl`` (fallback, ``kubectl get --watch`` subprocesses) share ``events``:
both feed raw API objects to the same trackers, so both emit the same kinds
with the same fields by construction.
"""
