"""`tei-manager serve`: the manager behind the REST API and the gRPC multiplexer.

One concern per module:

- ``service``: :class:`~tei_manager.manager.service.Manager`, the facade the API calls and
  the service that owns the instance runners (``Manager.run``);
- ``startup``: the start-up I/O run once in a worker thread (directories, orphans, GPUs,
  the state file);
- ``runtime``: the runtime file that lists live instance processes, for orphan reaping;
- ``hostports``: whether a port an instance asks for is free on this host;
- ``state``: the persisted desired state (atomic TOML writes);
- ``metrics``: the manager's Prometheus metrics;
- ``serve``: the root nursery, signals and graceful shutdown.

Nothing is imported here, so ``tei_manager.supervisor`` can import ``metrics`` without
pulling in the service that imports the supervisor.
"""
