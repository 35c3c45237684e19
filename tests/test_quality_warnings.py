"""A large quality drop is said loudly: metrics["warnings"], the report's warning box, and the
tables of prune and distill steps show their figures (no placeholders, no raw key dump)."""

import re

from worker.engine.report import render
from worker.quality_warnings import quality_warnings


def recipe_metrics(pruned_top1: float, final_top1: float) -> dict:
    return {
        "original": {"size_bytes": 400_000, "accuracy": {"top1": 0.994}},
        "compressed": {"size_bytes": 82_752, "accuracy": {"top1": final_top1}},
        "comparison": {"size_ratio": 4.83, "accuracy_drop": 0.994 - final_top1, "fidelity": []},
        "steps": [
            {"type": "prune", "method": "channels", "ratio": 0.5, "sparsity": 0.0, "size_bytes": 100_000,
             "parameters": [20_000, 5_000], "macs": [900_000, 250_000],
             "quality": {"before": {"top1": 0.994}, "after_pruning": {"top1": pruned_top1}, "after_recovery": None},
             "after_step": {"size_bytes": 100_000}},
            {"type": "distill", "student": "the previous step's output", "teacher": "the job's original model", "size_bytes": 99_000,
             "quality": {"teacher": {"top1": 0.994, "top1_agreement": 1.0}, "student_before": {"top1": pruned_top1},
                         "student_after": {"top1": 0.675}}},
        ],
    }


def test_a_prune_without_recovery_that_loses_most_accuracy_says_finetune():
    metrics = recipe_metrics(0.083, 0.083)
    codes = {w["code"]: w["message"] for w in quality_warnings(metrics)}
    assert "finetune" in codes["prune_needs_recovery"] and "0.083" in codes["prune_needs_recovery"]
    assert "91.1 points" in codes["large_accuracy_drop"]


def test_a_small_drop_warns_of_nothing():
    metrics = recipe_metrics(0.99, 0.99)
    assert quality_warnings(metrics) == []
    assert "role=\"alert\"" not in render({**metrics, "warnings": []})


def test_report_flags_the_drop_and_shows_every_step_figure():
    metrics = recipe_metrics(0.60, 0.675)
    metrics["warnings"] = quality_warnings(metrics)
    html = render(metrics, job_id="job_x")
    assert 'class="warnings"' in html and "31.9 points" in html
    assert '<tr class="warn"><th>top-1 accuracy' in html
    # Distill: teacher and student figures, not dashes; prune: no "sparsity 0.0" for channels.
    distill = html.split("Step 2: distill")[1]
    assert "teacher</th><td>top-1 0.9940" in distill and "student after training</th><td>top-1 0.6750" in distill
    assert "—" not in html.split("<h2>Steps</h2>")[1].split("<h2>Environment")[0]
    assert "After step 1: 100,000 bytes</p>" in html
    assert "sparsity" not in html.split("<h2>Steps</h2>")[1].split("</ol>")[0]
    steps = re.findall(r"<li><code>(\w+)</code> (.*?)</li>", html)
    assert steps[0] == ("prune", "method channels; ratio 0.5000; parameters 20,000 → 5,000; MACs 900,000 → 250,000; 100,000 bytes")
    assert "no recovery" in html
