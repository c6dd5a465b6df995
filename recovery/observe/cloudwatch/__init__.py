"""recovery's events as CloudWatch metrics (``"cloudwatch-emf"`` in
``RECOVERY["METRICS_BACKENDS"]``; docs/cloudwatch.md).

The same events the Prometheus counters count, with bounded dimensions (``Task``,
``Kind``, ``Queue``, ...), summed in memory per process and written every
``FLUSH_INTERVAL_SECONDS`` as Embedded Metric Format log lines, which the CloudWatch
agent, Lambda or the ``awslogs`` driver turn into metrics, or sent with PutMetricData
where no log agent runs. One concern a module:

* :mod:`.families`: which metrics exist, their dimensions and the sets CloudWatch
  aggregates them by;
* :mod:`.emf`: the format (EMF documents and PutMetricData's ``MetricData``), pure;
* :mod:`.options`: ``RECOVERY["CLOUDWATCH"]`` as one immutable value;
* :mod:`.buffer`: the in-memory sums and the thread that flushes them;
* :mod:`.sinks`: where a flush goes (a logger, or the PutMetricData API);
* :mod:`.receivers`: the event receivers :mod:`recovery.subscriptions` connects.
"""
