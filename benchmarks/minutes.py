"""Quality per minute: metrics of `adtr fit --max-minutes M` for several budgets.

    python benchmarks/minutes.py --root ../shared/data/mvtec_ad --categories bottle grid --minutes 1 2 5 10 20 40

Each (category, budget) is one `benchmarks/mvtec.py --single` process, so a row carries
the full fit + test + timing record. ``--max-minutes`` budgets the training epochs (timed
on a few steps first); the wall time of the whole fit, features and calibration
included, is what the table reports. Rows are merged into ``NAME.json`` (``--name``,
default ``minutes``) as they finish and ``NAME.md`` is rewritten each time.

One fit is one draw: ``--seeds 0 1 2`` repeats each budget with those training seeds and the
table adds the spread across them (mean, sample standard deviation, range); ``--merge`` takes
in rows measured before, from other files of this benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import short_commit, write_results  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent


def run(root: Path, category: str, minutes: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        row_json = Path(tmp) / "row.json"
        cmd = [sys.executable, str(HERE / "mvtec.py"), "--root", str(root), "--single", category,
               "--row-json", str(row_json), "--max-minutes", str(minutes), "--epochs", "100000", *extra]
        subprocess.run(cmd, check=True)
        row = json.loads(row_json.read_text())
    row["budget_minutes"] = minutes
    return row


#: Training options that every row of this benchmark sets itself (the budget does).
BUDGET_OPTIONS = ("epochs", "max_minutes")


def changed_options(row: dict) -> dict[str, str]:
    """The row's model and training options that differ from today's defaults, budget aside.
    Options a row's config does not name did not exist when it ran: left out, unless the
    config knows what such runs used (``SAVED_BEFORE_THE_FIELD``, e.g. AdamW). Muon's step size
    is left out of AdamW rows."""
    import dataclasses

    from adtr.config import SAVED_BEFORE_THE_FIELD, ModelConfig, TrainConfig

    def plain(value):
        return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    changed = {}
    for section, today in (("model", ModelConfig()), ("train", TrainConfig())):
        used = row.get("config", {}).get(section, {})
        used = {**SAVED_BEFORE_THE_FIELD.get(section, {}), **used} if used else used
        for name, value in dataclasses.asdict(today).items():
            if name in used and name not in BUDGET_OPTIONS and plain(used[name]) != plain(value):
                changed[name] = plain(used[name])
    if changed.get("optimizer") == "adamw":
        changed.pop("muon_rms", None)  # no Muon in the fit
    return changed


def seed_of(row: dict) -> int:
    """The training seed a row's fit used (0, the default, for rows that do not record it)."""
    return int(row.get("config", {}).get("train", {}).get("seed", 0))


def same_fit_recipe(row: dict) -> tuple:
    """What must match for two rows to be draws of one recipe: machine, model and every
    training option but the seed and the budget."""
    options = {k: v for k, v in changed_options(row).items() if k != "seed"}
    return (row.get("machine"), json.dumps(row.get("config", {}).get("model"), sort_keys=True),
            json.dumps(options, sort_keys=True))


def run_options(row: dict) -> str:
    """``changed_options`` as a table cell (``defaults`` when none differ)."""
    return ", ".join(f"{k}={v}" for k, v in changed_options(row).items()) or "defaults"


#: The quality metrics of a row, in table order.
METRICS = ("image_auroc", "pixel_auroc", "aupro")


#: Header of the target-1 table, which appears only when some 10- and 40-minute fits pair up.
CHECK_HEADER = "| category | 10 min (image / pixel / AUPRO) | 40 min | largest shortfall (points) | within 0.3 |"


def target_check_row(name: str, ten: dict, forty: dict, digits: int) -> str:
    """Issue 4's target 1 as a table row: the 10-minute metrics within 0.3 points of the 40-minute ones."""
    short = max(100 * (forty[k] - ten[k]) for k in METRICS)
    fmt = lambda m: " / ".join(f"{m[k]:.{digits}f}" for k in METRICS)  # noqa: E731
    return f"| {name} | {fmt(ten)} | {fmt(forty)} | {short:.2f} | {'yes' if short <= 0.3 else 'no'} |"


