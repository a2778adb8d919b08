"""A messy table, first try, to a served model: make-tasks -> tune -> train
--recipe -> export -> embed -> serving_default, all from the command line.

The table has every kind of mess of `test_messy_data.py` (unicode, quoted
commas, ISO times with and without a zone, yes/no labels, blank numerics and
categoricals, "N/A" and "$12.99" prices, empty ids, exact duplicates) on
enough users for the splits and tune's fold. Every row is accounted for in
stats.json, and the scores served from the export equal the evaluated ones.
"""

from __future__ import annotations

import datetime
import json
import os

import test_messy_data as messy
import test_ship as shipping

from tf_limaml.config import AdaptOptions, MetaConfig

USERS = 150
ROWS_PER_USER = 12


def messy_table() -> tuple[list[dict], dict]:
    """USERS x ROWS_PER_USER rows with the mess of `messy.messy_rows`; a click
    depends on the item and on the user's parity (something to personalize)."""
    rows, bad = [], {"missing_entity": 0, "bad_numeric": 0}
    for u in range(USERS):
        user = f"üser-{u}" if u % 4 else f"user, {u}"
        age = "" if u % 6 == 0 else str(20 + u % 40)
        country = "" if u % 7 == 0 else ("Côte d'Ivoire" if u % 2 else "US")
        for k in range(ROWS_PER_USER):
            when = datetime.datetime(2024, 3, 1, 12) + datetime.timedelta(hours=u + k)
            row = {
                "user": user,
                "ts": when.isoformat() + ("Z" if k % 2 else ""),
                "clicked": "yes" if (k + u % 2) % 3 == 0 else "no",
                "item": f"item {k % 6}, size M",
                "price": "" if (u + k) % 11 == 0 else f"{1.5 + k % 6}",
                "age": age,
                "country": country,
            }
            if (u, k) == (3, 2):
                row["price"] = "N/A"
                bad["bad_numeric"] += 1
            elif (u, k) == (4, 5):
                row["price"] = "$12.99"
                bad["bad_numeric"] += 1
            elif (u, k) == (5, 1):
                row["user"] = ""
                bad["missing_entity"] += 1
            rows.append(row)
    rows += [dict(rows[10]), dict(rows[40])]  # exact duplicates
    return rows, bad


def test_a_messy_table_goes_from_make_tasks_to_served_scores(tmp_path, capsys):
    rows, bad = messy_table()
    table = tmp_path / "clicks.csv"
    messy.write_csv(table, rows)
    code, out = messy.make_tasks(tmp_path, table)
    assert code == 0
    stats = messy.read_json(os.path.join(out, "stats.json"))
    messy.check_conservation(stats)
    assert stats["rows_read"] == len(rows)
    assert stats["duplicate_rows"] == 2
    assert sum(stats["imputed_by_feature"].values()) > 0
    rejected = stats["rejected_by_reason"]
    assert rejected.get("bad_numeric") == bad["bad_numeric"], rejected
    assert rejected.get("missing_entity") == bad["missing_entity"], rejected
    assert messy.no_beam_temp(out)

    tune_dir = tmp_path / "tune"
    start = tmp_path / "start.json"  # tune searches around a small recipe
    start.write_text(json.dumps(shipping.SMALL.to_dict()))
    shipping._main(
        capsys,
        *("tune", "--tasks", out, "--output", tune_dir),
        *("--budget", "1", "--recipe", start),
    )
    config_path = tune_dir / "tune_config.json"
    tuned = json.loads(config_path.read_text())
    model_dir = tmp_path / "model"
    shipping._main(
        capsys,
        *("train", "--recipe", config_path, "--tasks", out),
        *("--model-dir", model_dir),
    )
    saved = json.loads((model_dir / "config.json").read_text())
    options = AdaptOptions.from_dict(saved["adapt_options"])
    assert options.resolve(MetaConfig.from_dict(saved["meta_config"])) == (
        MetaConfig.from_dict(tuned["meta_config"])
    )
    scores, batch = shipping._served_scores(capsys, tmp_path, str(model_dir), out)
    metrics = json.loads(
        shipping._main(
            capsys,
            *("evaluate", "--tasks", os.path.join(out, "test-*.tfrecord.gz")),
            *("--model-dir", model_dir),
            *("--max-support", shipping._longest_support(batch)),
        )
    )
    assert metrics["adapted"]["n_rows"] == int(batch["query_mask"].sum())
    served = shipping._auc(batch, scores)
    assert abs(served - metrics["adapted"]["auc"]) <= shipping.AUC_TOLERANCE, (
        tuned["chosen_name"],
        served,
        metrics["adapted"]["auc"],
    )
