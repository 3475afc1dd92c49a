"""Run HF PEFT's own test suite against the reference ``peft`` and against peftkit.

Run (a) runs the rule's candidates (hfps_selection.py) with the real ``peft``; the tests that pass
form the *selection*. Run (b) runs the selection again with ``peft`` aliased to peftkit
(peft_alias.py). Both runs are separate pytest processes, offline, one after the other.

    python benchmarks/hf_peft_suite/run.py --out /tmp/hf_peft_suite.json
    python benchmarks/hf_peft_suite/run.py --quick --out /tmp/quick.json   # a few small files

See README.md beside this file.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hfps_plugin import loose_id  # noqa: E402
from hfps_selection import FILES, SUPPORTED_CONFIGS, Rule, foreign_configs  # noqa: E402

DEFAULT_SUITE = Path("/tmp/peft_src/peft-0.21.2/tests")
DEFAULT_WORKDIR = Path("/tmp/hf_peft_suite_work")
DEFAULT_DEPS = Path("/tmp/hf_peft_suite_deps")
DEFAULT_PEFTKIT_SRC = HERE.parents[1] / "src"
WORKDIR_MARKER = ".hf_peft_suite_workdir"  # run.py only clears a --workdir that has it (or an empty one)
# Test-only requirements of the suite that peftkit's environment lacks; installed with --no-deps
# into --deps-dir (not into the environment) and put on PYTHONPATH of the two runs only.
SUITE_DEPS = ("diffusers", "parameterized", "pytest-timeout")
VERSIONED = ("peft", "peftkit", "torch", "transformers", "diffusers", "pytest", "pytest-timeout")
QUICK_FILES = (
    "test_config.py",
    "test_mapping.py",
    "test_helpers.py",
    "test_adaption_prompt.py",
    "test_multitask_prompt_tuning.py",
)
# From HF PEFT's pyproject [tool.pytest]; its addopts (coverage, durations) are left out.
PYTEST_INI = """\
[pytest]
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
filterwarnings =
    error::DeprecationWarning:transformers
    ignore:.*BPE.__init__ will not create from files anymore.*:DeprecationWarning:transformers
    error::FutureWarning:transformers
"""
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class RunResult:
    """What one pytest process did."""

    name: str
    command: list[str]
    returncode: int | None
    wall_s: float
    timed_out: bool
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    collected: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    collect_errors: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", type=Path, default=DEFAULT_SUITE, help="HF PEFT tests/ folder (unpacked sdist)")
    p.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch folder, cleared on each run"
    )
    p.add_argument("--out", type=Path, required=True, help="JSON report path")
    p.add_argument("--files", nargs="+", metavar="FILE", help="only these test files (names in tests/)")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_FILES)}")
    p.add_argument("-k", dest="keyword", help="pytest -k expression, applied to both runs")
    p.add_argument(
        "--timeout", type=float, default=120, help="per-test timeout in s (pytest-timeout); 0: none"
    )
    p.add_argument(
        "--tb", default="line", help="pytest --tb style for the logs (short/long cost ~0.4 s a failure)"
    )
    p.add_argument("--max-minutes", type=float, default=0, help="wall limit per run; 0: none")
    p.add_argument(
        "--peftkit-src",
        type=Path,
        default=DEFAULT_PEFTKIT_SRC,
        help="folder holding the peftkit package to test, put first on PYTHONPATH (default: this checkout's src/)",
    )
    p.add_argument("--deps-dir", type=Path, default=DEFAULT_DEPS, help="extra packages for the suite")
    p.add_argument("--install-deps", action="store_true", help=f"pip install {' '.join(SUITE_DEPS)} there")
    p.add_argument(
        "--missing",
        choices=("placeholder", "error"),
        default="placeholder",
        help="peft names peftkit lacks: placeholders failing on use (default) or ImportError at import",
    )
    p.add_argument(
        "--no-probes", action="store_true", help="no infer_device stand-in (peft_alias.HARNESS_PROBES)"
    )
    p.add_argument("--reuse-reference", action="store_true", help="reuse run (a) results from --workdir")
    p.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the results in --workdir"
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------- setup


def install_deps(deps_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps_dir), *SUITE_DEPS]
    subprocess.run(cmd, check=True)


def importable(module: str, env: dict[str, str]) -> bool:
    """Whether ``module`` imports in the environment the runs get (PYTHONPATH included)."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True)
    return proc.returncode == 0


