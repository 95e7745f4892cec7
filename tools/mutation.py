"""Mutation run over the bookkeeping and sampling modules, with cosmic-ray (not part of CI).

    python tools/mutation.py                       # every module below, two at a time
    python tools/mutation.py engine/scheduler.py   # one module
    python tools/mutation.py --report-only         # print the survivors of the last run
    python tools/mutation.py --jobs 1 --nice 15    # one module at a time, at low priority
    python tools/mutation.py --retest-survivors    # the survivors again, after adding tests
    python tools/mutation.py --since REV --until 19:00  # changed lines first, time-boxed

For each module: copy the tracked files into a scratch folder (so no mutant ever touches the
checkout), `cosmic-ray init`, skip the mutants inside type annotations (inert: every module
has `from __future__ import annotations`), `cosmic-ray exec` with the module's fast tests
(`pytest -x`: a killed mutant stops at its first failing test), then list each survivor with its
diff. The tests run in children forked by tools/pytest_forkserver.py, which imports pytest and the
heavy third-party modules once per module instead of once per mutant (a third of the CPU time on
the block manager's tests). Sessions are kept under `--workdir` (default `.mutation/`, ignored
by git), so an interrupted run resumes where it stopped. The survivors and why each one is
harmless are recorded in docs/mutation.md.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST_ARGS = "-x -q -p no:cacheprovider -p no:randomly"
FORKSERVER = ROOT / "tools" / "pytest_forkserver.py"
# Replacing an arithmetic operator by a shift, a power or a bitwise one almost always crashes or
# is caught with the plain arithmetic replacements; skipping them cuts the mutants by a quarter.
EXCLUDED_OPERATORS = r"core/ReplaceBinaryOperator_.*_(Pow|LShift|RShift|BitAnd|BitXor|BitOr)$"
# The block-manager state machine runs once per mutant: 60 examples instead of 300.
TEST_ENV = {"PREFIXGATE_MACHINE_EXAMPLES": "60"}

# module -> the tests that guard it, fastest first: a killed mutant stops at its first failing
# test, so the fast unit tests go before a model or a state machine. Pure-Python suites need no
# conftest (the engine's imports torch for its model fixtures).
BOOKKEEPING = (
    "--noconftest tests/engine/test_scheduler.py tests/engine/test_block_manager.py"
    " tests/engine/test_kv_quota.py"
    " --deselect tests/engine/test_block_manager.py::test_imports_without_torch"
    # it loads a model (and test_pins.py, all model tests, is not run per mutant)
    " --deselect tests/engine/test_kv_quota.py::"
    "test_a_request_that_could_never_fit_its_tenants_cap_is_refused"
)
TARGETS: dict[str, str] = {
    "tenants/quotas.py": "tests/tenants/test_quotas.py",
    "engine/output_processor.py": "--noconftest tests/engine/test_output_processor.py",
    "engine/scheduler.py": (
        f"{BOOKKEEPING} tests/engine/test_fairness.py --deselect"
        " tests/engine/test_fairness.py::test_greedy_outputs_do_not_depend_on_the_policy"
    ),
    "engine/block_manager.py": BOOKKEEPING,
    "engine/sampler.py": (
        "tests/engine/test_sampler.py tests/engine/test_sampling.py"
        # the output processor's, through the model
        " --deselect tests/engine/test_sampling.py::test_stop_string_is_trimmed"
        " --deselect tests/engine/test_sampling.py::test_stop_token_ids_and_length"
        " --deselect tests/engine/test_sampling.py::test_multibyte_text_streams_cleanly"
    ),
}
# module -> third-party modules the fork server (tools/pytest_forkserver.py) imports once
PREIMPORTS: dict[str, list[str]] = {
    "tenants/quotas.py": ["redis", "redis.asyncio"],
    "engine/output_processor.py": ["tokenizers"],
    "engine/scheduler.py": ["hypothesis", "hypothesis.stateful"],
    "engine/block_manager.py": ["hypothesis", "hypothesis.stateful"],
    "engine/sampler.py": [
        "torch",
        "safetensors.torch",
        "tokenizers",
        "transformers.models.llama.modeling_llama",  # the tiny models of tests/engine/conftest.py
        "transformers.models.qwen2.modeling_qwen2",
        "xgrammar",
        "hypothesis",
    ],
}


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions, as (line, column), of every annotation in `source`."""
    nodes: list[ast.expr] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.arg) and node.annotation is not None:
            nodes.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            nodes.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            nodes.append(node.annotation)
    return [
        ((n.lineno, n.col_offset), (n.end_lineno or n.lineno, n.end_col_offset or 0)) for n in nodes
    ]


