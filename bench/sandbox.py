"""
Sandbox throughput: programs per second through sandbox.execute_many, each in its own sandboxed
process forked from a zygote, on this machine's cores. The target: at least 500 programs/s on two cores
(an interpreter started per program gave about 140). As root each child
also drops root (chroot, a uid of its own), so run it the way the pipeline runs.

    python bench/sandbox.py                  # 400 small correct programs, 3 times
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandbox import execute_many  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=400, help="how many programs to run")
    parser.add_argument("--repeats", type=int, default=3, help="how many times to run them (the machine may be busy)")
    args = parser.parse_args()
    jobs = [(f"def f(x):\n    return x * 3 + {i % 9}\n", f"assert f(2) == {6 + i % 9}\nassert f(0) == {i % 9}\n")
            for i in range(args.programs)]
    mode = "as root: chroot and a uid per child" if os.geteuid() == 0 else "not root: in-process guard only"
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        results = execute_many(jobs)
        dt = time.perf_counter() - t0
        assert results == ["pass"] * len(jobs), "the sandbox failed correct programs"
        print(f"{len(jobs)} programs in {dt:.1f} s: {len(jobs) / dt:.0f} programs/s on {os.cpu_count()} cores ({mode})")
