"""Start-up time of the ``modapt`` command: median wall time of fresh processes.

    python benchmarks/cli_startup.py [--runs 5]

Times ``modapt --help``, ``modapt plugins`` and ``modapt recipe check r.toml`` (a recipe with
map over lora, dora over lora, adalora, lora and lmam), each in ``--runs`` fresh interpreters
(``python -m modapt.cli``, the code the ``modapt`` script runs), and says which of torch and
transformers each command imported. The figures go to the README ("How fast the modapt command
starts"); run on an idle machine: other processes on the cores inflate wall times.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """
[[adapter]]
method = "map"
targets = ["q_proj"]
[adapter.update]
method = "lora"
r = 4

[[adapter]]
method = "dora"
targets = ["k_proj"]
[adapter.update]
method = "lora"
r = 4

[[adapter]]
method = "adalora"
init_r = 4
target_r = 2
total_step = 10
targets = ["o_proj"]

[[adapter]]
method = "lora"
targets = ["v_proj"]

[[adapter]]
method = "lmam"
"""

PROBE = ("import sys, runpy; sys.argv = ['modapt'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('modapt.cli', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], file=sys.stderr)")


def wall_times(argv: list[str], runs: int) -> tuple[list[float], list[float], str]:
    """(wall seconds and CPU seconds (user + system) of ``runs`` fresh ``modapt <argv>`` processes,
    the heavy modules one of them imported). CPU time moves less than wall time on a busy machine."""
    times, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "modapt.cli", *argv], capture_output=True, check=False)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    probe = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=False)
    heavy = next((line[6:] for line in probe.stderr.splitlines() if line.startswith("HEAVY ")), "?")
    return times, cpu, heavy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "r.toml"
        recipe.write_text(RECIPE)
        for command in (["--help"], ["plugins"], ["recipe", "check", str(recipe)]):
            times, cpu, heavy = wall_times(command, args.runs)
            label = "modapt " + " ".join(command).replace(str(recipe), "r.toml")
            print(f"{label:<28} median wall {statistics.median(times):.2f} s, CPU {statistics.median(cpu):.2f} s  "
                  f"(wall: {', '.join(f'{t:.2f}' for t in times)})  heavy modules imported: {heavy}")


if __name__ == "__main__":
    main()
