# ruff: noqa: E501  (a table of one-line mutations, each readable on its line)
"""Mutations of issue 26's items: each removes a feature a test is named for; that test must then fail.

    CI=true .venv/bin/python tests/mutations.py > docs/results/mutations.json   # all, or name parts: "LRU"

Each mutation replaces one line of the product, runs the named test(s) and puts the file back (also on
failure). `failed: true` is the wanted outcome: the test can fail on what it is named for.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

MUTS = [
 ("1 certified path shown to run", "core/method/scorer.py", "        return not (exact_map_needed or", "        return False and not (exact_map_needed or",
  "tests/test_knn_certified.py::test_the_certified_path_is_the_one_that_ran"),
 ("1 percentile vs exact", "core/method/scorer.py", ' or self.settings.score_stat != "max")', ')',
  "tests/test_knn_certified.py::test_with_a_mask_a_heatmap_alone_or_a_percentile_the_results_equal_the_exact_search"),
 ("1 agent past the cut-over runs certified", "core/method/patch_branch.py", "        if self.knn is None or len(self.bank) < MIN_BANK", "        if True or self.knn is None or len(self.bank) < MIN_BANK",
  "tests/test_knn_certified.py::test_a_running_agent_with_banks_past_the_cut_over_answers_as_the_exact_search"),
 ("6 models verifies the mask", "core/roi/manifest.py", "    problem = mask_problem(store.mask_path)\n", "    problem = None\n",
  "tests/test_recovery.py"),
 ("4 LRU model leaves", "agent/runtime.py", "old = next(iter(self._models))", "old = next(reversed(self._models))",
  "tests/test_limits.py::test_roi_count_is_bounded_and_least_recently_used_models_leave_memory"),
 ("4 recent results evicted", "agent/operator/recent.py", "deque(maxlen=max(1, size))", "deque(maxlen=max(1, size) + 100)",
  "tests/test_recent.py"),
 ("4 queue bound reached, never passed", "agent/worker.py", "queue.Queue(maxsize=cfg.queue_size)", "queue.Queue(maxsize=0)",
  "tests/test_soak.py"),
 ("3 archive member-name rule", "core/roi/state_files.py", 'MEMBER = r"^(manifest', 'MEMBER = r"^(.+|manifest',
  "tests/test_import_hostile.py::test_each_crafted_archive_is_refused_with_a_reason_and_leaves_nothing"),
 ("2 lifecycle kills inside the operation", "core/roi/versions.py", '    atomic_write_json(store.root / "pending.json", op)\n', "    return\n",
  "tests/test_lifecycle.py::test_kill9_during_a_delete_or_a_rollback_leaves_the_old_or_the_new_version"),
 ("7 drift alarm from the margin rule", "core/drift.py", "        if used is not None and used >= s.warning:", "        if False:",
  "tests/test_drift.py::test_brightening_good_parts_raise_warning_then_alarm_and_clear"),
]
root = Path(__file__).resolve().parents[1]
env = dict(os.environ)
only = sys.argv[1:]
for name, f, old, new, test in MUTS:
    if only and not any(o in name for o in only):
        continue
    p = root / f
    src = p.read_text()
    assert old in src, (name, old)
    p.write_text(src.replace(old, new, 1))
    try:
        r = subprocess.run([str(root / ".venv/bin/python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                           cwd=root, env=env, capture_output=True, text=True, timeout=900)
    finally:
        p.write_text(src)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]
    print(json.dumps({"mutation": name, "file": f, "test": test, "failed": r.returncode != 0, "summary": tail}), flush=True)
