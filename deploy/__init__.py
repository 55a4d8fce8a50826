"""Deployment helpers: TLS certificates and SuperNode keys, a local TLS cluster, the local SuperLink,
a local Ray cluster.

``python -m deploy.make_certs`` writes the files a real deployment needs;
``python -m deploy.local_cluster`` runs the app on loopback with a real
``flower-superlink`` and N ``flower-supernode`` processes (TLS and SuperNode
authentication on); ``python -m deploy.local_superlink stop`` stops the SuperLink a plain
``flwr run .`` left running; :class:`deploy.ray_cluster.LocalRayCluster` starts a head and more Ray
nodes on loopback. See "Running across machines" in the project README.
"""
