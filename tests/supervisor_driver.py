"""Runs metalora.supervisor.supervise() on the children a JSON spec (argv[1]) describes, as `metalora serve` runs
it (SIGTERM/SIGINT handlers installed), for tests/test_supervisor.py. Prints "ready" once every health URL
answered."""
import json
import os
import sys

from metalora import supervisor

spec = json.loads(sys.argv[1])
if "backoff" in spec:
    supervisor.RESTART_BACKOFF_S = tuple(spec["backoff"])
children = [supervisor.Child(c["name"], c["argv"], dict(os.environ), c.get("health_url"),
                             c.get("start_timeout_s", 600.0), log_path=c.get("log_path"))
            for c in spec["children"]]
stop = supervisor.Stop()
stop.install()
sys.exit(supervisor.supervise(children, stop, banner="ready"))
