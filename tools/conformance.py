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
shrink), 2 for bad arguments.
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


def _worker(conn, dtype_name: str, names: list[str], stack_file: str) -> None:
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
        try:
            samples = harness.samples_of(op, dtype)
        except Exception as exc:  # op_db's sample generator itself failed: nothing ran
            samples = []
            harness.record(report, harness.SampleResult(
                harness.ERROR, f"making the samples failed: {type(exc).__name__}: {exc}"))
        for index, (sample, keep_on_cpu) in enumerate(samples):
            conn.send(("sample", name, index))
            result = harness.run_sample(op, sample, keep_on_cpu)
            harness.record(report, result)
            conn.send(("sample_done", name, result.status))
        conn.send(("op_done", name, {
            "status": report.status,
            "counts": report.counts,
            "first_error": report.first_message,
            "missing_ops": report.missing_ops,
            "value_compared": report.value_compared,
            "seconds": round(time.perf_counter() - started, 3),
        }))
    conn.send(("done",))


def _list_ops(dtype_name: str, names: list[str] | None) -> list[str]:
    import opinfo_harness as harness

    return [op.full_name for op in harness.ops_for_dtype(harness.dtype_from_name(dtype_name),
                                                         names)]


def run_sweep(dtype_name: str, names: list[str], timeout_s: float, progress) -> dict:
    """{op name: result} for ``names``, restarting the child after a timeout or a crash."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with us
    results: dict[str, dict] = {}
    remaining = list(names)
    stack_file = tempfile.NamedTemporaryFile(prefix="conformance-stack-", delete=False).name
    while remaining:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(child, dtype_name, remaining, stack_file),
                           daemon=True)
        proc.start()
        child.close()
        current, sample_index, started = None, -1, time.perf_counter()
        done_so_far = collections.Counter()  # statuses of the current op's finished samples
        deadline = STARTUP_TIMEOUT_S
        while True:
            if not parent.poll(deadline):
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
            deadline = timeout_s
            if msg[0] == "op_start":
                current, sample_index, started = msg[1], -1, time.perf_counter()
                done_so_far.clear()
            elif msg[0] == "sample":
                sample_index = msg[2]
            elif msg[0] == "sample_done":
                done_so_far[msg[2]] += 1
            elif msg[0] == "op_done":
                results[msg[1]] = msg[2]
                progress(msg[1], msg[2])
                current = None
            elif msg[0] == "done":
                proc.join()
                return results
        parent.close()
        if current is None:  # died or hung outside any op: nothing left to attribute it to
            raise RuntimeError(f"the sweep's child process {failure}ed outside an op "
                               f"(exit code {proc.exitcode})")
        detail = (f"sample {sample_index} ran longer than {timeout_s:g} s" if failure == TIMEOUT
                  else f"the process died (exit code {proc.exitcode}) in sample {sample_index}")
        results[current] = {
            "status": failure,
            "counts": dict(done_so_far + collections.Counter({failure: 1})),
            "first_error": {failure: detail + _stack_tail(stack_file)},
            "missing_ops": [],
            "value_compared": True,
            "seconds": round(time.perf_counter() - started, 3),
        }
        progress(current, results[current])
        remaining = remaining[remaining.index(current) + 1:]
    os.unlink(stack_file)
    return results


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


def summarize(dtype_name: str, results: dict, elapsed_s: float) -> dict:
    from expected_failures import EXPECTED_FAILURES

    per_op, no_samples, only_unsupported = {}, [], []
    blocked_by = collections.Counter()
    unexpected_passes, expected_failing = [], []
    mismatches_unexplained = 0
    by_status = collections.Counter()
    for name, res in sorted(results.items()):
        # samples needing float64/complex128 raise the designed TypeError: counted apart
        samples = sum(n for k, n in res["counts"].items() if k != "unsupported_dtype")
        if res["status"] == "no_samples":
            no_samples.append(name)
            continue
        reason = EXPECTED_FAILURES.get((name, dtype_name))
        if res["status"] == "unsupported_dtype":  # not a failure: its entry is stale
            only_unsupported.append(name)
            if reason is not None:
                unexpected_passes.append(name)
            continue
        passed = res["counts"].get("pass", 0)
        if reason is not None:
            (unexpected_passes if res["status"] == "pass" else expected_failing).append(name)
        else:
            mismatches_unexplained += res["counts"].get("mismatch", 0)
        by_status[res["status"]] += 1
        blocked_by.update(res["missing_ops"])
        per_op[name] = dict(res, samples=samples, passed=passed, expected_failure_reason=reason)

    ops_passing = sum(1 for r in per_op.values() if r["status"] == "pass")
    summary = {
        "dtype": dtype_name,
        "ops_total": len(per_op),
        "ops_passing": ops_passing,
        "pass_rate": round(ops_passing / len(per_op), 4) if per_op else 0.0,
        "samples_total": sum(r["samples"] for r in per_op.values()),
        "samples_passing": sum(r["passed"] for r in per_op.values()),
        "mismatches_unexplained": mismatches_unexplained,
        "ops_by_status": dict(by_status.most_common()),
        "expected_failures_failing": len(expected_failing),
        "unexpected_passes": unexpected_passes,
        "samples_unsupported_dtype": sum(r["counts"].get("unsupported_dtype", 0)
                                         for r in results.values()),
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
    return (f"{s['dtype']}: {s['ops_passing']}/{s['ops_total']} ops pass "
            f"({100 * s['pass_rate']:.1f}%), {s['samples_passing']}/{s['samples_total']} samples "
            f"pass; mismatches_unexplained={s['mismatches_unexplained']}; ops by status: "
            f"{statuses}; expected failures still failing={s['expected_failures_failing']}, "
            f"unexpected passes={len(s['unexpected_passes'])}; LLM OpInfos "
            f"{llm['opinfo_passing']}/{llm['opinfo_swept']} pass, LLM aten ops with an mlx "
            f"kernel {llm['aten_with_mlx_kernel']}/{llm['aten_total']}; {s['elapsed_s']} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32",
                        help="float32, float16, bfloat16, int64, bool, ... (a torch dtype name)")
    parser.add_argument("--json", metavar="OUT", help="write the full report here")
    parser.add_argument("--ops", help="comma-separated OpInfo full names (default: all op_db)")
    parser.add_argument("--llm", action="store_true",
                        help="only the OpInfo ops of tests/torch_mlx/llm_ops.py")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one sample may run before its op counts as hung")
    parser.add_argument("--verbose", "-v", action="store_true", help="a line per op")
    args = parser.parse_args(argv)

    import llm_ops

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
            counts = ", ".join(f"{k}={v}" for k, v in sorted(res["counts"].items()))
            print(f"{res['status']:>16}  {name}  ({counts}; {res['seconds']} s)", flush=True)

    started = time.perf_counter()
    results = run_sweep(args.dtype, op_names, args.timeout, progress)
    summary = summarize(args.dtype, results, time.perf_counter() - started)
    print(summary_line(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=False)
    return 1 if summary["mismatches_unexplained"] or summary["unexpected_passes"] else 0


if __name__ == "__main__":
    sys.exit(main())
