"""How soon a Ctrl-C ends `run_eval.py` reading a prepared dataset with grain reading processes.

    PYTHONPATH=. .venv/bin/python benchmarks/ctrl_c_bench.py --repeats 5

On a Ctrl-C, `run_eval.py` ends the grain reading processes that have not made an element yet
at once (`Reading.stop_starting` in stam_jax/data/reading.py sends them `STOP_STARTING`),
instead of waiting for each to finish starting (importing grain, JAX and TFDS) and read a
video. This measures that, two variants side by side, alternating in one run so that drift on
a shared machine hits both:

- `early_stop`: the code as it is;
- `no_early_stop`: the same, with `Reading.stop_starting` replaced by a no-op.

Each child gets a `sitecustomize.py` on its PYTHONPATH; the two files differ in one constant.
The file installs an import hook that, once `stam_jax.data.reading` is imported, replaces
`Reading.stop_starting` with a no-op (`no_early_stop`) or leaves it as it is (`early_stop`):
nothing else is imported earlier or differently.

Setup (not timed): `--unique` tiny videos (10 classes, 48x64, 1.5 s), hard-linked up to
`--videos` files, a random-weight `stam_tiny` checkpoint, a prepared raw `eval` dataset
(`python -m stam_jax.data.prepare`), and one whole `run_eval.py` run that fills a compilation
cache the timed runs share. Then, per repetition and per moment, each variant's
`run_eval.py --config=configs/tiny.py --config.data.workers=N` is started in a session of its
own and sent SIGINT to its whole process group, as a terminal's Ctrl-C, at the moment:

- `spawned`: as soon as all N reading processes exist (`--multiprocessing-fork` children);
- `spawned+S`: S seconds after that;
- `first_batch`: once the first batch's results are kept (`WORKDIR/partial/p0.bin`).

Timed from SIGINT: `exit_s`, until the command exits; `gone_s`, until no process of its
session is left (the reading processes and grain's resource tracker included). A run counts
as good only with exit status 130 and stderr exactly one `interrupted: ...` line; anything
else is a failure, shown with its stderr. Prints one JSON line per run, one per (moment,
variant) with the median and range over the good runs, then a Markdown table.

`--smoke` (CI) sets the sizes that the command line leaves unset to 4 videos, 1 encoded, 2
workers, 1 repeat and the `spawned` moment, and skips the whole run; options given explicitly
win over it. `--workers -1` is one reading process per core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _args import checked, default_help, fill_unset, number, whole, workers

from stam_jax.cli import ArgumentParser
from stam_jax.data.loader import worker_count

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("early_stop", "no_early_stop")
NUM_CLASSES = 10  # stam_tiny
RECORD_BYTES = 8 + 2 * 4 * NUM_CLASSES + 4  # a kept video in partial/p0.bin (stam_jax.partial)

# The children's sitecustomize.py: the variants differ only in NO_EARLY_STOP.
SITECUSTOMIZE = '''"""ctrl_c_bench: Reading.stop_starting as it is, or a no-op (NO_EARLY_STOP)."""
import importlib.abc
import sys

NO_EARLY_STOP = {no_early_stop}
_MODULE = "stam_jax.data.reading"


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    if NO_EARLY_STOP:
                        module.Reading.stop_starting = lambda self: None

                spec.loader.exec_module = exec_module
                return spec
        return None


sys.meta_path.insert(0, _Patch())
'''


def session_processes(session: int) -> dict[int, str]:
    """The processes of `session` that run (not zombies): pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session or fields[0] in ("Z", "X"):
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return found


def reading_processes(session: int) -> int:
    """How many spawned multiprocessing children (grain's reading processes) the session has."""
    return sum("--multiprocessing-fork" in cmd for cmd in session_processes(session).values())