def markdown(rows: list[dict]) -> str:
    lines = ["| category | budget (min) | epochs | selected epoch | fit wall (s) | threads | image AUROC | pixel AUROC "
             "| AUPRO | commit | options (vs today's defaults) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["category"], r["budget_minutes"], seed_of(r))):
        selected = r.get("selected_epoch", "")  # absent in rows recorded before it was added
        lines.append(f"| {r['category']} | {r['budget_minutes']:g} | {r['epochs']} | {selected} | {r['fit_seconds']:.0f} | "
                     f"{r['threads']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
                     f"{short_commit(r['commit'])} | {run_options(r)} |")
    # Target (issue 4): a 10-minute fit within 0.3 points of what 4x the budget reaches.
    check = []
    for cat, seed in sorted({(r["category"], seed_of(r)) for r in rows}):
        by = {r["budget_minutes"]: r for r in rows if (r["category"], seed_of(r)) == (cat, seed)}
        # Only fits of the same model on the same machine compare (a default changed between
        # them otherwise, or the 10 minutes bought another number of epochs).
        if 10 in by and 40 in by and same_fit_recipe(by[10]) == same_fit_recipe(by[40]):
            check.append(target_check_row(cat if seed == 0 else f"{cat} (seed {seed})", by[10], by[40], 3))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["category"], r["budget_minutes"], same_fit_recipe(r)), []).append(r)
    # With several seeds at both budgets the means decide: one fit's luck moves more than the budget does.
    for (cat, budget, recipe), short_fits in sorted(groups.items(), key=lambda g: g[0][:2]):
        long_fits = groups.get((cat, 40, recipe), [])
        if budget != 10 or min(len({seed_of(r) for r in fits}) for fits in (short_fits, long_fits)) < 2:
            continue
        means = [{k: statistics.mean(r[k] for r in fits) for k in METRICS} for fits in (short_fits, long_fits)]
        check.append(target_check_row(f"{cat}, mean of {len(short_fits)} and {len(long_fits)} seeds", *means, 4))
    # Fit-to-fit spread: the same recipe and budget with several seeds.
    spread = []
    for (cat, budget, _), draws in sorted(groups.items(), key=lambda g: g[0][:2]):
        if len({seed_of(r) for r in draws}) < 2:
            continue
        cells = []
        for k in METRICS:
            values = [r[k] for r in draws]
            cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} "
                         f"({min(values):.3f}-{max(values):.3f})")
        seeds = ", ".join(str(s) for s in sorted(seed_of(r) for r in draws))
        spread.append(f"| {cat} | {budget:g} | {seeds} | " + " | ".join(cells) + " |")
    if spread:
        spread = ["Spread across seeds (mean ± sample standard deviation, range):", "",
                  "| category | budget (min) | seeds | image AUROC | pixel AUROC | AUPRO |",
                  "|---|---|---|---|---|---|", *spread]
    machines = sorted({r.get("machine", "not recorded") for r in rows})
    return ("# Quality per minute of training budget\n\n`adtr fit --max-minutes M` (the budget covers feature "
            "caching, training and calibration), metrics on the test split; the last column names the "
            "model and training options that differ from the defaults of the code that renders this table. "
            f"Machine: {'; '.join(machines)}.\n\n"
            + "\n".join(lines) + "\n"
            + ("\n" + "\n".join([CHECK_HEADER, "|---|---|---|---|---|", *check]) + "\n" if check else "")
            + ("\n" + "\n".join(spread) + "\n" if spread else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="MVTec AD root folder (needed unless --render)")
    parser.add_argument("--categories", nargs="+", default=["bottle", "grid"])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 5, 10, 20, 40])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="minutes", help="output file stem (default minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", help="fit each budget once per training seed")
    parser.add_argument("--merge", type=Path, nargs="+", default=[],
                        help="rows of earlier runs (this benchmark's JSON files) to take in, for --categories and --minutes")
    parser.add_argument("--render", action="store_true", help="only rewrite NAME.md from NAME.json")
    args, extra = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{args.name}.json", args.out / f"{args.name}.md"
    rows = json.loads(json_path.read_text()) if json_path.exists() else []

    def key(r: dict) -> tuple:
        return r["category"], r["budget_minutes"], seed_of(r)

    def add(new: list[dict]) -> list[dict]:
        keep = {key(r) for r in new}
        return [r for r in rows if key(r) not in keep] + new

    def save(rows: list[dict]) -> None:
        """Hours of fits live in these files: a crash mid-write must leave the old ones whole."""
        write_results(args.out, args.name, rows, markdown(rows), echo=False)

    for path in args.merge:
        rows = add([r for r in json.loads(path.read_text())
                    if r["category"] in args.categories and r["budget_minutes"] in args.minutes])
    if args.render or args.merge:
        save(rows)
    if args.render or (args.merge and args.root is None):
        print(md_path.read_text())
        return
    if args.root is None:
        parser.error("--root is required")
    seeds = [["--seed", str(s)] for s in args.seeds] if args.seeds else [[]]
    for category in args.categories:
        for minutes in args.minutes:
            for seed in seeds:
                print(f"== {category}, {minutes:g} min {' '.join(seed)}", flush=True)
                rows = add([run(args.root, category, minutes, [*extra, *seed])])
                save(rows)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
