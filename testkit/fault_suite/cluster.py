"""The cluster round: the same pipeline, model and checks on a 3-node RabbitMQ cluster of
extra nodes on this machine (scripts/rabbit_cluster.py; the machine's own node is not
touched), whose node 1 is killed in the middle of a round.

Every queue is a quorum queue declared through node 1 (the suite connects there first),
so node 1 leads them all; the eight replicas are spread over the three nodes, each given
every node's URL starting with its own. Losing node 1 loses the queues' leaders, the
replicas connected to it and the suite's own publisher: the queues elect new leaders on
the other two, everyone reconnects, and nothing may be lost or doubled. A smaller load
than the main run's (fewer pairs and rounds), no other fault.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

from scripts import rabbit_cluster
from testkit.fault_suite import checks
from testkit.fault_suite.report import print_report
from testkit.fault_suite.scenario import Scenario
from testkit.fault_suite.world import World, say

NODES = 3


def cluster_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "rounds": args.cluster_rounds, "pacc_pairs": args.pacc_pairs // 4,
                                 "gtr_pairs": args.gtr_pairs // 4, "cap_pairs": args.cap_pairs // 4, "kills": 0,
                                 "skip_broker_restart": True, "skip_db_restart": True})


def unavailable() -> str | None:
    """Why no cluster can be made here (no rabbitmq-server, not root), or None."""
    return rabbit_cluster.missing_requirement()


def run(args: argparse.Namespace) -> bool:
    began = time.monotonic()
    sub = cluster_args(args)
    port_base, dist_base = rabbit_cluster.free_port_bases(NODES)
    tag = uuid.uuid4().hex[:6]
    cluster = rabbit_cluster.RabbitCluster(nodes=NODES, base=Path(f"/tmp/kpi-fault-cluster-{tag}"),
                                           prefix=f"kpif{tag}-n", port_base=port_base, dist_base=dist_base)
    world = World(sub, node_urls=[cluster.urls_from(i) for i in cluster.indexes])
    try:
        say(f"cluster round: booting {NODES} RabbitMQ nodes on ports {port_base + 1}-{port_base + NODES}")
        cluster.up()
        say(f"cluster round: {NODES} nodes clustered in {cluster.timings['up']:.1f}s")
        scenario = Scenario(sub, world, cluster=cluster)
        scenario.setup()
        scenario.run()
        rows = checks.verify(sub, scenario.model, world, scenario.faults, scenario.poison,
                             scenario.barrier_timeouts, planned=["RabbitMQ node lost"])
        scenario.timings["cluster up"] = cluster.timings["up"]
        return print_report(sub, scenario.published, scenario.faults.records, rows, scenario.timings,
                            world.broker.retries, time.monotonic() - began,
                            title=f"cluster round: {NODES} RabbitMQ nodes, node 1 lost mid-stream")
    finally:
        world.teardown()
        cluster.down()