def setup(args: argparse.Namespace, work: Path) -> dict:
    """Videos, checkpoint, prepared dataset and a filled compilation cache; what it took."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only writes the checkpoint
    import jax
    import numpy as np

    from stam_jax import checkpoints, create_model
    from stam_jax.data.synthetic import write_index_video

    start = time.perf_counter()
    videos = work / "videos"
    paths = [videos / f"class_{i % NUM_CLASSES}" / f"video_{i}.mp4" for i in range(args.videos)]
    for i, path in enumerate(paths):
        if i < args.unique:
            write_index_video(path, seed=i, height=48, width=64, frames=45)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(paths[i % args.unique], path)
    classes = work / "classes.txt"  # all 10, whatever folders the videos fill
    classes.write_text("".join(f"class_{c}\n" for c in range(NUM_CLASSES)))
    prepare = [sys.executable, "-m", "stam_jax.data.prepare", f"--src={videos}"]
    prepare += [f"--out={work / 'prepared'}", "--config=configs/tiny.py"]
    prepare += [f"--config.data.class_list={classes}", "--config.progress=False"]
    prepare += [f"--workers={0 if args.smoke else 2}"]
    preparing = subprocess.Popen(  # while this process writes the checkpoint
        prepare, cwd=ROOT, env=child_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    model = create_model("stam_tiny")
    video = np.zeros((1, model.num_frames, model.image_size, model.image_size, 3), np.uint8)
    params = jax.jit(model.init)(jax.random.key(0), video)["params"]
    checkpoints.save(work / "ckpt", model, params)
    output, _ = preparing.communicate()
    if preparing.returncode != 0:
        raise SystemExit(f"preparing failed ({preparing.returncode}): {output[-3000:]!r}")
    setup_s = time.perf_counter() - start
    for variant in VARIANTS:
        site = work / f"site_{variant}"
        site.mkdir()
        text = SITECUSTOMIZE.format(no_early_stop=variant == "no_early_stop")
        (site / "sitecustomize.py").write_text(text)
    report = {
        "videos": args.videos,
        "unique": args.unique,
        "workers": args.workers,
        "batch": args.batch,
        "setup_s": round(setup_s, 1),
    }
    if args.smoke:  # its moment comes before the compile: no cache needed
        return {"setup": report}
    # One whole run: fills the compilation cache and shows how long the evaluation lasts.
    start = time.perf_counter()
    out = subprocess.run(
        eval_command(args, work, work / "out_whole"),
        cwd=ROOT,
        env=child_env(work / "site_early_stop"),
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    whole_s = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed ({out.returncode}): {out.stderr[-3000:]}")
    timing = json.loads((work / "out_whole" / "results.json").read_text())["timing"]
    report["whole_run_s"] = round(whole_s, 1)
    report["whole_run_eval_s"] = timing["eval_s"]
    report["whole_run_first_batch_after_s"] = timing["first_batch_after_s"]
    return {"setup": report}


def child_env(site: Path | None) -> dict[str, str]:
    """The caller's environment, the repository (and a sitecustomize folder) first on the path."""
    parts = [str(site)] if site else []
    parts += [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in parts if p)}
    env.pop("JAX_PLATFORMS", None)
    if _CALLER_PLATFORMS is not None:
        env["JAX_PLATFORMS"] = _CALLER_PLATFORMS
    return env


_CALLER_PLATFORMS = os.environ.get("JAX_PLATFORMS")


def eval_command(args: argparse.Namespace, work: Path, workdir: Path) -> list[str]:
    """The evaluation that is interrupted."""
    return [
        sys.executable,
        "run_eval.py",
        "--config=configs/tiny.py",
        f"--config.checkpoint={work / 'ckpt'}",
        f"--config.data.root={work / 'prepared'}",
        f"--config.data.workers={args.workers}",
        f"--config.batch_size={args.batch}",
        "--config.progress=False",
        f"--config.compilation_cache_dir={work / 'cache'}",
        f"--workdir={workdir}",
    ]


def interrupt(args: argparse.Namespace, work: Path, run: int, moment: str, variant: str) -> dict:
    """One run: started, sent SIGINT at `moment`, timed until it and its session are gone."""
    workdir = work / f"out_{run}"
    row: dict = {"run": run, "moment": moment, "variant": variant}
    with open(work / f"err_{run}", "w+") as err, open(work / f"stdout_{run}", "w") as out:
        start = time.monotonic()
        process = subprocess.Popen(
            eval_command(args, work, workdir),
            cwd=ROOT,
            env=child_env(work / f"site_{variant}"),
            stdout=out,
            stderr=err,
            start_new_session=True,  # as a terminal's Ctrl-C: SIGINT to the whole group
        )
        try:
            _wait_for(moment, process, args, workdir, start)
            row["readers_at_sigint"] = reading_processes(process.pid)
            row["sigint_after_start_s"] = round(time.monotonic() - start, 2)
            sent = time.monotonic()
            os.killpg(process.pid, signal.SIGINT)
            while True:
                now = time.monotonic()
                if "exit_s" not in row and process.poll() is not None:
                    row["exit_s"] = round(now - sent, 3)
                if "exit_s" in row and not session_processes(process.pid):
                    row["gone_s"] = round(now - sent, 3)
                    break
                if now - sent > args.timeout:
                    row["error"] = f"still running {args.timeout} s after SIGINT"
                    break
                time.sleep(0.005)
        except _EndedEarly as e:
            row["error"] = str(e)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        row["status"] = process.returncode
        err.seek(0)
        lines = err.read().strip().splitlines()
    row["stderr"] = lines[0] if len(lines) == 1 else "\n".join(lines[-20:])
    good = row["status"] == 130 and len(lines) == 1 and lines[0].startswith("interrupted: ")
    row["ok"] = good and "error" not in row
    shutil.rmtree(workdir, ignore_errors=True)
    return row


class _EndedEarly(RuntimeError):
    """The command ended, or took too long, before the moment to interrupt it came."""


def _wait_for(
    moment: str, process: subprocess.Popen, args: argparse.Namespace, workdir: Path, start: float
) -> None:
    kept = workdir / "partial" / "p0.bin"
    name, _, delay = moment.partition("+")
    while True:
        if process.poll() is not None:
            raise _EndedEarly(f"ended (status {process.returncode}) before {moment}")
        if time.monotonic() - start > args.timeout:
            raise _EndedEarly(f"{moment} not reached in {args.timeout} s")
        if name == "spawned" and reading_processes(process.pid) >= args.workers:
            break
        if name == "first_batch" and kept.exists() and kept.stat().st_size >= RECORD_BYTES:
            break
        time.sleep(0.01)
    time.sleep(float(delay or 0))


