"""Plots and the markdown report, from plain rows."""

import math

from pipeline.evaluation import plots, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SUMMARY_ROWS = [
    {
        "model": "sft",
        "temperature": 1.0,
        "n": 64,
        "reward_mean": 0.01,
        "kl_mean": None,
        "win_rate": None,
        "win_rate_ci_low": None,
        "win_rate_ci_high": None,
    },
    {
        "model": "dpo",
        "temperature": 0.7,
        "n": 64,
        "reward_mean": 0.41234,
        "kl_mean": 1.5,
        "win_rate": 0.7,
        "win_rate_ci_low": 0.61,
        "win_rate_ci_high": 0.79,
    },
    {
        "model": "dpo",
        "temperature": 1.0,
        "n": 64,
        "reward_mean": 0.35,
        "kl_mean": 2.25,
        "win_rate": 0.65,
        "win_rate_ci_low": 0.55,
        "win_rate_ci_high": 0.75,
    },
]


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_training_curves_png(tmp_path):
    metrics = [
        {
            "step": s,
            "loss": math.log(2) - 0.01 * s,
            "rewards/chosen": 0.02 * s,
            "rewards/rejected": -0.02 * s,
            "rewards/accuracies": min(1.0, 0.5 + 0.05 * s),
            "rewards/margins": 0.04 * s,
        }
        for s in range(10)
    ]
    path = tmp_path / "plots" / "training.png"  # the folder is created
    plots.plot_training_curves(metrics, path)
    _assert_png(path)


def test_training_curves_tolerate_absent_metrics(tmp_path):
    path = tmp_path / "training.png"
    plots.plot_training_curves([{"step": 0, "loss": 0.69}, {"step": 1, "loss": None}], path)
    _assert_png(path)


def test_reward_vs_kl_png_with_a_model_without_kl(tmp_path):
    path = tmp_path / "frontier.png"
    plots.plot_reward_vs_kl(SUMMARY_ROWS, path)
    _assert_png(path)


def test_win_rate_vs_temperature_png_skips_missing_win_rates(tmp_path):
    path = tmp_path / "win_rate.png"
    plots.plot_win_rate_vs_temperature(SUMMARY_ROWS, path)
    _assert_png(path)


def test_report_md_has_table_figures_and_notes(tmp_path):
    fig = tmp_path / "win_rate.png"
    plots.plot_win_rate_vs_temperature(SUMMARY_ROWS, fig)
    path = tmp_path / "report.md"
    report.write_report_md(
        path,
        title="Demo run",
        summary_rows=SUMMARY_ROWS,
        figures={"Win rate": str(fig), "Frontier": "plots/frontier.png"},
        notes=["judge: vader, both orders"],
    )
    text = path.read_text()
    assert text.startswith("# Demo run")
    # Only the columns some row fills: these rows have no kl_bound, no baseline columns.
    assert "| model | temperature | n | reward_mean | kl_mean | win_rate | win_rate_ci_low | win_rate_ci_high |" in text
    assert "| sft | 1.000 | 64 | 0.010 | \u2013 | \u2013 | \u2013 | \u2013 |" in text
    assert "| dpo | 0.700 | 64 | 0.412 | 1.500 | 0.700 | 0.610 | 0.790 |" in text
    # An absolute figure path is written relative to the report; a relative one is kept.
    assert "![Win rate](win_rate.png)" in text
    assert "![Frontier](plots/frontier.png)" in text
    assert "- judge: vader, both orders" in text


def test_importing_report_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, pipeline.evaluation.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
