"""Reusable timing helpers for the benchmarks.

Conventions (the project's benchmarking standards):

* A candidate is a ``jax.jit``-wrapped function; every timer stops only after
  ``jax.block_until_ready`` on the result.
* Compile time is the wall time of the *first* call (trace + lower + compile +
  one run), measured from a cold state: ``jax.clear_caches()`` runs before
  every sample. Several samples are taken and the median is reported. One
  discarded warm-up round comes first by default, so that one-time process
  costs (lazy imports, MLIR/XLA initialisation on the first lowering) fall on
  no candidate; they are not part of any candidate's compile cost.
* Run time is the median, over several repeats, of the mean time of one call
  (``number`` calls per repeat, each followed by ``jax.block_until_ready``).
* When two or more candidates are compared, their samples are interleaved
  (see :func:`interleave`) so that machine noise hits all of them alike.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import timeit
from typing import Any, Callable, Mapping, Sequence

import jax

__all__ = [
    "Timing",
    "median",
    "first_call_sample",
    "calls_sample",
    "calibrate_number",
    "interleave",
    "compile_time",
    "run_time",
    "compile_times",
    "run_times",
]


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence of numbers."""
    if len(xs) == 0:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(xs))


@dataclasses.dataclass(frozen=True)
class Timing:
    """Samples of one measurement, in seconds; ``number`` calls per run-time sample."""

    samples: tuple[float, ...]
    number: int = 1

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return dict(
            median=self.median, min=self.min, max=self.max, number=self.number, samples=list(self.samples)
        )


def first_call_sample(fn: Callable, *args) -> float:
    """One compile-time sample: clear JAX's caches, then time ``fn(*args)`` to readiness.

    ``jax.clear_caches()`` drops tracing, lowering and compilation caches, so the
    call pays trace + compile + one execution, as a user's first call does.
    (The persistent on-disk compilation cache is off unless configured.)
    """
    jax.clear_caches()
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def calls_sample(fn: Callable, *args, number: int) -> float:
    """One run-time sample: mean seconds per call over ``number`` blocked calls."""
    return timeit.timeit(lambda: jax.block_until_ready(fn(*args)), number=number) / number


def calibrate_number(fn: Callable, *args, min_time: float = 0.2, max_number: int = 100_000) -> int:
    """Calls per run-time sample so that one sample lasts at least ``min_time`` seconds.

    Warms ``fn`` up first (compiling it if needed); powers of 10 times 1, 2, 5,
    like ``timeit.Timer.autorange``.
    """
    jax.block_until_ready(fn(*args))
    number = 1
    while True:
        for k in (1, 2, 5):
            n = number * k
            if n >= max_number or calls_sample(fn, *args, number=n) * n >= min_time:
                return min(n, max_number)
        number *= 10


def interleave(samplers: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call every sampler ``repeats`` times, alternating between candidates.

    Within a repeat the candidates run one after another; the order is reversed
    on every other repeat so that neither always goes first (warm caches, turbo
    state and background load then affect all candidates alike).
    """
    names = list(samplers)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(samplers[n]())
    return out


def compile_time(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> Timing:
    """Compile time (first call from a cold cache) of one jitted ``fn``.

    ``warmup`` discarded samples, then ``repeats`` kept ones (report the median).
    """
    for _ in range(warmup):
        first_call_sample(fn, *args)
    return Timing(tuple(first_call_sample(fn, *args) for _ in range(repeats)))


def run_time(
    fn: Callable, *args, repeats: int = 7, number: int | None = None, min_time: float = 0.2
) -> Timing:
    """Run time per call of one jitted ``fn``: ``repeats`` samples of ``number`` calls.

    ``number=None`` calibrates it (see :func:`calibrate_number`); ``fn`` is
    always warmed up first, so compilation is never timed here.
    """
    if number is None:
        number = calibrate_number(fn, *args, min_time=min_time)
    else:
        jax.block_until_ready(fn(*args))
    return Timing(tuple(calls_sample(fn, *args, number=number) for _ in range(repeats)), number)


def compile_times(
    candidates: Mapping[str, tuple[Callable, tuple]], repeats: int = 5, warmup: int = 1
) -> dict[str, Timing]:
    """Interleaved :func:`compile_time` of several ``name -> (fn, args)`` candidates.

    ``warmup`` interleaved rounds are run and discarded before the ``repeats`` kept ones.
    """
    samplers = {
        n: (lambda fn=fn, args=args: first_call_sample(fn, *args)) for n, (fn, args) in candidates.items()
    }
    if warmup:
        interleave(samplers, warmup)
    return {n: Timing(tuple(s)) for n, s in interleave(samplers, repeats).items()}


def run_times(
    candidates: Mapping[str, tuple[Callable, tuple]],
    repeats: int = 7,
    number: int | Mapping[str, int] | None = None,
    min_time: float = 0.2,
) -> dict[str, Timing]:
    """Interleaved :func:`run_time` of several ``name -> (fn, args)`` candidates.

    ``number`` is one count for all, a per-candidate mapping, or ``None`` to
    calibrate each candidate separately (all are warmed up before any sample).
    """
    numbers: dict[str, int] = {}
    for n, (fn, args) in candidates.items():
        given = number.get(n) if isinstance(number, Mapping) else number
        if given is None:
            numbers[n] = calibrate_number(fn, *args, min_time=min_time)
        else:
            jax.block_until_ready(fn(*args))
            numbers[n] = int(given)
    samplers = {
        n: (lambda fn=fn, args=args, k=numbers[n]: calls_sample(fn, *args, number=k))
        for n, (fn, args) in candidates.items()
    }
    return {n: Timing(tuple(s), numbers[n]) for n, s in interleave(samplers, repeats).items()}


#: The generated results of every benchmark, one section each (:func:`write_section`).
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
_RESULTS_HEADER = (
    "# Benchmark results\n\nGenerated by the benchmark commands (each writes its own section, "
    "`--results`); do not edit by hand.\n"
)


def write_section(name: str, text: str, path: str = RESULTS_MD) -> None:
    """Put ``text`` into ``path`` as the section of benchmark ``name`` (between HTML comment
    markers, under a heading of the name if ``text`` has none), replacing that section's
    earlier version and keeping the others."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    old = open(path).read() if os.path.exists(path) else _RESULTS_HEADER
    if not text.lstrip().startswith("#"):
        text = f"## `{name}`\n\n{text.lstrip()}"  # every section has a heading
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(new)


def add_output_options(ap) -> None:
    """``--json PATH`` and ``--results``: the options every benchmark command shares."""
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--results", action="store_true", help="write the report into its section of RESULTS.md")


def write_outputs(a, name: str, out, text: str) -> None:
    """What :func:`add_output_options` asked for: the JSON of ``out``, and ``text`` as the
    section ``name`` of ``RESULTS.md``."""
    import json
    import sys

    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
            fh.write("\n")
        print(f"# wrote {a.json}", file=sys.stderr)
    if a.results:
        write_section(name, text)
        print(f"# wrote the {name} section of {RESULTS_MD}", file=sys.stderr)


def quick_json_main(prog: str, doc: str, run, report, argv=None) -> None:
    """The command line shared by benchmarks whose only own option is ``--quick``:
    ``report(run(quick=...))`` is printed and written where :func:`add_output_options` says."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    add_output_options(ap)
    a = ap.parse_args(argv)
    out = run(quick=a.quick)
    text = report(out)
    print(text)
    write_outputs(a, prog.split(".")[-1], out, text)