def summary(rows: list[dict], moment: str, variant: str) -> dict:
    """Median and range over the good runs of one (moment, variant), and the failures."""
    mine = [r for r in rows if r["moment"] == moment and r["variant"] == variant]
    good = [r for r in mine if r["ok"]]
    out: dict = {"moment": moment, "variant": variant, "runs": len(mine), "good": len(good)}
    for key in ("exit_s", "gone_s"):
        values = [r[key] for r in good]
        if values:
            out[f"{key}_median"] = round(statistics.median(values), 2)
            out[f"{key}_range"] = [min(values), max(values)]
    out["statuses"] = sorted({r["status"] for r in mine})
    out["failures"] = [
        {k: r.get(k) for k in ("run", "status", "error", "stderr")} for r in mine if not r["ok"]
    ]
    return out


def table(summaries: list[dict]) -> str:
    """The summaries as a Markdown table."""
    lines = [
        "| moment | variant | good / runs | to exit: median (range) | "
        "all processes gone: median (range) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        cells = []
        for key in ("exit_s", "gone_s"):
            if f"{key}_median" in s:
                low, high = s[f"{key}_range"]
                cells.append(f"{s[f'{key}_median']:.2f} s ({low:.2f}-{high:.2f})")
            else:
                cells.append("-")
        lines.append(
            f"| {s['moment']} | {s['variant']} | {s['good']} / {s['runs']} | "
            f"{cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


# The options the command line leaves unset: these, or with --smoke SMOKE (given ones win).
DEFAULTS = {
    "videos": 200,
    "unique": 10,
    "workers": 3,
    "repeats": 5,
    "moments": "spawned,spawned+2,first_batch",
}
SMOKE = {"videos": 4, "unique": 1, "workers": 2, "repeats": 1, "moments": "spawned"}


def check_moments(text: str) -> str:
    """`--moments` as given, each spawned, spawned+SECONDS or first_batch.

    Raises:
      ValueError: another moment, saying what to use.
    """
    for moment in text.split(","):
        name, plus, delay = moment.partition("+")
        if name not in ("spawned", "first_batch") or (plus and not _seconds(delay)):
            raise ValueError(
                f"{moment!r} is not a moment; use a comma list of spawned, spawned+SECONDS or "
                "first_batch"
            )
    return text


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison; exit status 1 when any run failed."""
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--videos",
        action=whole(1),
        help=default_help(DEFAULTS, SMOKE, "videos", "records in the dataset"),
    )
    parser.add_argument(
        "--unique",
        action=whole(1),
        help=default_help(
            DEFAULTS, SMOKE, "unique", "videos encoded (others linked), at most --videos"
        ),
    )
    parser.add_argument(
        "--workers",
        action=workers(allow_zero=False, why_not_zero="the benchmark interrupts reading processes"),
        help=default_help(DEFAULTS, SMOKE, "workers", "--config.data.workers; -1: one per core"),
    )
    parser.add_argument("--batch", default=2, action=whole(1), help="--config.batch_size")
    parser.add_argument("--repeats", action=whole(1), help=default_help(DEFAULTS, SMOKE, "repeats"))
    parser.add_argument(
        "--moments",
        action=checked(check_moments),
        help=default_help(DEFAULTS, SMOKE, "moments", "comma list (see above)"),
    )
    parser.add_argument(
        "--timeout", default=300.0, action=number(0, what="seconds"), help="seconds per wait"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: 4 videos, 2 workers, 1 repeat, the spawned moment only, no whole run; the "
        "options given explicitly win",
    )
    args = parser.parse_args(argv)
    fill_unset(args, SMOKE if args.smoke else DEFAULTS)
    if args.unique > args.videos:
        parser.error(
            f"--unique={args.unique} is more than --videos={args.videos}; use at most --videos"
        )
    args.workers = worker_count(args.workers)
    moments = args.moments.split(",")
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background by a shell without job control (`... &` in a script): the
        # children would inherit SIGINT ignored and never see the Ctrl-C. A handled signal is
        # reset to its default action in a child, as a terminal's foreground command has it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="ctrl_c_bench_"))
    try:
        print(json.dumps(setup(args, work)), flush=True)
        rows = []
        for repeat in range(args.repeats):
            for moment in moments:
                # Alternating, and each variant first in every other repetition.
                order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    row = interrupt(args, work, len(rows), moment, variant)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        summaries = [summary(rows, m, v) for m in moments for v in VARIANTS]
        for s in summaries:
            print(json.dumps(s), flush=True)
        print(table(summaries), flush=True)
    finally:
        if args.keep:
            print(json.dumps({"work_folder": str(work)}), flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in rows if not r["ok"]]
    for r in failed:  # also on stderr, for whoever sees only that
        print(f"failed: {json.dumps(r)}", file=sys.stderr)
    return 1 if failed else 0


def _seconds(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
