"""The GPU check: what only a GPU can tell, in one run of a few minutes, as one Markdown file to
paste into benchmarks/RESULTS.md. Started by ``scripts/gpu_check.sh`` (which finds the Python,
and fails fast without CUDA):

    bash scripts/gpu_check.sh [--out gpu_check.md]
    bash scripts/gpu_check.sh --device cpu --quick     # every step, tiny, on the CPU: checks the check

Steps, each a subprocess with its own time limit (a step that fails or runs out of time is
reported with the end of its log; the others still run), the results file rewritten after each:

1. machine: GPU, memory, driver, CUDA and cuDNN, torch, CPUs
2. tests: ``pytest -m gpu`` (tests/test_gpu.py and the CUDA tagging test): DCLS on CUDA vs CPU,
   the six paper models in bf16, train.py in bf16 with checkpoint and --resume, the evaluate command
3. training: ``benchmarks/train.py``, bf16, samples/s of the training step of the six paper models
   in one run (DCLS / baseline ratios), the data loader's samples/s, and the cost of one host
   sync per step (the stop-signal poll of multi-GPU runs)
4. tagging: ``benchmarks/infer.py``, a 10-minute 44.1 kHz stereo FLAC tagged on CUDA in bf16
5. evaluation: ``benchmarks/evaluate.py``, clips/s of the loader, the model and a whole
   evaluation in bf16

Exit status 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER_PAIRS = [("convnext_tiny", "convnext_tiny_dcls"), ("convformer_s18", "convformer_s18_dcls"),
               ("fastvit_sa24", "fastvit_sa24_dcls")]
QUICK_PAIRS = [("convnext_atto", "convnext_atto_dcls")]


@dataclass
class Step:
    name: str
    ok: bool = False
    seconds: float = 0.0
    note: str = ""  # one line: why it failed, or what it measured
    body: list[str] = field(default_factory=list)  # Markdown lines of its section


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, stdout + stderr, seconds); the output also goes to ``log``.
    The step runs in a process group of its own: on timeout all of it is killed (loader workers,
    the tagging benchmark's worker process), so the next step has the machine to itself."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, log.read_text(errors="replace"), time.perf_counter() - t0


def failure(step: Step, code: int | None, output: str, timeout: float) -> Step:
    step.ok = False
    step.note = f"ran out of its {timeout:.0f} s" if code is None else f"exit status {code}"
    tail = "\n".join(output.strip().splitlines()[-25:])
    step.body += ["", f"**Failed: {step.note}.** End of its log:", "", "```", tail, "```"]
    return step


# ------------------------------------------------------------------------------------ steps


def step_machine(device: str) -> Step:
    import torch

    step = Step("machine", ok=True)
    rows = [("torch", torch.__version__), ("CUDA (torch build)", str(torch.version.cuda)),
            ("cuDNN", str(torch.backends.cudnn.version())), ("Python", platform.python_version()),
            ("CPUs", str(os.cpu_count()))]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        rows = [("GPU", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"),
                ("GPUs visible", str(torch.cuda.device_count()))] + rows
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            rows.append(("driver", smi[0] if smi else "?"))
        except (OSError, subprocess.TimeoutExpired):
            rows.append(("driver", "nvidia-smi not found"))
        step.note = p.name
    else:
        step.note = f"CPU only ({platform.machine()})"
    step.body = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return step


def step_tests(args: argparse.Namespace, env: dict[str, str], work: Path) -> Step:
    step = Step("GPU-only tests")
    junit = work / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--basetemp={work / 'pytest'}",
           f"--junitxml={junit}"]
    # --quick checks the check's own logic: one fast test (the whole set takes ~20 min on a CPU)
    cmd += ["tests/test_gpu.py", "-k", "dcls_layer"] if args.quick else ["tests/"]
    code, output, step.seconds = run_logged(cmd, work / "tests.log", args.timeout_tests, env)
    if not junit.is_file():
        return failure(step, code, output, args.timeout_tests)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    step.note = f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"
    step.body = [f"`{shlex.join(cmd[1:])}`: {step.note} in {step.seconds:.0f} s", "",
                 "| test | result | s |", "|---|---|---:|"]
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            result = "FAILED: " + (problem.get("message") or "").splitlines()[0][:150].replace("|", "/")
        elif case.find("skipped") is not None:
            result = "skipped: " + (case.find("skipped").get("message") or "")[:100].replace("|", "/")
        else:
            result = "passed"
        step.body.append(f"| {case.get('name')} | {result} | {float(case.get('time', 0)):.1f} |")
    step.ok = code == 0 and passed > 0
    if not step.ok and code is None:
        step.body += ["", f"**Ran out of its {args.timeout_tests:.0f} s.**"]
    return step


def step_training(args: argparse.Namespace, env: dict[str, str], work: Path) -> Step:
    step = Step("bf16 training throughput")
    pairs = QUICK_PAIRS if args.quick else PAPER_PAIRS
    models = [m for pair in pairs for m in pair]
    cmd = [sys.executable, "benchmarks/train.py", "--json", "--device", args.device, "--models", *models,
           "--sync-model", pairs[0][1], "--mixed-precision", "bf16" if args.device == "cuda" else "no",
           "--encoding-clips", "0"]
    cmd += (["--batch-size", "2", "--steps", "1", "--clips", "8", "--workers", "1", "--loader-batches", "2"] if args.quick
            else ["--batch-size", "64", "--steps", "20", "--workers", str(min(8, os.cpu_count() or 1))])
    code, output, step.seconds = run_logged(cmd, work / "train.log", args.timeout_train, env)
    try:
        r = json.loads(output.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return failure(step, code, output, args.timeout_train)
    sps = r["step_samples_per_s"]
    step.body = [f"`{shlex.join(cmd[1:])}` ({step.seconds:.0f} s): training step alone (forward, BCE, backward, "
                 f"AdamW, on-device augmentations) on {r['device']}, batch {r['batch_size']}, {r['frames']} frames, "
                 f"mixed precision {r['mixed_precision']}", "",
                 "| model | samples/s | DCLS model | samples/s | DCLS / baseline |", "|---|---:|---|---:|---:|"]
    ratios = []
    for base, dcls in pairs:
        ratios.append(sps[dcls] / sps[base])
        step.body.append(f"| {base} | {sps[base]:.1f} | {dcls} | {sps[dcls]:.1f} | **{ratios[-1]:.2f}** |")
    step.body += ["", f"Data loader ({r['loader_workers']} workers, {r.get('loader_encoding', '?')} shards): "
                  f"{r['loader_samples_per_s']:.1f} samples/s "
                  f"({'keeps up with every model' if r['loader_samples_per_s'] >= max(sps.values()) else 'slower than the fastest step: more workers or cores per GPU'})."]
    h = r.get("host_sync_per_step")
    if h:
        step.body.append(f"One host sync per step ({h['model']}, the stop-signal poll of multi-GPU runs): "
                         f"{h['samples_per_s_with_sync']:.1f} vs {h['samples_per_s']:.1f} samples/s ({h['ratio']:.3f}x).")
    step.note = "DCLS / baseline " + ", ".join(f"{b}: {x:.2f}" for (b, _), x in zip(pairs, ratios))
    step.ok = code == 0
    return step


def step_tagging(args: argparse.Namespace, env: dict[str, str], work: Path) -> Step:
    step = Step("CUDA tagging of a long file" if args.device == "cuda" else "tagging of a long file")
    model = "convnext_atto_dcls" if args.quick else "convnext_tiny_dcls"
    cmd = [sys.executable, "benchmarks/infer.py", "--skip-models", "--json", "--device", args.device,
           "--precision", "bf16" if args.device == "cuda" else "fp32", "--long-model", model,
           "--long-seconds", "30" if args.quick else "600", "--batch", "4" if args.quick else "32",
           "--threads", str(min(8, os.cpu_count() or 1))]
    code, output, step.seconds = run_logged(cmd, work / "infer.log", args.timeout_infer, env)
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    if code != 0 or not rows:
        return failure(step, code, output, args.timeout_infer)
    step.body = [f"`{shlex.join(cmd[1:])}` ({step.seconds:.0f} s): {model}, random weights, 527 classes, "
                 "44.1 kHz stereo FLAC decoded, resampled and tagged in 10 s windows, in a fresh process", "",
                 "| file | device, precision | tag s | x real time | windows | load s | peak RSS MB | peak CUDA MB |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cuda = f"{r['peak_cuda_mb']:.0f}" if r.get("peak_cuda_mb") is not None else "-"
        step.body.append(f"| {r['seconds'] / 60:g} min | {r['device']}, {r['precision']} | {r['tag_s']:.1f} | "
                         f"{r['duration'] / r['tag_s']:.0f} | {r['windows']} | {r['load_s']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {cuda} |")
    last = rows[-1]
    step.note = f"{last['seconds'] / 60:g} min in {last['tag_s']:.1f} s ({last['duration'] / last['tag_s']:.0f}x real time)"
    step.ok = True
    return step


def step_evaluation(args: argparse.Namespace, env: dict[str, str], work: Path) -> Step:
    step = Step("evaluation throughput")
    cmd = [sys.executable, "benchmarks/evaluate.py", "--mixed-precision", "bf16" if args.device == "cuda" else "no"]
    cmd += (["--clips", "16", "--models", "convnext_atto_dcls", "--batch-size", "8", "--workers", "1", "--repeats", "1"]
            if args.quick else ["--clips", "512", "--models", "convnext_tiny_dcls", "convnext_tiny", "--batch-size",
                                "64", "--workers", "4", str(min(8, os.cpu_count() or 1)), "--repeats", "2",
                                "--model-batches", "10"])
    code, output, step.seconds = run_logged(cmd, work / "evaluate.log", args.timeout_eval, env)
    table = [line for line in output.splitlines() if line.startswith(("machine:", "what", "loader alone", "model alone",
                                                                      "evaluate,", "ratios", "  "))]
    if code != 0 or not table:
        return failure(step, code, output, args.timeout_eval)
    step.body = [f"`{shlex.join(cmd[1:])}` ({step.seconds:.0f} s): synthetic 10 s clips", "", "```", *table, "```"]
    best = [line for line in table if line.startswith("evaluate,")]
    step.note = best[0].split()[-2] + " clips/s (" + " ".join(best[0].split()[1:-2]) + ")" if best else ""
    step.ok = True
    return step


# ------------------------------------------------------------------------------------ report


def write_report(out: Path, steps: list[Step], args: argparse.Namespace, started: str, total: float) -> None:
    from audioset_dcls.files import write_text

    machine = steps[0].note if steps else "?"
    lines = [f"## GPU check: {machine}" + (" (--quick, CPU: checks the check, not a measurement)" if args.quick else ""),
             "", f"`bash scripts/gpu_check.sh {shlex.join(args.argv)}`, {started}, {total:.0f} s in all; "
             f"commit {_commit()}.", "", "| step | result | s | |", "|---|---|---:|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {'ok' if s.ok else '**FAILED**'} | {s.seconds:.0f} | {s.note} |")
    for s in steps:
        lines += ["", f"### {s.name}", "", *s.body]
    write_text(out, "\n".join(lines) + "\n")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the check's own logic (use with --device cpu)")
    p.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="the Markdown results file")
    p.add_argument("--only", nargs="+", choices=("tests", "training", "tagging", "evaluation"), default=None,
                   help="run only these steps (default: all)")
    p.add_argument("--timeout-tests", type=float, default=240.0)
    p.add_argument("--timeout-train", type=float, default=150.0)
    p.add_argument("--timeout-infer", type=float, default=90.0)
    p.add_argument("--timeout-eval", type=float, default=90.0)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:  # sizes are tiny but a shared CPU can be slow: the limits are for real GPU runs
        args.timeout_tests = args.timeout_train = args.timeout_infer = args.timeout_eval = 900.0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to PyTorch; this is the GPU check (--device cpu --quick checks the "
              "script itself on a CPU)", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", AUDIOSET_DCLS_GPU_TESTS_ON_CPU="1")
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    steps = [step_machine(args.device)]
    runners = {"tests": step_tests, "training": step_training, "tagging": step_tagging, "evaluation": step_evaluation}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, run in runners.items():
            if args.only and name not in args.only:
                continue
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            try:
                step = run(args, env, Path(tmp))
            except Exception as err:  # noqa: BLE001: a broken step must not hide the others' results
                step = Step(name, note=f"{type(err).__name__}: {err}"[:200])
                step.body = ["", f"**Failed in the check itself: {step.note}**"]
            steps.append(step)
            print(f"[gpu_check] {name}: {'ok' if step.ok else 'FAILED'} ({step.seconds:.0f} s) {step.note}",
                  file=sys.stderr, flush=True)
            write_report(args.out, steps, args, started, time.perf_counter() - t0)
    write_report(args.out, steps, args, started, time.perf_counter() - t0)
    failed = [s.name for s in steps if not s.ok]
    print(f"[gpu_check] results: {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else "; every step passed"),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