def skip_mutants(session: Path, source: str) -> int:
    """Mark as skipped the pending mutants inside annotations or of an excluded operator."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = annotation_spans(source)
    excluded = re.compile(EXCLUDED_OPERATORS)
    skipped = 0
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            mutation = item.mutations[0]
            start = tuple(mutation.start_pos)
            why = None
            if any(lo <= start < hi for lo, hi in spans):
                why = "annotation"
            elif excluded.match(mutation.operator_name):
                why = "excluded operator"
            if why is not None:
                result = WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=why)
                db.set_result(item.job_id, result)
                skipped += 1
    return skipped


def copy_tree(dest: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        src = ROOT / raw.decode()
        if src.is_file():
            (dest / raw.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / raw.decode())


def write_config(path: Path, module: str, test_command: str, timeout: float) -> None:
    path.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{test_command}"\n'
        "\n[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )


def run_module(
    module: str, workdir: Path, timeout: float, retest: bool, since: str | None, until: float | None
) -> Path:
    """Init (once) and execute the session of `module`; return the session file."""
    name = module.replace("/", "_").removesuffix(".py")
    tree = workdir / name
    session = workdir / f"{name}.sqlite"
    config = workdir / f"{name}.toml"
    # A fresh copy each time: an interrupted run may have left a mutant in the old one.
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    copy_tree(tree)
    sock = workdir / f"{name}.sock"
    # the scratch copy's client: an edit of the checkout's mid-run must not fail every mutant
    client = tree / FORKSERVER.relative_to(ROOT)
    test_command = f"{sys.executable} {client} run {sock} {PYTEST_ARGS} {TARGETS[module]}"
    write_config(config, module, test_command, timeout)
    if not session.exists():
        cosmic_ray("init", config, session, cwd=tree)
    again: set[str] = set()
    if retest:
        with sqlite3.connect(session) as db:
            survived = "FROM work_results WHERE test_outcome = 'SURVIVED'"
            again = {row[0] for row in db.execute(f"SELECT job_id {survived}")}
            db.execute(f"DELETE {survived}")
        print(f"{module}: {len(again)} survivors to test again (first)", flush=True)
    skipped = skip_mutants(session, (tree / module).read_text())
    print(f"{module}: {skipped} more mutants skipped (annotations, excluded operators)", flush=True)
    first = changed_lines(module, since) if since else set()
    with fork_server(sock, module, PREIMPORTS[module], cwd=tree):
        execute(session, test_command, timeout, tree, first, until, again)
    return session


def changed_lines(module: str, since: str) -> set[int]:
    """Lines of `module` that `git diff since` adds or changes."""
    diff = subprocess.run(
        ["git", "diff", "-U0", since, "--", module], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode()
    lines: set[int] = set()
    for start, count in re.findall(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", diff, re.MULTILINE):
        lines.update(range(int(start), int(start) + int(count or 1)))
    return lines


def execute(
    session: Path,
    test_command: str,
    timeout: float,
    tree: Path,
    first: set[int],
    until: float | None,
    again: set[str],
) -> None:
    """What `cosmic-ray exec` does with the local distributor, with an order and an end: the
    survivors run `again` first, then the pending mutants on `first` lines, then the others;
    none started after `until` (epoch seconds; the rest stay pending)."""
    import attrs
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db

    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = sorted(
            db.pending_work_items,
            key=lambda w: (w.job_id not in again, w.mutations[0].start_pos[0] not in first),
        )
        for item in pending:
            if until is not None and time.time() > until:
                break
            mutations = [attrs.evolve(m, module_path=tree / m.module_path) for m in item.mutations]
            db.set_result(item.job_id, mutate_and_test(mutations, test_command, timeout))


@contextmanager
def fork_server(sock: Path, module: str, imports: list[str], cwd: Path) -> Iterator[None]:
    """tools/pytest_forkserver.py serving in `cwd` (the scratch copy) while the block runs."""
    sock.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, str(FORKSERVER), "serve", str(sock), module, *imports],
        cwd=cwd,
        env={**os.environ, **TEST_ENV},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the pytest fork server for {cwd} did not start")
        yield
    finally:
        server.terminate()
        server.wait()
        sock.unlink(missing_ok=True)


def cosmic_ray(command: str, config: Path, session: Path, cwd: Path) -> None:
    exe = Path(sys.executable).parent / "cosmic-ray"
    env = {**os.environ, **TEST_ENV}
    subprocess.run([str(exe), command, str(config), str(session)], cwd=cwd, env=env, check=True)


def report(module: str, session: Path) -> int:
    """Print counts and every survivor's diff; return the number of survivors."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    with use_db(str(session), WorkDB.Mode.open) as db:
        done = list(db.completed_work_items)
        pending = db.num_work_items - len(done)
    tested = [(i, r) for i, r in done if r.worker_outcome is not WorkerOutcome.SKIPPED]
    survivors = [(i, r) for i, r in tested if r.test_outcome is TestOutcome.SURVIVED]
    print(
        f"== {module}: {len(tested)} mutants tested, {len(tested) - len(survivors)} killed, "
        f"{len(survivors)} survived, {len(done) - len(tested)} skipped, {pending} pending"
    )
    for item, result in sorted(survivors, key=lambda ir: tuple(ir[0].mutations[0].start_pos)):
        m = item.mutations[0]
        print(f"-- {module}:{m.start_pos[0]} {m.operator_name} #{m.occurrence}")
        diff = (result.diff or "").splitlines()
        print("\n".join(line for line in diff if line[:1] in "+-" and line[:3] not in "+++---"))
    return len(survivors)


