"""A simulated straggler, as a ClientApp mod (simulation only): ``slowdown-profile``.

A node whose partition's entry of the run config's ``slowdown-profile`` is s > 1 sleeps (s - 1) times
its training seconds after training, so that the server waits for it as for a slower device. Its reply
says so: ``train-seconds`` includes the sleep and ``simulated-seconds`` is the sleep alone (0 for a node
at full speed). Under DP the reply carries no times; the node still sleeps (s - 1) times its training
handler's seconds. Only training messages are slowed. Nothing else in the ClientApp knows about it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Context, Message, MessageType

from resist_fl.run.settings import parse_profile, profile_value


def slowdown_of(context: Context) -> float:
    """The node's factor from the run config's ``slowdown-profile`` by its ``partition-id`` (1.0: none)."""
    profile = parse_profile("slowdown-profile", str(context.run_config.get("slowdown-profile", "")), low=1.0)
    partition = context.node_config.get("partition-id")
    if not profile or not isinstance(partition, int) or isinstance(partition, bool):
        return 1.0
    return profile_value(profile, partition)


def simulated_straggler(message: Message, context: Context,
                        call_next: Callable[[Message, Context], Message]) -> Message:
    """Train, then sleep the simulated extra time and add it to the reply's figures (see the module)."""
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    start = time.perf_counter()
    reply = call_next(message, context)
    elapsed = time.perf_counter() - start
    if reply.has_error():
        return reply
    metrics = reply.content.get("metrics")
    timed = metrics is not None and "train-seconds" in metrics
    seconds = float(metrics["train-seconds"]) if timed else elapsed
    simulated = (slowdown_of(context) - 1.0) * seconds
    time.sleep(simulated)
    if timed:
        metrics["train-seconds"] = seconds + simulated
        metrics["simulated-seconds"] = simulated
    return reply
