"""universality.engine.report: valid PNGs of the right size, an index that covers every group and irrep, key-irrep tables
equal to the counts recomputed from summary.json, reproducible output."""

import hashlib
import json
import os
import re
import shutil
import struct

import matplotlib.image
import numpy as np
import pytest

from universality.engine import report
from universality.engine import rundir
from universality.engine.families.group import report as group_report
from universality.engine.families.group.passes import records as records_lib
from tests.test_replay import small_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def study(tmp_path_factory):
  return small_study(tmp_path_factory)


def _summary(study):
  with open(os.path.join(study, "analysis", "summary.json")) as f:
    return json.load(f)


def _index(study):
  with open(os.path.join(study, "report", "index.md")) as f:
    return f.read()


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
  assert head[12:16] == b"IHDR"
  return struct.unpack(">II", head[16:24])


def test_report_images_are_valid_pngs_of_the_right_size(study):
  out = os.path.join(study, "report")
  images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _index(study))
  pngs = sorted(n for n in os.listdir(out) if n.endswith(".png"))
  assert sorted(images) == pngs  # every image is linked, every link exists
  expected = {"learning_curves.png"}
  # No run of this short study generalises: no key-irrep or learning-order figures.
  assert not any(r["generalised"] for r in _summary(study)["runs"])
  for ci, spec in enumerate(("C7", "S3")):
    expected |= {f"c{ci}_{spec}_lr0.01_wd1_frac0.6_{kind}.png" for kind in
                 ("similarity", "correlation", "cka")}
  assert expected <= set(pngs)
  assert not [n for n in pngs if "key_irreps" in n or "learning_order" in n]
  for name in pngs:
    path = os.path.join(out, name)
    width, height = _png_size(path)
    assert os.path.getsize(path) > 5000, name
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width) and 150 <= width <= 3000 and 150 <= height <= 3000, name
    assert pixels[..., :3].std() > 0.05, f"{name} is blank"
  # Sizes follow the figure layout: one 4.6 x 3.4 inch panel per group at 100 dpi.
  assert _png_size(os.path.join(out, "learning_curves.png")) == (920, 340)
  assert _png_size(os.path.join(out, "c0_C7_lr0.01_wd1_frac0.6_correlation.png")) == (900, 320)


def test_index_mentions_study_groups_and_irreps(study):
  text, summary = _index(study), _summary(study)
  assert "C7 (order 7" in text and "S3 (order 6" in text
  assert "200 steps" in text and "lr 0.01" in text and "weight decay 1" in text and "0.6 of the" in text
  for cohort, entry in summary["cohorts"].items():
    assert f"## {cohort} (order {entry['task']['order']})" in text
    for irrep in entry["task"]["irreps"]:
      assert f"{irrep['name']} (dim {irrep['dim']}" in text


def _tables_by_group(text):
  """{cohort: [rows of its key-irrep table as lists of cells]}."""
  out = {}
  for section in re.split(r"^## ", text, flags=re.M)[1:]:
    spec = section.split()[0]
    lines = section.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("| irrep | dim |")), None)
    if start is None:
      continue
    rows = []
    for line in lines[start + 2:]:
      if not line.startswith("|"):
        break
      rows.append([c.strip() for c in line.strip("|").split("|")])
    out[spec] = rows
  return out


def test_key_irrep_tables_equal_counts_recomputed_from_summary(study, tmp_path):
  # No run of the study generalises: every run is listed apart and no cohort has a key-irrep table.
  assert not _tables_by_group(_index(study))
  assert _index(study).count("did not generalise (left out") == 2
  # Mark seeds 0 and 2 of each cohort as generalised in a copy: the tables count those runs only.
  copy = tmp_path / os.path.basename(study)
  shutil.copytree(study, copy, ignore=shutil.ignore_patterns(".lock"))
  summary = _summary(study)
  for r in summary["runs"]:
    r["generalised"] = r["seed"] != 1
  (copy / "analysis" / "summary.json").write_text(json.dumps(summary))
  report.write_report(str(copy))
  text = (copy / "report" / "index.md").read_text()
  tables = _tables_by_group(text)
  assert set(tables) == set(summary["cohorts"])
  for spec, entry in summary["cohorts"].items():
    records = [summary["runs"][i] for i in entry["runs"] if summary["runs"][i]["generalised"]]
    assert len(records) == 2
    assert [row[0] for row in tables[spec]] == [r["name"] for r in entry["task"]["irreps"]]
    for row in tables[spec]:
      name = row[0]
      key = sum(name in r["key_irreps"] for r in records)
      first = sum(r["first_learned"] == name for r in records)
      sim = np.mean([r["logit_similarity"][name] for r in records])
      neurons = sum(r["neurons"]["dominant_counts"][name] for r in records)
      assert (int(row[3]), int(row[4]), int(row[6])) == (key, first, neurons), (spec, row)
      assert float(row[5]) == pytest.approx(sim, abs=5e-4)
    assert sum(int(row[4]) for row in tables[spec]) == sum(r["first_learned"] is not None for r in records)
  assert text.count("did not generalise (left out") == 2 and "of 2 runs" in text


