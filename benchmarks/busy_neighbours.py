"""Decode speed of the bundled model next to busy processes: torch's default thread count against ThreadGovernor.

Each case runs in a fresh subprocess (so torch starts with the thread count it would have) that times greedy decode
steps with a paged KV cache; the busy neighbours are `while True: pass` processes, always killed at the end.

    python benchmarks/busy_neighbours.py                 # idle / 2 neighbours x default threads / governor
    python benchmarks/busy_neighbours.py --wait-policy   # also OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT variants
    python benchmarks/busy_neighbours.py --model DIR --steps 20   # a bigger model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "llmasos" / "assets" / "default_model"
PROMPT_LEN = 16
BLOCK_SIZE = 16


def decode(steps: int, governor: bool, model_path: str | Path = MODEL) -> dict:
    """In the child: load the model, prefill a prompt, time `steps` greedy decode steps."""
    import torch

    from llmasos.models.attention import AttentionMetadata
    from llmasos.models.loader import load_model
    from llmasos.threads import ThreadGovernor

    gov = ThreadGovernor() if governor else None
    if gov is not None:
        gov.apply()
    model, config = load_model(model_path)
    dtype = next(model.parameters()).dtype
    num_blocks = -(-(PROMPT_LEN + steps + 1) // BLOCK_SIZE)
    shape = (num_blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    kv_cache = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                for _ in range(config.num_hidden_layers)]
    block_table = list(range(num_blocks))

    def step(token_ids: list[int], start: int) -> int:
        positions = torch.arange(start, start + len(token_ids))
        meta = AttentionMetadata(query_lens=[len(token_ids)], context_lens=[start + len(token_ids)],
                                 kv_cache=kv_cache, slot_mapping=positions, block_tables=[block_table],
                                 block_size=BLOCK_SIZE)
        hidden = model(torch.tensor(token_ids), positions, meta)
        return int(model.compute_logits(hidden[-1:]).argmax(-1))

    prompt = [(7 * i + 3) % config.vocab_size for i in range(PROMPT_LEN)]
    tokens, changes = [], 0
    with torch.inference_mode():
        token = step(prompt, 0)
        start = time.perf_counter()
        for index in range(steps):
            if gov is not None:
                changes += gov.maybe_adjust()
            tokens.append(token)
            token = step([token], PROMPT_LEN + index)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "threads": gov.num_threads if gov else torch.get_num_threads(),
            "changes": changes, "tokens": len(tokens)}


def start_neighbours(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


CHILD_DROPS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Ours without any thread or wait-policy variables (so torch and libgomp use their defaults), plus the case's."""
    env = {key: value for key, value in os.environ.items() if key not in CHILD_DROPS}
    return {**env, **extra, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}


def run_case(steps: int, governor: bool, neighbours: int, env: dict[str, str], timeout: float, model: str,
             wait_quiet: float = 0.0) -> dict:
    """One fresh child process, with `neighbours` busy loops running around it; on a shared machine, first up to
    `wait_quiet` seconds for other people's work to fall below 0.15 cores."""
    from llmasos.threads import busy_cores_elsewhere

    give_up = time.monotonic() + wait_quiet
    background = busy_cores_elsewhere(0.3)  # what else is running before ours starts
    while background >= 0.15 and time.monotonic() < give_up:
        time.sleep(1.0)
        background = busy_cores_elsewhere(0.3)
    command = [sys.executable, __file__, "--child", "--steps", str(steps), "--model", model]
    command += ["--governor"] if governor else []
    busy = start_neighbours(neighbours)
    try:
        time.sleep(0.3 if neighbours else 0.0)  # let the neighbours reach full speed
        try:
            result = subprocess.run(command, env=child_env(env), capture_output=True, text=True, timeout=timeout,
                                    cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"seconds": None, "threads": None, "changes": 0, "background": background}
        if result.returncode != 0:
            raise RuntimeError(f"benchmark child failed:\n{result.stderr}")
        return {**json.loads(result.stdout.strip().splitlines()[-1]), "background": background}
    finally:
        stop(busy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--model", default=str(MODEL), help="a model directory (default: the bundled model)")
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds one case may take before it is cut off")
    parser.add_argument("--wait-policy", action="store_true", help="also the libgomp wait-policy variants")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each case, wait up to this many seconds for the machine to be quiet")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case; the table shows the fastest")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--governor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(decode(args.steps, args.governor, args.model)))
        return

    from rich.console import Console
    from rich.table import Table

    from llmasos.threads import available_cores, engine_process_env

    engine_env = engine_process_env()
    variants = [(" ".join(f"{key}={value}" for key, value in engine_env.items()) or "default", engine_env)]
    if args.wait_policy:
        variants += [("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
                     ("GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"}),
                     ("GOMP_SPINCOUNT=1000", {"GOMP_SPINCOUNT": "1000"})]
    cases = []
    for label, env in variants:
        for neighbours in (0, args.neighbours):
            for governor in (False, True):
                cases.append((label, env, neighbours, governor))
    rows = []
    for label, env, neighbours, governor in cases:
        runs = [run_case(args.steps, governor, neighbours, env, args.timeout, args.model, args.wait_quiet)
                for _ in range(args.repeats)]
        done = [run for run in runs if run["seconds"] is not None]
        best = min(done, key=lambda run: run["seconds"]) if done else runs[0]
        rows.append((label, neighbours, governor, best))
    idle = {(label, governor): run["seconds"] for label, neighbours, governor, run in rows if neighbours == 0}
    baseline = idle.get(("default", False))

    name = "bundled model" if Path(args.model) == MODEL else args.model
    table = Table(title=f"{args.steps} greedy decode steps, {name}, {available_cores()} cores")
    for column in ("libgomp env", "background load", "neighbours", "threads", "seconds", "ms / token",
                   "vs idle (same setup)", "vs idle default"):
        table.add_column(column, justify="right")
    for label, neighbours, governor, run in rows:
        seconds = run["seconds"]
        background = f"{run['background']:.2f} cores"
        threads = f"governor -> {run['threads']}" if governor else f"default ({run['threads'] or '?'})"
        if run.get("changes"):
            threads += f", {run['changes']} change(s)"
        if seconds is None:
            table.add_row(label, background, str(neighbours), threads, f"> {args.timeout:.0f} (cut off)", "", "", "")
            continue
        same = idle.get((label, governor))
        table.add_row(label, background, str(neighbours), threads, f"{seconds:.3f}",
                      f"{1000 * seconds / args.steps:.1f}", f"{seconds / same:.1f}x" if same else "",
                      f"{seconds / baseline:.1f}x" if baseline else "")
    Console(width=max(140, Console().width)).print(table)


if __name__ == "__main__":
    main()
