"""Searches on Ray, the only package that imports Ray: the cluster, one engine of trials for `tune` and `sweep`,
their orchestrations."""
