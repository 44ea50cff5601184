"""Writes results/upstream_trainer_tests.json from runs of transformers' own Trainer tests, each suite run twice
with junit reports: with the plain Trainer, and with VSATrainer substituted (conftest.py, HF_VSA_SUBSTITUTE=1).

From a tree holding the conftest and the test files (see conftest.py), per suite:

    python -m pytest -p no:cacheprovider tests/trainer --junitxml=plain.xml
    HF_VSA_SUBSTITUTE=1 HF_VSA_RUNS_OUT=runs.json python -m pytest -p no:cacheprovider tests/trainer --junitxml=vsa.xml

then, from this repository's root:

    python scripts/diagnostics/trainer_suite/compare.py --suite NAME plain.xml vsa.xml runs.json [--suite ...] \\
        --what "..." --out results/upstream_trainer_tests.json

A test counts once across suites (the same file, class and name: its later suite wins)."""
import argparse
import datetime
import json
import subprocess
import xml.etree.ElementTree as ET


def outcomes(path):
    """{file::class::test: PASSED | FAILED | SKIPPED} from a pytest junit report."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module, _, cls = case.get("classname").rpartition(".")
        if cls.startswith("test_"):  # a test function at module level: the classname is the module's
            module, cls = case.get("classname"), None
        path = module.replace(".", "/") + ".py"
        name = f"{path}::{cls}::{case.get('name')}" if cls else f"{path}::{case.get('name')}"
        status = "PASSED"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "FAILED"
            elif child.tag == "skipped" and status == "PASSED":
                status = "SKIPPED"
        out[name] = status
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs=4, action="append", required=True, metavar=("NAME", "PLAIN", "VSA", "RUNS"))
    p.add_argument("--what", required=True, help="which upstream files and commits the suites hold")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    tests, suites = {}, []
    for name, plain, vsa, runs in a.suite:
        t, v = outcomes(plain), outcomes(vsa)
        for k in t:
            tests[k] = {"suite": name, "trainer": t[k], "vsatrainer": v.get(k, "MISSING")}
        suites.append({"suite": name, "runs": json.load(open(runs)),
                       **{who: {s: sum(1 for x in d.values() if x == s) for s in ("PASSED", "FAILED", "SKIPPED")}
                          for who, d in (("trainer", t), ("vsatrainer", v))}})
    count = lambda who, s: sum(1 for x in tests.values() if x[who] == s)  # noqa: E731
    import transformers
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "what": a.what, "date": datetime.date.today().isoformat(), "transformers": transformers.__version__,
        "hf_vsa_commit": commit or None,
        "plain": {"passed": count("trainer", "PASSED"), "failed": count("trainer", "FAILED"),
                  "skipped": count("trainer", "SKIPPED")},
        "vsatrainer": {"passed": count("vsatrainer", "PASSED"), "failed": count("vsatrainer", "FAILED"),
                       "skipped": count("vsatrainer", "SKIPPED"),
                       "runs": {k: sum(s["runs"][k] for s in suites) for k in suites[0]["runs"]}},
        "passing_with_the_trainer_but_failing_with_vsatrainer": sorted(
            k for k, x in tests.items() if x["trainer"] == "PASSED" and x["vsatrainer"] != "PASSED"),
        "suites": suites,
        "tests": dict(sorted(tests.items())),
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("plain", "vsatrainer", "passing_with_the_trainer_but_failing_with_vsatrainer")}))


if __name__ == "__main__":
    main()