def until_epoch(hhmm: str) -> float:
    """The next HH:MM (UTC) from now, as epoch seconds."""
    now = datetime.now(UTC)
    hour, minute = map(int, hhmm.split(":"))
    end = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return (end if end > now else end + timedelta(days=1)).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".mutation")
    parser.add_argument("--jobs", type=int, default=2, help="modules run side by side")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    parser.add_argument(
        "--nice", type=int, default=0, help="raise the niceness of the run (and its tests) by N"
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--retest-survivors", action="store_true", help="run the survivors again (new tests)"
    )
    parser.add_argument("--since", help="git revision: mutants on lines changed since it first")
    parser.add_argument(
        "--until", help="HH:MM (UTC): start no mutant after it; the rest stay pending"
    )
    args = parser.parse_args()
    args.modules = args.modules or list(TARGETS)
    unknown = set(args.modules) - set(TARGETS)
    if unknown:
        parser.error(f"no tests are listed for {sorted(unknown)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        os.nice(args.nice)  # inherited by cosmic-ray and every test it starts
        with ThreadPoolExecutor(args.jobs) as pool:
            run = partial(
                run_module,
                workdir=args.workdir,
                timeout=args.timeout,
                retest=args.retest_survivors,
                since=args.since,
                until=args.until and until_epoch(args.until),
            )
            list(pool.map(run, args.modules))
    survived = 0
    for module in args.modules:
        name = module.replace("/", "_").removesuffix(".py")
        session = args.workdir / f"{name}.sqlite"
        if session.exists():
            survived += report(module, session)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
