"""Fault-injection suite: nothing is lost or doubled.

Runs the four services as two real processes each against their own database and
exchange, a fake HasOffers network and an SMTP sink; drives metric values through the
pipeline (loads through the metric_loader, the bulk as metric.loaded batches it
publishes itself) while it kills replicas with SIGKILL, restarts RabbitMQ and
PostgreSQL, takes the SMTP server and HasOffers away, publishes duplicates, stale and
poison messages. Then it waits for the pipeline to drain, compares everything with a
reference model computed from the values alone and prints a table. Exit status 0 only
when every invariant holds.

    scripts/fault-suite [--seed N] [--rounds N] [--skip-broker-restart] [--skip-db-restart]

- world.py: the replicas, the fake HasOffers, the SMTP sink, the suite's own broker and
  database connections (which survive the restarts);
- injectors.py: the faults, and which runs each crash caught mid side effect;
- scenario.py: the rounds, what is published in each, the barrier and the drain;
- model.py: the seed and the reference model (DESIGN.md sections 4 and 8);
- checks.py: one function per invariant, each a row of the results table;
- report.py: the table and the verdict.
"""
