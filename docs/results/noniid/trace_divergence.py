"""Trace one diverging ResIST run node by node (the measurement behind README.md here).

Runs the probe's cell (real digits, PreActResNet-101 width 16, 4 nodes, Dirichlet 0.3,
15 rounds, batch 32, lr 0.05) with 50 local steps, in-process, and prints per round and node:
the classes in the node's partition, how many partitioned blocks it held, its mean training
loss, the relative size of its update to the shared layers and to its own blocks, and the
largest BatchNorm weight it returned::

    python docs/results/noniid/trace_divergence.py [SEED] [LOCAL_STEPS] [NORM] [CLIP_GRAD_NORM]

``trace-resist-batchnorm-seed1-l50.json`` holds the lines ``1 50 batchnorm 0`` printed (no clipping, the
app's default before the study), ``trace-resist-batchnorm-seed1-l50-clip1.json`` those of ``1 50 batchnorm 1.0``
(today's default): each printed line became one row, its fields unchanged, when the printed traces were
converted once to JSON (so no figure is parsed from printed text).

Kept as recorded: it runs with the code of commit 9508bb9 (``git worktree add /tmp/t 9508bb9``), whose
``simulations.probe`` and ``simulations.digits`` it imports; today's runner replays its setting as the
presets ``noniid-digits-l50`` and ``noniid-digits-l50-replay``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.app import _partition, _run_of, identity_handler, train_handler
from simulations.digits import write_digits_npz
from simulations.inprocess import run_inprocess
from simulations.probe import BASE, app_defaults

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
norm = sys.argv[3] if len(sys.argv) > 3 else "batchnorm"
clip = float(sys.argv[4]) if len(sys.argv) > 4 else float(app_defaults()["clip-grad-norm"])

traced = ClientApp()
traced.query()(identity_handler)


@traced.train()
def _traced(msg: Message, context: Context) -> Message:
    sent = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}
    reply = train_handler(msg, context)
    settings, _, layout = _run_of(context, msg.content["config"])
    pid = int(context.node_config["partition-id"])
    labels = _partition(settings.dataset, settings.data_path, settings.partitioner, settings.dirichlet_alpha,
                        settings.seed, pid, 4).labels
    got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    blocks = list(msg.content["config"]["blocks"])

    def rel(keys):
        keys = [k for k in keys if got[k].dtype.kind == "f"]
        num = sum(float(np.sum((got[k] - sent[k]) ** 2)) for k in keys)
        den = sum(float(np.sum(sent[k] ** 2)) for k in keys)
        return (num / max(den, 1e-12)) ** 0.5

    own = [k for k in got if layout.key_block.get(k) in blocks]
    shared = [k for k in got if k not in own]
    bn = [k for k in own if ".bn" in k and k.endswith("weight")]
    print(f"round {int(msg.content['config']['server-round']):2d} node {pid}: classes "
          f"{''.join(str(c) for c in sorted(set(labels.tolist()))):10s} n={len(labels):3d} blocks={len(blocks):2d} "
          f"loss={reply.content['metrics']['train-loss']:7.3f} update shared={rel(shared):.3f} own={rel(own):.3f} "
          f"max|bn w| own={max((float(np.abs(got[k]).max()) for k in bn), default=0):.2f}", flush=True)
    return reply


out = Path(tempfile.mkdtemp(prefix="trace-"))
config = {**app_defaults(), **BASE, "dataset": "npz", "data-path": write_digits_npz(out / "digits.npz"),
          "partitioner": "dirichlet", "dirichlet-alpha": 0.3, "local-steps": steps, "norm": norm, "seed": seed, "clip-grad-norm": clip,
          "min-available-nodes": 4, "min-train-nodes": 4, "eval-batch-size": 500, "output-dir": str(out),
          "run-name": "trace"}
run_inprocess(config, num_nodes=4, client=traced)
