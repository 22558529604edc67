"""Cluster membership: etcd (client and a private server), engine registration, the live view."""
