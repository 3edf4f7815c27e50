"""OpInfo conformance sweep: every op_db op's samples on "mlx" against the CPU, in one process.

    .venv/bin/python tools/conformance.py --dtype float32 --json OUT [--ops a,b] [--llm]

Prints a one-line summary and writes OUT (JSON): ops_total (op_db ops with samples at the dtype;
samples that need float64/complex128 raise mlx's designed TypeError and are counted apart),
ops_passing (ops all of whose samples pass; ops in the expected-failures list that fail count as
failing), samples_total, samples_passing, mismatches_unexplained (samples that ran but gave
different values than the CPU, in ops not in the expected list), the aten ops whose missing
lowering blocks the most OpInfo ops, the LLM op check (tests/torch_mlx/llm_ops.py) and per_op.

Each sample is compared exactly as tests/torch_mlx/test_opinfo.py does (shared code in
tests/torch_mlx/opinfo_harness.py). The samples run in a child process watched by this one: a
sample that takes longer than --timeout seconds, or a crash in native code, ends the child; the
op is recorded as "timeout" / "crash" and a new child carries on with the next op.

Exit status: 0 when every failing op is in the expected list or fails with a missing lowering or
error, 1 when there are unexplained mismatches or expected failures that now pass (the list must
shrink), 2 for bad arguments, 3 when --deadline stopped the sweep before every op ran.

``--jobs N`` runs N children side by side on interleaved shares of the ops.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "torch_mlx"))  # the harness lives with the tests

TIMEOUT, CRASH = "timeout", "crash"
STARTUP_TIMEOUT_S = 600  # importing torch and op_db in a fresh child on a busy 2-core machine


# ----------------------------------------------------------------------------------------------
# The child: runs ops, reports every sample's start and every op's result over a pipe


def _worker(conn, dtype_name: str, names: list[str], kinds: list[str], stack_file: str) -> None:
    import faulthandler
    import warnings

    # On a hang the parent sends SIGABRT: every thread's Python stack lands in stack_file (and a
    # native crash leaves its stack there too).
    faulthandler.enable(open(stack_file, "w"), all_threads=True)
    warnings.simplefilter("ignore")
    import opinfo_harness as harness

    dtype = harness.dtype_from_name(dtype_name)
    ops = {op.full_name: op for op in harness.ops_for_dtype(dtype, names)}
    for name in names:
        op = ops[name]
        conn.send(("op_start", name))
        started = time.perf_counter()
        report = harness.new_report(op, dtype)
        samples = None
        for kind in kinds:
            part = report.kind(kind)
            try:
                if kind in (harness.KIND_SAMPLES, harness.KIND_REFERENCE) and samples is None:
                    samples = harness.samples_of(op, dtype)
                items, part.duplicates = harness.inputs_of(op, dtype, kind, samples)
            except Exception as exc:  # op_db's generator itself failed: nothing of it ran
                items = []
                harness.record(report, kind, harness.SampleResult(
                    harness.ERROR, f"making the {kind} inputs failed: {type(exc).__name__}: {exc}"))
            for index, (item, keep_on_cpu) in enumerate(items):
                conn.send(("sample", name, kind, index))
                result = harness.run_input(op, kind, item, keep_on_cpu)
                harness.record(report, kind, result)
                conn.send(("sample_done", name, kind, result.status))
        conn.send(("op_done", name, {
            "status": report.status,
            "kinds": {kind: _kind_result(part) for kind, part in report.kinds.items()},
            "missing_ops": report.missing_ops,
            "value_compared": report.value_compared,
            "seconds": round(time.perf_counter() - started, 3),
        }))
    conn.send(("done",))


def _kind_result(part) -> dict:
    return {"status": part.status, "counts": part.counts, "first_error": part.first_message,
            "duplicates": part.duplicates, "cpu_not_raising": part.cpu_not_raising}


def _list_ops(dtype_name: str, names: list[str] | None) -> list[str]:
    import opinfo_harness as harness

    return [op.full_name for op in harness.ops_for_dtype(harness.dtype_from_name(dtype_name),
                                                         names)]


def run_sweep(dtype_name: str, names: list[str], kinds: list[str], timeout_s: float,
              progress, deadline: float = float("inf")) -> dict:
    """{op name: result} for ``names``, restarting the child after a timeout or a crash. At
    ``deadline`` (a time.monotonic() value) the child is stopped: the ops it had not finished
    are missing from the result."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with us
    results: dict[str, dict] = {}
    remaining = list(names)
    stack_file = tempfile.NamedTemporaryFile(prefix="conformance-stack-", delete=False).name
    while remaining:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker,
                           args=(child, dtype_name, remaining, list(kinds), stack_file),
                           daemon=True)
        proc.start()
        child.close()
        current, kind, sample_index, started = None, None, -1, time.perf_counter()
        # statuses of the current op's finished inputs, per kind
        done_so_far: dict[str, collections.Counter] = {}
        wait_s = STARTUP_TIMEOUT_S
        while True:
            if not parent.poll(min(wait_s, max(deadline - time.monotonic(), 0))):
                if time.monotonic() >= deadline:
                    proc.kill()
                    proc.join()
                    parent.close()
                    os.unlink(stack_file)
                    return results
                os.kill(proc.pid, signal.SIGABRT)  # faulthandler writes the stacks, then dies
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                failure = TIMEOUT
                break
            try:
                msg = parent.recv()
            except EOFError:  # the child died (native crash, abort, out of memory)
                proc.join()
                failure = CRASH
                break
            wait_s = timeout_s
            if msg[0] == "op_start":
                current, kind, sample_index, started = msg[1], None, -1, time.perf_counter()
                done_so_far = {}
            elif msg[0] == "sample":
                kind, sample_index = msg[2], msg[3]
                done_so_far.setdefault(kind, collections.Counter())
            elif msg[0] == "sample_done":
                done_so_far[msg[2]][msg[3]] += 1
            elif msg[0] == "op_done":
                results[msg[1]] = msg[2]
                progress(msg[1], msg[2])
                current = None
            elif msg[0] == "done":
                proc.join()
                os.unlink(stack_file)
                return results
        parent.close()
        if current is None:  # died or hung outside any op: nothing left to attribute it to
            raise RuntimeError(f"the sweep's child process {failure}ed outside an op "
                               f"(exit code {proc.exitcode})")
        where = f"{kind} input {sample_index}" if kind else "making the inputs"
        detail = (f"{where} ran longer than {timeout_s:g} s" if failure == TIMEOUT
                  else f"the process died (exit code {proc.exitcode}) in {where}")
        # the kinds that ran, as far as they got; the one that died records the failure
        failed_kind = kind or kinds[0]
        parts = {}
        for k in kinds:
            counts = done_so_far.get(k)
            if k == failed_kind:
                counts = (counts or collections.Counter()) + collections.Counter({failure: 1})
            if counts is None:
                continue
            parts[k] = {"status": failure if k == failed_kind else _worst(counts),
                        "counts": dict(counts),
                        "first_error": ({failure: detail + _stack_tail(stack_file)}
                                        if k == failed_kind else {}),
                        "duplicates": 0, "cpu_not_raising": 0}
        results[current] = {
            "status": failure,
            "kinds": parts,
            "missing_ops": [],
            "value_compared": True,
            "seconds": round(time.perf_counter() - started, 3),
        }
        progress(current, results[current])
        remaining = remaining[remaining.index(current) + 1:]
    os.unlink(stack_file)
    return results


