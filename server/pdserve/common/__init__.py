"""The bottom layer: what every other layer shares (etcd client, record format, causes, constants); imports no other pdserve layer."""
