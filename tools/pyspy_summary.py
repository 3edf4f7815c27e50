"""Summarize a py-spy raw (collapsed) profile: where the host's time goes, by function.

`py-spy record --native -f raw` writes one line per distinct stack, "frame;frame;...;leaf N".
This prints, over all samples, the functions with the most self time (the leaf) and the most
inclusive time (anywhere on the stack), native C++ frames of libmlx and the CUDA driver included,
so a launch-bound decode step shows which part of MLX's encoding costs what. Used by the device
kit's `profile:pyspy`; it runs anywhere on a saved file:

    python tools/pyspy_summary.py pyspy_vllm_metal.txt --top 40 [--focus async_eval] [--json OUT]

`--focus NAME` restricts to the samples whose stack holds a frame containing NAME (e.g. the
time under `mx.async_eval`).
"""
import argparse
import collections
import json
import re

_LOCATION = re.compile(r"\s+\(([^()]*)\)$")


def short_frame(frame: str) -> str:
    """'fn (path/to/file.py:12)' -> 'fn (file.py)'; native 'fn (libmlx.so)' kept; C++ arguments
    and templates dropped so overloads of one function add up."""
    frame = frame.strip()
    where = ""
    m = _LOCATION.search(frame)
    if m:
        where = m.group(1).rsplit("/", 1)[-1].split(":", 1)[0]
        frame = frame[: m.start()]
    depth, out = 0, []
    for ch in frame:  # strip template arguments and parameter lists
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    name = "".join(out).strip() or frame
    return f"{name} ({where})" if where else name


def parse(path: str):
    stacks = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            stacks.append(([short_frame(x) for x in stack.split(";") if x], n))
    return stacks


def summarize(stacks, top: int, focus: str | None):
    if focus:
        stacks = [(s, n) for s, n in stacks if any(focus in fr for fr in s)]
    total = sum(n for _, n in stacks)
    self_t, incl_t = collections.Counter(), collections.Counter()
    for frames, n in stacks:
        if frames:
            self_t[frames[-1]] += n
        for fr in set(frames):
            incl_t[fr] += n
    return {"samples": total,
            "self": [(fr, n, n / max(total, 1)) for fr, n in self_t.most_common(top)],
            "inclusive": [(fr, n, n / max(total, 1)) for fr, n in incl_t.most_common(top)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--focus", action="append", default=[],
                    help="only stacks holding a frame with this text (repeatable: one table each)")
    ap.add_argument("--json")
    args = ap.parse_args()
    stacks = parse(args.profile)
    report = {}
    for focus in [None] + args.focus:
        r = summarize(stacks, args.top, focus)
        report[focus or "all"] = r
        print(f"\n== {args.profile}: {focus or 'all samples'} ({r['samples']} samples)")
        for kind in ("self", "inclusive"):
            print(f"-- {kind}")
            for fr, n, share in r[kind]:
                print(f"{share * 100:6.1f}% {n:7d}  {fr[:160]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
