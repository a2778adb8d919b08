"""The README's MovieLens table, rendered from a hand-made report.json."""

from tf_limaml.experiments import readme_table


def _model(auc, std, logloss, member, by_k):
    return {
        "overall_auc": auc,
        "overall_auc_std": std,
        "logloss": logloss,
        "mean_member_auc": member,
        "support_k": {
            k: {"overall_auc": v}
            for k, v in zip(("1", "3", "5", "10"), by_k, strict=True)
        },
    }


REPORT = {
    "models": {
        "limaml": _model(
            0.75751, 0.00134, 0.58244, 0.69633, (0.7287, 0.7397, 0.7351, 0.73444)
        ),
        "global": _model(0.7115, 0.0032, 0.6279, 0.6913, (0.7115,) * 4),
        "unknown_model": _model(0.5, 0.0, 0.7, 0.5, (0.5,) * 4),
    }
}


def test_renders_the_readme_rows_in_order_with_commit_and_machine():
    text = readme_table.render(REPORT, "abc1234", "AMD EPYC 7B13, 2 cores")
    lines = text.splitlines()
    assert lines[0] == (
        "`runs/demo/README_table.md`, written by `make demo` at commit `abc1234` "
        "on AMD EPYC 7B13, 2 cores:"
    )
    assert lines[2] == (
        "| model | overall AUC | log loss | mean member AUC | AUC, k=1 | k=3 | k=5 | k=10 |"
    )
    # Missing models are left out, unknown ones ignored, README order kept.
    assert lines[4:] == [
        "| global | 0.7115 ± 0.0032 | 0.6279 | 0.6913 | 0.7115 | 0.7115 | 0.7115 | 0.7115 |",
        "| **LiMAML** (in-graph) | 0.7575 ± 0.0013 | 0.5824 | 0.6963 | 0.7287 | 0.7397 "
        "| 0.7351 | 0.7344 |",
    ]


def test_write_table_names_the_commit_or_unknown(tmp_path):
    path = readme_table.write_table(REPORT, tmp_path, machine="a CPU, 2 cores")
    assert path == str(tmp_path / "README_table.md")
    first = open(path, encoding="utf-8").read().splitlines()[0]
    commit = readme_table.git_commit()
    assert commit == "unknown" or (len(commit) >= 7 and commit.isalnum())
    assert f"at commit `{commit}` on a CPU, 2 cores:" in first
    assert readme_table.git_commit(str(tmp_path)) == "unknown"  # not a checkout
    assert readme_table.machine_description().endswith(" cores")


def test_the_models_beyond_the_paper_buckets_and_the_run_commit():
    report = {
        **REPORT,
        "models": {
            **REPORT["models"],
            "limaml_sequence": _model(
                0.76, 0.001, 0.58, 0.70, (0.73, 0.744, 0.74, 0.74)
            ),
        },
        "seeds": 3,
        "run": {"commit": "d00d123", "wall_s_before_report": 812.4, "seeds": 3},
    }
    report["models"]["global"]["buckets"] = {
        "member_history": {
            "10-15": {
                "overall_auc": 0.65,
                "overall_auc_std": 0.01,
                "rows": 9,
                "members": 3,
            }
        }
    }
    text = readme_table.render(report, "abc1234", "a CPU, 2 cores")
    assert "| LiMAML, sequence meta block | 0.7600 ± 0.0010 |" in text
    assert "3 seeds, mean ± std; 812 s wall before the report" in text
    assert "| global | 0.6500 ± 0.0100 |" in text and "| 3 / 9 |" in text
    # The file names the commit the numbers came from, recorded by the demo.
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        path = readme_table.write_table(report, out, machine="a CPU")
        assert "at commit `d00d123`" in open(path, encoding="utf-8").read()
