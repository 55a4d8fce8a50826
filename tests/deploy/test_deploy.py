"""Deployment: certificates and keys, and a real TLS + SuperNode-auth cluster on loopback.

The cluster tests start a real ``flower-superlink`` and two ``flower-supernode``
processes (TLS, ``--enable-supernode-auth``), run 2 ResIST rounds of a tiny
model on the synthetic dataset, check that a SuperNode with an unregistered
key is refused, and that every process is gone at the end (about a minute).
"""

from __future__ import annotations

import stat
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from deploy.local_cluster import (
    SUPERLINK,
    SUPERNODE,
    ClusterError,
    LocalCluster,
    connection_toml,
    find_executable,
    parse_config_string,
)
from deploy.make_certs import make_certs, public_key_path
from resist_fl.run.cli_config import render_config
from resist_fl.run.processes import is_live

TINY_RESIST = {
    "dataset": "synthetic", "stage-depths": "1,1,4,1", "base-width": 8, "local-steps": 5, "batch-size": 32,
    "eval-batch-size": 250, "num-server-rounds": 2, "min-available-nodes": 2, "min-train-nodes": 2,
    "strategy": "resist", "run-name": "deploy",
}

needs_flower_binaries = pytest.mark.skipif(
    any(find_executable(b) is None for b in (SUPERLINK, SUPERNODE, "flwr")),
    reason="flower-superlink / flower-supernode / flwr not installed")

pytestmark = pytest.mark.slow  # a real SuperLink and SuperNodes over TLS (about 50 s)


# ------------------------------------------------------------ certificates


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
    files = make_certs(tmp_path, 1, hosts=["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    for secret in (files.ca_key, files.server_key, files.supernode_keys[0]):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


def test_supernode_keys_are_p384_openssh_pairs_that_flwr_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    files = make_certs(tmp_path, 2)
    for key_path in files.supernode_keys:
        private = load_ssh_private_key(key_path.read_bytes(), password=None)
        public = load_ssh_public_key(public_key_path(key_path).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert public.public_numbers() == private.public_key().public_numbers()
        assert try_load_public_key(public_key_path(key_path))
    assert files.supernode_keys[0].read_bytes() != files.supernode_keys[1].read_bytes()


def test_running_again_keeps_the_ca_and_existing_keys(tmp_path):
    first = make_certs(tmp_path, 1)
    ca, key0 = first.ca_cert.read_bytes(), first.supernode_keys[0].read_bytes()
    second = make_certs(tmp_path, 2, hosts=["new-host"])
    assert second.ca_cert.read_bytes() == ca
    assert second.supernode_keys[0].read_bytes() == key0
    assert len(second.supernode_keys) == 2 and public_key_path(second.supernode_keys[1]).exists()
    ca_cert = x509.load_pem_x509_certificate(ca)
    x509.load_pem_x509_certificate(second.server_cert.read_bytes()).verify_directly_issued_by(ca_cert)


def test_config_strings_round_trip_through_flowers_parser(tmp_path):
    config = {"a": 1, "b": 0.5, "c": True, "d": "it's", "e": 'say "x" \\ y', "f": tmp_path, "g": "1,1,4,1"}
    assert parse_config_string(render_config(config)) == {**config, "f": str(tmp_path)}
    with pytest.raises(ValueError, match="cannot hold both"):
        render_config({"h": "it's \"x\""})
    text = connection_toml("x", "127.0.0.1:1", tmp_path / "ca.crt", default=True)
    assert tomllib.loads(text) == {"superlink": {"default": "x", "x": {
        "address": "127.0.0.1:1", "root-certificates": str(tmp_path / "ca.crt")}}}


# ----------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A started 2-node cluster, stopped (again) at the end of the module."""
    local = LocalCluster(tmp_path_factory.mktemp("cluster"), num_supernodes=2)
    local.start()
    yield local
    local.stop()


@needs_flower_binaries
def test_supernode_with_unregistered_key_is_refused(cluster):
    intruder = cluster.start_supernode(cluster.new_unregistered_key(), {"partition-id": 0, "num-partitions": 2},
                                       name="intruder")
    returncode = intruder.wait(timeout=60)
    assert returncode != 0  # Flower's exit code 305
    assert "Failed to activate SuperNode" in cluster.supervisor.log_path("intruder").read_text()
    assert "No SuperNode found with the given public key" in cluster.supervisor.log_path(SUPERLINK).read_text()
    assert len([n for n in cluster.nodes() if n["status"] == "online"]) == 2


@needs_flower_binaries
def test_a_failed_run_is_reported_although_flwr_run_exits_0(cluster):
    with pytest.raises(ClusterError, match="did not finish"):
        cluster.run({**TINY_RESIST, "strategy": "no-such-strategy", "run-name": "failing"}, timeout=120)


@needs_flower_binaries
def test_two_resist_rounds_over_tls_with_authenticated_supernodes(cluster, tmp_path):
    cache = tmp_path / "partition-cache"
    result = cluster.run({**TINY_RESIST, "output-dir": str(tmp_path), "partition-cache": str(cache)}, timeout=240)
    assert result.run_dir == tmp_path / "deploy"
    # each node decoded its partition once, into the node-local cache (a new ClientApp process per round)
    entries = sorted(p.parent for p in cache.glob("*/images.npy"))
    assert len(entries) == 2 and all((e / "labels.npy").exists() for e in entries)
    assert [row["round"] for row in result.metrics] == [1, 2]
    trained = [(row["nodes"], row["replies-accepted"], row["bytes-up"] > 0) for row in result.metrics]
    assert trained == [(2, 2, True)] * 2, f"not every node trained every round; see {result.log}"
    assert result.summary["strategy"] == "resist" and result.summary["rounds"] == 2


@needs_flower_binaries
def test_a_supernodes_own_privacy_budget_refuses_what_the_run_config_asks(cluster, tmp_path):
    """A third SuperNode whose node config caps its epsilon far below one round's: under the run's local DP it
    trains nothing, the other two train, and its refusal reaches the server as a failed reply."""
    key = cluster.new_unregistered_key("budgeted")
    cluster.register(public_key_path(key))
    cluster.start_supernode(key, {"partition-id": 2, "num-partitions": 3, "dp-max-epsilon": 0.001,
                                  "dp-ledger-dir": str(tmp_path / "ledger")}, name="supernode-budgeted")
    cluster.wait_until_online(3)
    result = cluster.run({**TINY_RESIST, "output-dir": str(tmp_path), "run-name": "budget", "num-server-rounds": 1,
                          "dp": "local", "norm": "groupnorm", "weighting": "uniform", "min-available-nodes": 3,
                          "min-train-nodes": 3, "fraction-train": 1.0}, timeout=240)
    assert [(r["replies-accepted"], r["replies-failed"]) for r in result.metrics] == [(2, 1)], result.log
    assert not list((tmp_path / "ledger").glob("*.json"))  # nothing trained, nothing charged (its lock file only)


@needs_flower_binaries
def test_every_process_is_stopped(cluster):
    running = cluster.supervisor.alive()
    assert len(running) >= 5  # superlink + its superexec, 2 supernodes + their superexecs
    cluster.stop()
    assert cluster.supervisor.alive() == []
    survivors = [p.pid for p in cluster.supervisor.seen.values() if is_live(p)]  # same process (PID + start time)
    assert survivors == []
