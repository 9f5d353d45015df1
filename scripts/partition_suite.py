"""Network partitions of minutes between a real agent and a real Mosquitto.

Runs the scenarios of ``tests/system/test_partition.py`` (``tests/harness/partition.py``) with a
long
partition (the tests use a few keepalive periods): a partition while the operator deploys a
new version (inference goes on, telemetry waits in the outbox and arrives in order with none
lost, the deploy is taken after the heal) and a partition in the middle of a model download
(it resumes and commits without fetching the artifact again).

    python -m scripts.partition_suite [--cut 180] [--json] [--workdir DIR]

Exit status 1 when a scenario failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from tests.harness.fleet import close_local_fleet, local_fleet
from tests.harness.partition import partition_during_deploy, partition_mid_download
from tests.harness.util import script_workdir


def run_scenario(name: str, workdir: Path, cut_s: float, log: Any) -> dict[str, Any]:
    d = workdir / name
    fleet = local_fleet(d)
    try:
        if name == "deploy":
            result = partition_during_deploy(fleet, cut_s, log=log)
        else:
            result = partition_mid_download(fleet, cut_s, d, log=log)
        return {"scenario": name, "ok": True, **result}
    except (AssertionError, RuntimeError) as e:
        return {
            "scenario": name,
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc(),
        }
    finally:
        close_local_fleet(fleet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--cut", type=float, default=180.0, help="partition length, s (default 180)")
    ap.add_argument("--scenario", choices=("deploy", "download", "all"), default="all")
    ap.add_argument("--workdir", type=Path, help="keep data dirs and logs here")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    workdir = script_workdir(args.workdir, "partition-")
    names = ("deploy", "download") if args.scenario == "all" else (args.scenario,)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = [run_scenario(n, workdir, args.cut, log) for n in names]
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "trace"} for r in results], indent=2))
    else:
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "trace"}))
    for r in results:
        if not r["ok"]:
            print(r["trace"], file=sys.stderr)
    ok = all(r["ok"] for r in results)
    if args.workdir is None and ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
