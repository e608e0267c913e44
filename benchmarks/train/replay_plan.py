"""The memory plan of a logged fit made again without a GPU: `plan.choose` with its probes answered from the facts
and the training passes that the fit logged (`ShowPlanPasses`, which `benchmarks/run_gpu.sh plan*` adds), each pass
in the order the fit ran it:

    python benchmarks/train/replay_plan.py /tmp/bench-plan/plan-24.log
    python benchmarks/train/replay_plan.py plan-logs.txt --plan 2 --rate 18,8,whole=TOKENS_PER_S

prints the plan made again (the line the fit logs) and whether it is the fit's; `--plan N` picks the Nth plan of a
log with several. `--rate RECOMPUTE,OFFLOAD,SIZE=TOKENS/S` (SIZE `whole` or tokens; `,inputs` after it for the
layout with the recomputing layers' inputs in CPU memory) answers that layout's passes with another speed, such as
the one it trained at in a hand-tuned run of the same settings: a plan that then chooses otherwise was misled by
that pass's timing. A layout the fit did not run (because the answers changed) ends the replay, naming it. The
settings the fit's config gave are read from its plan line."""

import argparse
import re
import sys
from collections import defaultdict, deque
from pathlib import Path

from lit_mistral.config import Compute
from lit_mistral.modeling.plan import Facts, Layout, Plan, choose, describe

FACTS = re.compile(r"memory plan facts: Facts\((?P<fields>[^)]*)\)")
PASS = re.compile(r"memory plan pass \d+: Layout\((?P<layout>[^)]*)\); (?:out of memory|peak [0-9.]+ GiB "
                  r"\((?P<peak>\d+) bytes\)); (?:(?P<tokens>\d+) tokens in \d+ parts?; )?[0-9.inf]+ s, [0-9.]+ s "
                  r"of it pinning CPU memory(?: \(the GPU idle [0-9.]+ s of it\))?; (?P<rate>[0-9.]+) tokens/s")
PLAN = re.compile(r"model\.compute plan: .*")
GIVEN = re.compile(r"; set in the config, kept: (?P<given>.*)\.$")


def _value(text: str) -> int | bool | str | None:
    """A field as a log line writes it: None (null), a bool, an int, else the text."""
    words = {"None": None, "null": None, "True": True, "true": True, "False": False, "false": False}
    if text in words:
        return words[text]
    return int(text) if text.lstrip("-").isdigit() else text


def _fields(text: str) -> dict:
    return {key: _value(value) for key, value in (field.split("=") for field in text.split(", "))}


def parse(text: str, nth: int = 1) -> tuple[Facts, list[tuple[Layout, int | None, float, int]], str, Compute]:
    """The `nth` plan in a log: its facts, its passes (layout, peak or None, tokens/s, the tokens it ran: logs made
    before passes said so count a whole-batch pass as the batch, a pass in parts as not all of it), its plan line and
    the settings its config gave (the rest `auto`)."""
    found = list(FACTS.finditer(text))
    if len(found) < nth:
        raise SystemExit(f"{len(found)} 'memory plan facts' lines, not {nth}: was the fit run with ShowPlanPasses, "
                         "and did it measure?")
    facts = found[nth - 1]
    rest = text[facts.end():]
    line = PLAN.search(rest)
    if line is None:
        raise SystemExit("no 'model.compute plan:' line after the facts: the fit stopped before it chose")
    made = Facts(**_fields(facts["fields"]))
    passes = []
    for m in PASS.finditer(rest[:line.start()]):
        layout = Layout(**_fields(m["layout"]))
        tokens = int(m["tokens"]) if m["tokens"] else made.tokens if layout.size is None else 0
        passes.append((layout, None if m["peak"] is None else int(m["peak"]), float(m["rate"]), tokens))
    given = GIVEN.search(line.group())
    settings = {} if given is None else _fields(given["given"])
    return made, passes, line.group(), Compute(**settings)


def _key(layout: Layout) -> tuple:
    return layout.recompute, layout.offload, layout.size, layout.inputs


def replay(text: str, rates: dict[tuple, float] | None = None, nth: int = 1) -> tuple[Plan, str, str]:
    """The `nth` plan in a log made again (`rates`: tokens/s by (recompute, offload, size, inputs), replacing those
    logged), its line, and the fit's line."""
    facts, logged, line, compute = parse(text, nth)
    queue: dict[tuple, deque] = defaultdict(deque)
    for layout, peak, rate, tokens in logged:
        queue[_key(layout)].append((peak, (rates or {}).get(_key(layout), rate), tokens))
    passes: list[tuple[Layout, float, int]] = []

    def run(layout: Layout, every_part: bool = False) -> int | None:
        if not queue[_key(layout)]:
            raise SystemExit(f"the fit ran no (further) pass laid out as {layout}: the replay chose otherwise from "
                             f"here ({len(passes)} passes replayed)")
        peak, rate, tokens = queue[_key(layout)].popleft()
        passes.append((layout, rate if peak is not None else 0.0, tokens))
        return peak

    def speed(layout: Layout) -> float:
        run(layout, every_part=True)
        return passes[-1][1]

    made = choose(run, speed, facts, compute, run, passes)
    return made, describe(made, facts.layers, compute), line


def chosen(line: str) -> str:
    """The chosen values of a plan's line: what comes before its predicted peak and how it was found."""
    return line.split("; predicted peak")[0]


def _rate(text: str) -> tuple[tuple, float]:
    layout, rate = text.split("=")
    recompute, offload, size, *inputs = layout.split(",")
    return (int(recompute), int(offload), None if size == "whole" else int(size), inputs == ["inputs"]), float(rate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", type=Path, help="a log with the plans' DEBUG lines (one fit's, or run_gpu.sh's "
                   "plan-logs.txt)")
    p.add_argument("--plan", type=int, default=1, help="which plan in the log to replay, in order (default: the first)")
    p.add_argument("--rate", action="append", default=[], type=_rate,
                   help="RECOMPUTE,OFFLOAD,SIZE[,inputs]=TOKENS/S: answer that layout's passes with this speed")
    args = p.parse_args(argv)
    _, line, logged = replay(args.log.read_text(), dict(args.rate), args.plan)
    same = chosen(line) == chosen(logged)
    print(f"replayed: {line}\nthe fit:  {logged}\n{'the same choice' if same else 'a different choice'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
