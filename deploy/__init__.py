"""Deployment helpers: TLS certificates and SuperNode keys, and a local TLS cluster.

``python -m deploy.make_certs`` writes the files a real deployment needs;
``python -m deploy.local_cluster`` runs the app on loopback with a real
``flower-superlink`` and N ``flower-supernode`` processes (TLS and SuperNode
authentication on). See "Running across machines" in the project README.
"""