def _worst(counts) -> str:
    """A kind's status from its counts (as opinfo_harness.KindReport.status)."""
    counted = sum(n for k, n in counts.items() if k != "unsupported_dtype")
    if not counted:
        return "unsupported_dtype" if counts.get("unsupported_dtype") else "no_samples"
    for failure in ("mismatch", "error", "not_implemented"):
        if counts.get(failure):
            return failure
    return "pass"


def _stack_tail(path: str, lines: int = 12) -> str:
    """The innermost frames faulthandler wrote for the thread that was running the sample."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return ""
    if not text:
        return ""
    current = text.split("Current thread")[-1].splitlines()[:lines]
    return " | stack: " + " / ".join(line.strip() for line in current if line.strip())


# ----------------------------------------------------------------------------------------------
# The summary


_SEVERITY = (CRASH, TIMEOUT, "mismatch", "error", "not_implemented", "pass")


def run_sharded(dtype_name: str, names: list[str], kinds: list[str], timeout_s: float, progress,
                jobs: int, deadline: float) -> dict:
    """run_sweep over ``jobs`` interleaved shards of ``names`` side by side, each with its own
    child: MLX CUDA compiles a kernel per new shape on the host, so on the GPU the sweep is
    bound by CPU cores, not by the GPU."""
    if jobs <= 1:
        return run_sweep(dtype_name, names, kinds, timeout_s, progress, deadline)
    import concurrent.futures
    import threading

    lock = threading.Lock()

    def locked_progress(name, res):
        with lock:
            progress(name, res)

    results: dict[str, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for part in pool.map(lambda shard: run_sweep(dtype_name, shard, kinds, timeout_s,
                                                     locked_progress, deadline),
                             [names[i::jobs] for i in range(jobs)]):
            results.update(part)
    return results


def summarize(dtype_name: str, results: dict, elapsed_s: float, kinds=None,
              not_run=()) -> dict:
    import opinfo_harness as harness

    kinds = list(kinds or harness.INPUT_KINDS)
    per_op, no_samples, only_unsupported = {}, [], []
    blocked_by = collections.Counter()
    crashed, timed_out = [], []
    by_kind = {kind: {"ops_total": 0, "ops_passing": 0, "inputs_total": 0, "inputs_passing": 0,
                      "inputs_unsupported_dtype": 0, "mismatches_unexplained": 0,
                      "ops_by_status": collections.Counter(), "expected_failures_failing": [],
                      "unexpected_passes": [], "ops_with_only_unsupported_dtype_inputs": []}
               for kind in kinds}
    if harness.KIND_REFERENCE in by_kind:
        by_kind[harness.KIND_REFERENCE]["duplicates_of_samples"] = 0
    if harness.KIND_ERROR in by_kind:
        by_kind[harness.KIND_ERROR]["cpu_not_raising"] = 0
    by_status = collections.Counter()
    for name, res in sorted(results.items()):
        if res["status"] == CRASH:
            crashed.append(name)
        elif res["status"] == TIMEOUT:
            timed_out.append(name)
        parts, statuses = {}, []
        for kind, part in res["kinds"].items():
            tally = by_kind[kind]
            # inputs needing float64/complex128 raise the designed TypeError: counted apart
            inputs = sum(n for k, n in part["counts"].items() if k != "unsupported_dtype")
            unsupported = part["counts"].get("unsupported_dtype", 0)
            tally["inputs_unsupported_dtype"] += unsupported
            if "duplicates_of_samples" in tally:
                tally["duplicates_of_samples"] += part.get("duplicates", 0)
            if "cpu_not_raising" in tally:
                tally["cpu_not_raising"] += part.get("cpu_not_raising", 0)
            reason = harness.expected_failure_reason(name, dtype_name, kind)
            entry = dict(part, inputs=inputs, passed=part["counts"].get("pass", 0),
                         expected_failure_reason=reason)
            parts[kind] = entry
            if inputs == 0:  # nothing of this kind counts: an entry for it is stale
                if unsupported:
                    tally["ops_with_only_unsupported_dtype_inputs"].append(name)
                if reason is not None:
                    tally["unexpected_passes"].append(name)
                continue
            statuses.append(part["status"])
            tally["ops_total"] += 1
            tally["inputs_total"] += inputs
            tally["inputs_passing"] += entry["passed"]
            tally["ops_by_status"][part["status"]] += 1
            if part["status"] == "pass":
                tally["ops_passing"] += 1
                if reason is not None:
                    tally["unexpected_passes"].append(name)
            elif reason is not None:
                tally["expected_failures_failing"].append(name)
            else:
                tally["mismatches_unexplained"] += part["counts"].get("mismatch", 0)
        blocked_by.update(res["missing_ops"])
        if not statuses:
            if res["status"] in (CRASH, TIMEOUT):
                statuses = [res["status"]]
            elif any(k["counts"].get("unsupported_dtype") for k in res["kinds"].values()):
                only_unsupported.append(name)
                continue
            else:
                no_samples.append(name)
                continue
        status = res["status"] if res["status"] in (CRASH, TIMEOUT) else \
            next(s for s in _SEVERITY if s in statuses)
        by_status[status] += 1
        per_op[name] = dict(res, status=status, kinds=parts)

    for tally in by_kind.values():
        tally["pass_rate"] = (round(tally["ops_passing"] / tally["ops_total"], 4)
                              if tally["ops_total"] else 0.0)
        tally["ops_by_status"] = dict(tally["ops_by_status"].most_common())
        tally["expected_failures_failing"] = len(tally["expected_failures_failing"])
    ops_passing = sum(1 for r in per_op.values() if r["status"] == "pass")
    samples = by_kind.get(harness.KIND_SAMPLES, {})
    summary = {
        "dtype": dtype_name,
        "inputs": kinds,
        # ops passing every kind of input they have (expected failures count as failing)
        "ops_total": len(per_op),
        "ops_passing": ops_passing,
        "pass_rate": round(ops_passing / len(per_op), 4) if per_op else 0.0,
        "by_kind": by_kind,
        # the samples-only figures under their former names
        "samples_total": samples.get("inputs_total"),
        "samples_passing": samples.get("inputs_passing"),
        "ops_crashed": crashed,
        "ops_timed_out": timed_out,
        # ops the --deadline cut off: in no figure above
        "ops_not_run": sorted(not_run),
        "mismatches_unexplained": sum(t["mismatches_unexplained"] for t in by_kind.values()),
        "ops_by_status": dict(by_status.most_common()),
        "expected_failures_failing": sum(t["expected_failures_failing"]
                                         for t in by_kind.values()),
        "unexpected_passes": [f"{name} [{kind}]" for kind, t in by_kind.items()
                              for name in t["unexpected_passes"]],
        "samples_unsupported_dtype": sum(t["inputs_unsupported_dtype"] for t in by_kind.values()),
        "ops_with_no_samples": no_samples,
        "ops_with_only_unsupported_dtype_samples": only_unsupported,
        "ops_with_structure_only_samples": sorted(
            n for n, r in per_op.items() if not r["value_compared"]),
        # aten op -> number of OpInfo ops that hit its missing lowering (what to lower next)
        "missing_lowerings": dict(blocked_by.most_common()),
        "llm": llm_check(per_op),
        "elapsed_s": round(elapsed_s, 1),
        "environment": _environment(),
        "per_op": per_op,
    }
    return summary


def llm_check(per_op: dict) -> dict:
    """Do all OpInfo ops of the LLM list that were swept pass, and is every aten op lowered?"""
    import llm_ops
    import opinfo_harness as harness

    swept = [n for n in llm_ops.LLM_OPINFOS if n in per_op]
    failing = [n for n in swept if per_op[n]["status"] != "pass"]
    unlowered = [a for a in llm_ops.LLM_ATEN_OPS if harness.mlx_kernel_kind(a) is None]
    return {
        "opinfo_swept": len(swept),
        "opinfo_passing": len(swept) - len(failing),
        "opinfo_failing": failing,
        "aten_total": len(llm_ops.LLM_ATEN_OPS),
        "aten_with_mlx_kernel": len(llm_ops.LLM_ATEN_OPS) - len(unlowered),
        "aten_without_mlx_kernel": unlowered,
    }


def _environment() -> dict:
    import mlx.core as mx
    import torch

    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"torch": torch.__version__, "mlx": mx.__version__, "git_commit": commit,
            "mlx_default_device": str(mx.default_device())}


def summary_line(s: dict) -> str:
    statuses = ", ".join(f"{k}={v}" for k, v in s["ops_by_status"].items())
    llm = s["llm"]
    kinds = []
    for kind, t in s["by_kind"].items():
        text = (f"{kind} {t['ops_passing']}/{t['ops_total']} ops, "
                f"{t['inputs_passing']}/{t['inputs_total']} inputs")
        if "duplicates_of_samples" in t:
            text += f" (+{t['duplicates_of_samples']} equal to a sample, not rerun)"
        kinds.append(text)
    return (f"{s['dtype']} [{','.join(s['inputs'])}]: {s['ops_passing']}/{s['ops_total']} ops "
            f"pass ({100 * s['pass_rate']:.1f}%); per kind: {'; '.join(kinds)}; "
            f"crashed={len(s['ops_crashed'])}, timed out={len(s['ops_timed_out'])}, "
            f"not run (deadline)={len(s.get('ops_not_run', []))}; "
            f"mismatches_unexplained={s['mismatches_unexplained']}; ops by status: "
            f"{statuses}; expected failures still failing={s['expected_failures_failing']}, "
            f"unexpected passes={len(s['unexpected_passes'])}; LLM OpInfos "
            f"{llm['opinfo_passing']}/{llm['opinfo_swept']} pass, LLM aten ops with an mlx "
            f"kernel {llm['aten_with_mlx_kernel']}/{llm['aten_total']}; {s['elapsed_s']} s")


def _parse_inputs(text: str) -> list[str]:
    import opinfo_harness as harness

    if text == "all":
        return list(harness.INPUT_KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in harness.INPUT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"--inputs: {text!r}; use all or a comma-separated selection of "
                         f"{', '.join(harness.INPUT_KINDS)}")
    return [k for k in harness.INPUT_KINDS if k in kinds]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32",
                        help="float32, float16, bfloat16, int64, bool, ... (a torch dtype name)")
    parser.add_argument("--inputs", default="all",
                        help="which OpInfo inputs to run: all (default), or a comma-separated "
                             "selection of samples, reference, error (samples alone: the "
                             "figure before reference and error inputs were added)")
    parser.add_argument("--json", metavar="OUT", help="write the full report here")
    parser.add_argument("--ops", help="comma-separated OpInfo full names (default: all op_db)")
    parser.add_argument("--llm", action="store_true",
                        help="only the OpInfo ops of tests/torch_mlx/llm_ops.py")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one input may run before its op counts as hung")
    parser.add_argument("--jobs", type=int, default=1,
                        help="child processes side by side, each sweeping a share of the ops")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="stop after this long and report the ops that finished (the rest "
                             "are listed as not run; the exit status is then 3)")
    parser.add_argument("--resume", metavar="PREVIOUS_JSON",
                        help="a report of the same dtype and inputs that a --deadline cut short: "
                             "its op results are kept and only the other ops run")
    parser.add_argument("--verbose", "-v", action="store_true", help="a line per op")
    args = parser.parse_args(argv)

    import llm_ops

    try:
        kinds = _parse_inputs(args.inputs)
    except ValueError as exc:
        parser.error(str(exc))
    names = [n.strip() for n in args.ops.split(",") if n.strip()] if args.ops else None
    if args.llm:
        names = sorted(set(names or llm_ops.LLM_OPINFOS) & set(llm_ops.LLM_OPINFOS))
    try:
        op_names = _list_ops(args.dtype, names)
    except ValueError as exc:
        parser.error(str(exc))
    if not op_names:
        parser.error(f"no op_db op supports {args.dtype}" + (" among --ops" if names else ""))

    def progress(name, res):
        if args.verbose:
            counts = "; ".join(
                f"{kind}: " + ", ".join(f"{k}={v}" for k, v in sorted(part["counts"].items()))
                for kind, part in res["kinds"].items())
            print(f"{res['status']:>16}  {name}  ({counts}; {res['seconds']} s)", flush=True)

    done: dict[str, dict] = {}
    if args.resume:
        with open(args.resume) as f:
            previous = json.load(f)
        if previous["dtype"] != args.dtype or previous["inputs"] != kinds:
            parser.error(f"{args.resume} is a {previous['dtype']} {previous['inputs']} report")
        # ops that ran there (ops without samples are cheap and run again)
        done = {name: res for name, res in previous["per_op"].items() if name in op_names}
    started = time.perf_counter()
    deadline = time.monotonic() + args.deadline if args.deadline else float("inf")
    results = run_sharded(args.dtype, [n for n in op_names if n not in done], kinds,
                          args.timeout, progress, args.jobs, deadline)
    results.update(done)
    not_run = [name for name in op_names if name not in results]
    summary = summarize(args.dtype, results, time.perf_counter() - started, kinds, not_run)
    print(summary_line(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=False)
    failed = (summary["mismatches_unexplained"] or summary["unexpected_passes"]
              or summary["ops_crashed"])
    return 1 if failed else 3 if not_run else 0


if __name__ == "__main__":
    sys.exit(main())