def prepare_workdir(suite: Path, workdir: Path, keep_reference: bool) -> Path:
    """Copy the suite to ``workdir/tests`` (a package, as in the HF PEFT repo) and write pytest.ini."""
    if not (suite / "testing_common.py").is_file():
        raise SystemExit(f"{suite} does not look like HF PEFT's tests/ folder")
    workdir.mkdir(parents=True, exist_ok=True)
    marker = workdir / WORKDIR_MARKER
    if any(workdir.iterdir()) and not marker.exists():
        raise SystemExit(f"{workdir} is not empty and was not made by run.py; pick another --workdir")
    for path in workdir.iterdir():
        if path == marker or (keep_reference and path.name.startswith("reference.")):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    marker.touch()
    tests = workdir / "tests"
    shutil.copytree(suite, tests, ignore=shutil.ignore_patterns("__pycache__"))
    (tests / "__init__.py").touch()  # the sdist drops it; the tests use relative imports
    (workdir / "pytest.ini").write_text(PYTEST_INI)
    return tests


def reference_rule() -> Rule:
    """The rule, with the foreign config names taken from the reference peft's ``__all__``."""
    import peft  # the reference; this process never imports the alias

    return Rule(foreign_configs=foreign_configs(peft.__all__))


def base_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, **OFFLINE_ENV)
    paths = [str(HERE), str(args.peftkit_src or ""), str(args.deps_dir), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PEFTKIT_ALIAS_MISSING"] = args.missing
    env["PEFTKIT_ALIAS_PROBES"] = "0" if args.no_probes else "1"
    return env


# --------------------------------------------------------------------------- running


def run_pytest(
    name: str,
    args: argparse.Namespace,
    files: list[str],
    env: dict[str, str],
    extra: list[str],
    alias: bool,
) -> RunResult:
    workdir: Path = args.workdir
    results = workdir / f"{name}.jsonl"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", f"--tb={args.tb}", "--continue-on-collection-errors"]
    cmd += ["-p", "no:cacheprovider", "-p", "hfps_plugin"]
    if alias:
        cmd += ["-p", "peft_alias"]
    cmd += ["-c", "pytest.ini", "--rootdir", ".", "--hfps-offline", "--hfps-results", results.name]
    if args.timeout:
        cmd += ["--timeout", str(args.timeout)]
    if args.keyword:
        cmd += ["-k", args.keyword]
    cmd += extra + [f"tests/{f}" for f in files]
    limit = args.max_minutes * 60 or None
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    with open(workdir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - start
    print(f"[{name}] exit {proc.returncode} after {wall / 60:.1f} min", flush=True)
    run_info = {
        "command": cmd,
        "returncode": proc.returncode,
        "wall_s": wall,
        "timed_out": timed_out,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - wall)),
        "peftkit_source": peftkit_source(env),
    }
    (workdir / f"{name}.run.json").write_text(json.dumps(run_info))
    return read_results(name, workdir)


def peftkit_source(env: dict[str, str]) -> dict[str, Any]:
    """Where the runs import peftkit from, its git commit, and whether that source differs from it."""
    code = "import peftkit; print(peftkit.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    src = Path(proc.stdout.strip()).parent

    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", "-C", str(src), *cmd], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {
        "path": str(src),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", ".")),
    }


def read_results(name: str, workdir: Path) -> RunResult:
    """A run's results from ``<workdir>/<name>.jsonl`` (and ``<name>.run.json`` when present)."""
    info_path = workdir / f"{name}.run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    run = RunResult(
        name,
        info.get("command", []),
        info.get("returncode"),
        info.get("wall_s", 0.0),
        info.get("timed_out", False),
        info=info,
    )
    path = workdir / f"{name}.jsonl"
    if not path.exists():
        return run
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "excluded" in record:
            run.excluded[record["excluded"]] = record["reason"]
        elif "collected" in record:
            run.collected.append(record["collected"])
        elif "collect_error" in record:
            run.collect_errors[record["collect_error"]] = record["message"]
        else:
            run.tests[record["nodeid"]] = record
    return run


# --------------------------------------------------------------------------- report

_HEX = re.compile(r"0x[0-9a-fA-F]+")
_TMP = re.compile(r"/tmp/[^\s'\"),]*")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])")
_MISSING_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(peft[\w.]*) is not provided by peftkit"), "not in peftkit: {0}"),
    (re.compile(r"(\S+) got an unexpected keyword argument '(\w+)'"), "keyword {1!r} of {0}"),
    (
        re.compile(r"(module '[\w.]+'|'\w+' object|type object '\w+') has no attribute '(\w+)'"),
        "{0}: attribute {1!r}",
    ),
    (re.compile(r"cannot import name '(\w+)' from '([\w.]+)'"), "import {1}.{0}"),
    (re.compile(r"No module named '([\w.]+)'"), "module {0}"),
)


