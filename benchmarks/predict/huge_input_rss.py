"""Peak memory (RSS) of a CPU run with one huge input against the same run without it: a predict instruction, and a
training conversation with a huge assistant turn. Inputs longer than the model's context (predict) or
`data.max_length` (training) are cut before tokenizing, so the huge input must cost little more than a normal run.

Each run is a fresh process of `python -m lit_mistral` on the demo configs (SmolLM2-135M, CPU); one JSON line per run
(peak RSS in MB, wall seconds), then the differences.

    python benchmarks/predict/huge_input_rss.py --mb 50
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "lit_mistral" / "assets"


def child(args: list[str]) -> None:
    """Run the CLI in this process, then print this process's peak RSS."""
    from lit_mistral.cli import main

    status = 0
    try:
        main(args)
    except SystemExit as err:
        status = err.code or 0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RSS " + json.dumps({"peak_mb": round(peak_mb), "status": status}))


def run(name: str, args: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    line = next((row for row in done.stdout.splitlines() if row.startswith("RSS ")), None)
    result = json.loads(line[4:]) if line else {}
    if result.get("status") != 0:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = {"run": name, **result, "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the huge input, in MB")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child is not None:
        return child(options.child)
    huge = "fish water " * int(options.mb * 1e6 / 11)
    work = Path(tempfile.mkdtemp(prefix="huge_input_rss_"))
    questions = ASSETS.joinpath("demo_instructions.txt").read_text().splitlines()[:4]
    normal_q, huge_q = work / "normal.jsonl", work / "huge.jsonl"
    normal_q.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in questions))
    huge_q.write_text(normal_q.read_text() + json.dumps({"instruction": huge}) + "\n")
    chats = ASSETS.joinpath("demo_chat.jsonl").read_text().splitlines()[:16]
    normal_c, huge_c = work / "normal_chat.jsonl", work / "huge_chat.jsonl"
    normal_c.write_text("\n".join(chats) + "\n")
    turns = [{"role": "user", "content": "Describe water."}, {"role": "assistant", "content": huge}]
    huge_c.write_text(normal_c.read_text() + json.dumps({"messages": turns}) + "\n")

    def predict(name, path):
        return run(name, ["predict", "--config", "configs/demo.yaml", "--data.predict_path", str(path),
                          "--model.generation.max_new_tokens", "4", "--trainer.enable_progress_bar", "false",
                          "--trainer.default_root_dir", str(work / name), "--predictions.path",
                          str(work / f"{name}.jsonl")])

    def fit(name, path):
        return run(name, ["fit", "--config", "configs/demo-chat.yaml", "--data.path", str(path),
                          "--data.train_records", "null", "--data.val_records", "null", "--data.val_fraction", "0",
                          "--trainer.limit_val_batches", "0", "--trainer.max_steps", "1",
                          "--trainer.enable_progress_bar", "false",
                          "--trainer.default_root_dir", str(work / name)])

    results = [predict("predict", normal_q), predict("predict_huge", huge_q), fit("fit", normal_c),
               fit("fit_huge", huge_c)]
    by = {r["run"]: r for r in results}
    print(json.dumps({"huge_mb": options.mb,
                      "predict_extra_mb": by["predict_huge"]["peak_mb"] - by["predict"]["peak_mb"],
                      "fit_extra_mb": by["fit_huge"]["peak_mb"] - by["fit"]["peak_mb"]}))


if __name__ == "__main__":
    main()
