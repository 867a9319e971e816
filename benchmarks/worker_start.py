"""How soon a decoding process spawned by run_eval.py / run_train.py gives its first result.

    python benchmarks/worker_start.py --repeats 5

The decoding processes are started with 'spawn', which imports the parent's main module again
in each of them. Two parents are timed, each a fresh Python process, alternating:

- `now`: a main module with run_eval.py's own top-level imports (absl, ml_collections,
  stam_jax.cli; JAX is imported inside main());
- `jax_at_top`: the same plus `import stam_jax.evaluate` at the top, as run_eval.py and
  run_train.py had it before 2026-12-01 (each worker then imported JAX and Flax).

Each parent starts a pool of `--workers` processes and times the first result of each
(a trivial job: the start-up cost alone) and the workers' peak RSS.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _args import whole, workers

from stam_jax.cli import ArgumentParser
from stam_jax.data.loader import worker_count

ROOT = Path(__file__).resolve().parents[1]

PARENT = """
import sys
{imports}


def job(i):
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, this worker


if __name__ == "__main__":
    import concurrent.futures, json, multiprocessing, time
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor({workers}, mp_context=context) as pool:
        futures = [pool.submit(job, i) for i in range({workers})]
        rss = [f.result() for f in futures]
    took = time.perf_counter() - start
    print(json.dumps({{"first_results_s": took, "worker_rss_mib": max(rss)}}))
"""

VARIANTS = {
    "now": "from absl import app, flags, logging\nfrom ml_collections import config_flags\n"
    "import stam_jax.cli",
    "jax_at_top": "from absl import app, flags, logging\nfrom ml_collections import config_flags\n"
    "import stam_jax.cli\nimport stam_jax.evaluate",
}


def run(imports: str, workers: int) -> dict[str, float]:
    """One fresh parent process; its pool's time to all first results and worker peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        main = Path(tmp) / "parent.py"
        main.write_text(PARENT.format(imports=imports, workers=workers))
        out = subprocess.run(
            [sys.executable, str(main)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison and prints one JSON line per variant (medians)."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", default=5, action=whole(1))
    parser.add_argument(
        "--workers",
        default=2,
        action=workers(allow_zero=False, why_not_zero="the benchmark times their start"),
        help="processes in each pool (-1: one per core)",
    )
    args = parser.parse_args(argv)
    args.workers = worker_count(args.workers)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, imports in VARIANTS.items():  # alternating, so drift hits both
            results[name].append(run(imports, args.workers))
    for name, rows in results.items():
        summary = {
            "variant": name,
            "workers": args.workers,
            "repeats": args.repeats,
            "first_results_s_median": round(
                statistics.median(r["first_results_s"] for r in rows), 3
            ),
            "worker_rss_mib_median": round(statistics.median(r["worker_rss_mib"] for r in rows), 1),
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