def group_key(message: str) -> str:
    """A failure's first line with addresses, temp paths and numbers blanked, for grouping."""
    line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    line = _NUMBER.sub("N", _TMP.sub("<tmp>", _HEX.sub("0x?", line)))
    return line[:240]


def exception_type(message: str) -> str:
    text = message.strip()
    if text.startswith("assert "):  # pytest's assertion rewriting drops the type name
        return "AssertionError"
    match = re.match(r"([A-Za-z_][\w.]*)(?::|$)", text)
    return match.group(1) if match else "(other)"


def missing_name(message: str) -> str | None:
    for pattern, template in _MISSING_PATTERNS:
        match = pattern.search(message)
        if match:
            return template.format(*match.groups())
    return None


def grouped(failures: dict[str, str], key: Callable[[str], str | None], limit: int) -> list[dict[str, Any]]:
    """Failures grouped by ``key(message)``, most frequent first, each with an example node id."""
    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for nodeid, message in failures.items():
        k = key(message)
        if k is not None:
            counts[k] += 1
            examples.setdefault(k, nodeid)
    return [{"count": n, "key": k, "example": examples[k]} for k, n in counts.most_common(limit)]


def match_ids(selected: list[str], results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Results keyed by the reference's node ids: exact, else by a ``loose_id`` unique on both sides."""
    selected_loose = collections.Counter(loose_id(t) for t in selected)
    results_loose: dict[str, list[str]] = collections.defaultdict(list)
    for t in results:
        results_loose[loose_id(t)].append(t)
    matched: dict[str, dict[str, Any]] = {}
    for t in selected:
        if t in results:
            matched[t] = results[t]
            continue
        key = loose_id(t)
        if selected_loose[key] == 1 and len(results_loose[key]) == 1:
            matched[t] = dict(results[results_loose[key][0]], matched_as=results_loose[key][0])
    return matched


def build_report(
    args: argparse.Namespace, rule: Rule, files: list[str], ref: RunResult, kit: RunResult | None
) -> dict[str, Any]:
    candidates = ref.collected
    selected = [t for t in candidates if ref.tests.get(t, {}).get("outcome") == "passed"]
    kit_tests = match_ids(selected, kit.tests if kit else {})
    kit_outcome = {t: kit_tests.get(t, {}).get("outcome") or "not run" for t in selected}
    passed = [t for t in selected if kit_outcome[t] == "passed"]

    kit_collected = set(kit.collected) if kit else set()
    failures: dict[str, str] = {}
    for t in selected:
        record = kit_tests.get(t)
        if record is not None:
            if record["outcome"] != "passed":
                failures[t] = record.get("message") or f"({record['outcome']})"
        elif kit is None:
            failures[t] = "not run"
        elif t in kit_collected:
            failures[t] = "not run: the peftkit run ended first" + (" (time limit)" if kit.timed_out else "")
        elif t.split("::")[0] in kit.collect_errors:
            failures[t] = f"not collected: {kit.collect_errors[t.split('::')[0]]}"
        else:
            failures[t] = "not collected under peftkit (parametrization differs)"

    per_file: dict[str, dict[str, Any]] = {}
    for f in files:
        prefix = f"tests/{f}::"
        n_cand = sum(t.startswith(prefix) for t in candidates)
        n_sel = sum(t.startswith(prefix) for t in selected)
        n_pass = sum(t.startswith(prefix) for t in passed)
        per_file[f] = {
            "candidates": n_cand,
            "passed_with_peft": n_sel,
            "passed_with_peftkit": n_pass,
            "percent": round(100 * n_pass / n_sel, 1) if n_sel else None,
        }

    per_config: dict[str, dict[str, int]] = collections.defaultdict(
        lambda: {"selected": 0, "passed_with_peftkit": 0}
    )
    for t in selected:
        names = set(re.findall(r"[A-Za-z0-9]+", t.partition("::")[2]))
        config = next((c for c in sorted(SUPPORTED_CONFIGS) if c in names), "(no config in the id)")
        per_config[config]["selected"] += 1
        per_config[config]["passed_with_peftkit"] += t not in failures

    reasons = collections.Counter(ref.excluded.values())
    ref_outcomes = collections.Counter(ref.tests.get(t, {}).get("outcome") or "not run" for t in candidates)
    return {
        "counts": {
            "collected_in_rule_files": len(candidates) + len(ref.excluded),
            "excluded_by_rule": len(ref.excluded),
            "candidates": len(candidates),
            "selected_passed_with_peft": len(selected),
            "passed_with_peftkit": len(passed),
            "percent": round(100 * len(passed) / len(selected), 2) if selected else None,
            "reference_outcomes": dict(ref_outcomes.most_common()),
            "peftkit_outcomes": dict(collections.Counter(kit_outcome.values()).most_common()),
            "matched_by_loose_id": sum("matched_as" in r for r in kit_tests.values()),
        },
        "per_file": per_file,
        "per_config": dict(sorted(per_config.items(), key=lambda kv: -kv[1]["selected"])),
        "failure_groups": grouped(failures, group_key, 200),
        "by_exception_type": grouped(failures, exception_type, 50),
        "by_missing_name": grouped(failures, missing_name, 200),
        "by_test_function": grouped({t: t.split("[")[0] for t in failures}, lambda name: name, 200),
        "excluded_by_rule_reasons": dict(reasons.most_common(60)),
        "collection_errors": {"peft": ref.collect_errors, "peftkit": kit.collect_errors if kit else {}},
        "runs": {
            r.name: {
                "command": r.command,
                "returncode": r.returncode,
                "wall_s": round(r.wall_s, 1),
                "timed_out": r.timed_out,
                "started": r.info.get("started"),
                "peftkit_source": r.info.get("peftkit_source"),
            }
            for r in (ref, kit)
            if r is not None
        },
        "meta": {
            "suite": str(args.suite),
            "files": files,
            "keyword": args.keyword,
            "timeout_s": args.timeout,
            "missing_names": args.missing,
            "harness_probes": not args.no_probes,
            "versions": versions(base_env(args)),
            "selection_rule": rule.to_json(),
        },
        "peftkit_failures": dict(sorted(failures.items())),
    }


def versions(env: dict[str, str]) -> dict[str, str | None]:
    """Versions of the main distributions, as the runs see them (``env``'s PYTHONPATH included)."""
    code = (
        "import json, importlib.metadata as m\n"
        "def v(d):\n"
        "    try:\n"
        "        return m.version(d)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        f"print(json.dumps({{d: v(d) for d in {list(VERSIONED)!r}}}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def print_summary(report: dict[str, Any], top: int = 25) -> None:
    c = report["counts"]
    print(
        f"candidates {c['candidates']}  selected (pass with peft) {c['selected_passed_with_peft']}  "
        f"pass with peftkit {c['passed_with_peftkit']}  ({c['percent']}%)"
    )
    for f, row in report["per_file"].items():
        print(
            f"  {f:40s} {row['passed_with_peftkit']:>6} / {row['passed_with_peft']:<6} ({row['candidates']} candidates)"
        )
    print(f"top {top} failure groups:")
    for g in report["failure_groups"][:top]:
        print(f"  {g['count']:>6}  {g['key']}")


# --------------------------------------------------------------------------- main


def run_both(args: argparse.Namespace, files: list[str], rule: Rule) -> tuple[RunResult, RunResult | None]:
    """Run (a) on the rule's candidates (unless reused), then run (b) on what passed."""
    if args.install_deps:
        install_deps(args.deps_dir)
    env = base_env(args)
    missing = [m for m in ("diffusers", "parameterized") if not importable(m, env)]
    if missing:
        raise SystemExit(f"the suite needs {', '.join(missing)}: rerun with --install-deps")
    if args.timeout and not importable("pytest_timeout", env):
        print("pytest-timeout is not installed (--install-deps): running without a per-test timeout")
        args.timeout = 0
    reuse = args.reuse_reference and (args.workdir / "reference.jsonl").exists()
    prepare_workdir(args.suite, args.workdir, keep_reference=reuse)
    rule_file = args.workdir / "rule.json"
    rule_file.write_text(json.dumps(rule.to_json(), indent=1))
    if reuse:
        ref = read_results("reference", args.workdir)
    else:
        ref = run_pytest("reference", args, files, env, ["--hfps-rule", rule_file.name], alias=False)
    selected = [t for t in ref.collected if ref.tests.get(t, {}).get("outcome") == "passed"]
    ids_file = args.workdir / "selected_ids.txt"
    ids_file.write_text("\n".join(selected) + "\n")
    if not selected:
        return ref, None
    return ref, run_pytest("peftkit", args, files, env, ["--hfps-ids", ids_file.name], alias=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    if importlib.util.find_spec("peft") is None:
        raise SystemExit("the reference peft is not installed")
    files = list(QUICK_FILES) if args.quick else sorted(args.files or FILES)
    unknown = [f for f in files if f not in FILES]
    if unknown:
        raise SystemExit(f"not in the selection rule: {unknown} (see hfps_selection.FILES)")
    rule = reference_rule()

    if args.report_only:
        ref = read_results("reference", args.workdir)
        kit = read_results("peftkit", args.workdir) if (args.workdir / "peftkit.jsonl").exists() else None
    else:
        ref, kit = run_both(args, files, rule)

    report = build_report(args, rule, files, ref, kit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_summary(report)
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