def _digest(directory):
  return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
          for n in sorted(os.listdir(directory))}


def test_report_is_reproducible_and_replaces_stale_files(study, tmp_path):
  # A copy of the run directory, so that the shared one is never touched while other tests read it.
  copy = tmp_path / os.path.basename(study)  # the same name: the index names its directory
  shutil.copytree(study, copy, ignore=shutil.ignore_patterns(".lock"))
  before = _digest(copy / "report")
  (copy / "report" / "old.png").write_bytes(b"stale")
  path = report.write_report(str(copy))
  assert path == str(copy / "report" / "index.md")
  after = _digest(copy / "report")
  assert "old.png" not in after
  # Identical bytes, except that index.md names its own run directory.
  assert {k: v for k, v in after.items() if k != "index.md"} == \
      {k: v for k, v in before.items() if k != "index.md"}
  assert (copy / "report" / "index.md").read_text().replace(str(copy), "DIR") == \
      _index(study).replace(str(study), "DIR")


def test_write_report_needs_the_analysis(study, tmp_path):
  for name in ("config.json", "runs.json", "metrics.jsonl"):
    shutil.copy(os.path.join(study, name), tmp_path / name)
  with pytest.raises(FileNotFoundError, match="summary.json"):
    report.write_report(str(tmp_path))
  assert not (tmp_path / "report").exists()


def test_markdown_helpers_on_fresh_records():
  rng = np.random.default_rng(3)
  names = ["trivial", "sign", "standard"]
  group = {"irreps": [{"name": n, "dim": d, "frobenius_schur": 1} for n, d in zip(names, (1, 1, 2))]}
  records = []
  for _ in range(7):
    key = [n for n in names[1:] if rng.random() < 0.6]
    records.append({"key_irreps": key, "first_learned": key[0] if key else None,
                    "logit_similarity": {n: float(rng.normal()) for n in names},
                    "neurons": {"dominant_counts": {n: int(rng.integers(0, 5)) for n in names}}})
  group = records_lib.Task.from_json(group)
  records = [records_lib.SummaryRun.of(r) for r in records]
  rows = group_report.key_irrep_rows(group, records)
  for row in rows:
    assert row["key"] == sum(row["irrep"] in r.key_irreps for r in records)
    assert row["first"] == sum(r.first_learned == row["irrep"] for r in records)
  md = group_report.key_irrep_table(group, records)
  assert md.count("\n") == 2 + len(names) and "of 7 runs" in md
  sets = group_report.key_irrep_sets_table(records)
  assert sum(int(line.rsplit("|", 2)[1]) for line in sets.splitlines()[2:]) == 7


def test_summary_records_round_trip_through_json(study):
  # Every key the analysis wrote is a field of its record type, and reading then writing gives it back.
  summary = _summary(study)
  driver_keys = {"index", "final", "cohort"} | set(rundir.read_runs(study)[0])
  for entry in summary["cohorts"].values():
    task = records_lib.Task.from_json(entry["task"])
    aggregate = records_lib.Aggregate.from_json(entry["aggregate"])
    assert task.to_json() == entry["task"] and aggregate.to_json() == entry["aggregate"]
    assert aggregate.correlation is not None and aggregate.connectivity is not None  # S = 3 MLPs
    for i in entry["runs"]:
      row = summary["runs"][i]
      run = records_lib.RunRecord.from_json(row)
      fields = {k: v for k, v in run.to_json().items() if k != "run"}
      assert fields == {k: v for k, v in row.items() if k not in driver_keys}
      assert records_lib.RunRecord.from_json(json.loads(json.dumps(run.to_json()))) == run
    whole = records_lib.Cohort(task=task, aggregate=aggregate,
                               runs=[records_lib.RunRecord.from_json(summary["runs"][i]) for i in entry["runs"]])
    assert records_lib.Cohort.from_json(json.loads(json.dumps(whole.to_json()))) == whole


def test_an_older_summary_without_later_fields_still_reads_and_reports(study, tmp_path):
  # Fields added after a summary was written read as None; the report renders every section it can.
  copy = tmp_path / os.path.basename(study)
  shutil.copytree(study, copy, ignore=shutil.ignore_patterns(".lock"))
  summary = _summary(study)
  for r in summary["runs"]:
    for k in ("generalised", "margins", "redundancy", "cosets"):
      r.pop(k)
  (copy / "analysis" / "summary.json").write_text(json.dumps(summary))
  run = records_lib.SummaryRun.of(summary["runs"][0])
  assert run.generalised is None and run.done and run.margins is None and run.cosets is None
  report.write_report(str(copy))
  text = (copy / "report" / "index.md").read_text()
  for section in ("## Learning curves", "### Key irreps", "### Learning order", "### Neurons across seeds",
                  "### Margins", "### Redundancy", "### Mode connectivity", "<summary>Runs</summary>"):
    assert section in text, section
  # Every section of the freshly written report is there too.
  fresh = _index(study)
  for section in ("### Key irreps", "### Neurons across seeds", "### Cosets", "### Margins", "### Redundancy",
                  "### Mode connectivity", "<summary>Runs</summary>"):
    assert fresh.count(section) == len(summary["cohorts"]), section
