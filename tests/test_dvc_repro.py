"""Your own data through the real `dvc repro`: a folder of captioned images the test draws, tiny
local hf: models, every stage run, VQA "not applicable", the rest measured; the Prefect flow on other
data runs every stage and writes what `dvc repro` wrote, and on the repo's own data reuses what
`dvc repro` made; two `vlap run`s, and the flow with `vlap run`, started together, run each stage once
and end where one run alone would; then `vlap ablate` queues experiments whose metrics `dvc exp show`
lists beside the baseline's. webdataset shards go through `dvc repro` as far as the features (what is
source-specific: reading the tars); everything after the features is the folder repo's."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.config import METHODS
from pipeline.io import sha256_bytes
from pipeline.locks import LOCK_DIR
from pipeline.manifest import read_manifest
from pipeline.paths import Dirs
from dvc_repo import REPO, make_project, sh
from stages import graph
from stages.common import RUN_JOURNAL, RunJournal
from own_data import shrink_cost, write_folder_dataset, write_webdataset
from tiny_models import save_tiny_clip_vision, save_tiny_opt

pytestmark = pytest.mark.slow  # real dvc repro, dvc exp and Prefect flows in subprocesses

# Stages DVC runs every time (`always_changed`: the sources stage digests the source data).
ALWAYS_RUN = {n.spec.label(m) for n in graph.graph() if n.spec.always_changed for m in n.instances()}


def stale_stages(work: Path, env: dict) -> set[str]:
    """The stages `dvc status` lists as changed."""
    return set(json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env) or "{}"))


def metric_files(tree) -> dict[str, dict]:
    """Every {"data/metrics/...json": {"data": {...}}} found anywhere in `dvc exp show --json` output."""
    found = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "metrics" and isinstance(value, dict):
                found |= {path: entry.get("data", {}) for path, entry in value.items() if isinstance(entry, dict)}
            else:
                found |= metric_files(value)
    elif isinstance(tree, list):
        for item in tree:
            found |= metric_files(item)
    return found


def experiments(shown: list) -> list[dict]:
    """The experiment entries (not the baseline) of `dvc exp show --json`."""
    return [rev for entry in shown for exp in (entry.get("experiments") or []) for rev in exp.get("revs", [])]


def make_repo(root: Path, tokenizer, source: str, *targets: str) -> tuple[Path, dict, str, int]:
    """A git + DVC repo holding the project's code and dvc.yaml, and the committed params.yaml with only the
    prepare keys the README names for the source changed (to data the test wrote) and the cost shrunk (tiny
    local models), after `dvc repro [targets]`; returns (repo, env, `dvc repro` output, number of images)."""
    if source == "folder":
        n_images = write_folder_dataset(root / "photos")
        prepare = {"source": "folder", "folder": str(root / "photos")}
    else:
        n_images = write_webdataset(root / "shards")
        prepare = {"source": "webdataset", "folder": str(root / "shards"), "shards": "{00000..00002}.tar"}
    clip, opt = save_tiny_clip_vision(root / "models" / "clip"), save_tiny_opt(root / "models" / "opt", tokenizer)
    work = root / "repo"
    params = shrink_cost(yaml.safe_load((REPO / "params.yaml").read_text()), clip, opt)
    params["prepare"] |= prepare
    env = make_project(work, params)
    out = sh([sys.executable, "-m", "dvc", "repro", *targets], work, env, timeout=900)
    return work, env, out, n_images


def check_every_task(work: Path, n_images: int, out: str) -> dict:
    """Every stage ran, the images are all there, VQA is n/a and the other tasks have numbers."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    expected = {n.spec.label(m) for n in graph.graph() for m in n.instances()}
    assert set(lock) == expected, out[-2000:]
    report = json.loads((work / "data" / "prepared" / "report.json").read_text())
    assert sum(report["splits"][s]["images"] for s in ("train", "val", "test")) == n_images
    # the committed zero-shot split is easy-VQA's: skipped with its reason, never a stop
    assert report["zero_shot"]["applicable"] is False and "colour and shape labels" in report["zero_shot"]["reason"]
    metrics = {t: json.loads((work / "data" / "metrics" / t / "vlap.json").read_text())
               for t in ("caption", "vqa", "retrieval", "arithmetic", "taxonomy")}
    # a folder has no label classes: the gap is measured, the RSA is n/a with its reason
    assert metrics["taxonomy"]["applicable"] and metrics["taxonomy"]["rsa_applicable"] is False
    assert metrics["vqa"]["applicable"] is False and "no test questions" in metrics["vqa"]["reason"]
    assert metrics["caption"]["applicable"] is True and metrics["caption"]["images"] == report["test"]["images"]
    assert 0.0 <= metrics["caption"]["CIDEr"] and 0.0 <= metrics["caption"]["BLEU-1"] <= 1.0
    assert metrics["retrieval"]["applicable"] is True
    assert metrics["retrieval"]["images"] == report["test"]["images"]
    assert metrics["arithmetic"]["applicable"] is True and metrics["arithmetic"]["word_swap_queries"] > 0
    summary = (work / "data" / "metrics" / "summary.md").read_text()
    vqa_row = next(line for line in summary.splitlines() if line.startswith("| vqa |"))
    assert vqa_row.startswith("| vqa | n/a | n/a | n/a |")
    assert "| caption/CIDEr |" in summary and "| retrieval/cosine_i2t_R@1 |" in summary
    assert "* zero-shot split: n/a, the training images carry no colour and shape labels" in summary
    assert "_unseen" not in summary
    return metrics


@pytest.fixture(scope="module")
def repo(tmp_path_factory, smollm2):
    return make_repo(tmp_path_factory.mktemp("own-data"), smollm2.tokenizer, "folder")


def test_every_stage_runs_on_a_folder_of_photos(repo):
    work, env, out, n_images = repo
    metrics = check_every_task(work, n_images, out)
    assert metrics["caption"]["images"] == 9  # 1 in 4 pictures is in the test split
    assert stale_stages(work, env) == ALWAYS_RUN


def test_an_edit_to_the_schema_or_a_registry_leaves_every_stage_up_to_date_and_a_new_method_adds_its_own(repo):
    """The params schema (pipeline/config.py, pipeline/schema.py) and the registries' name lists are in no
    stage's code deps: a new source name and a new optional section re-run nothing (params.yaml, which DVC
    tracks, holds every value a stage reads). A new method (docs/extending.md's example, dvc.yaml regenerated)
    adds its own stages and leaves every existing one up to date."""
    work, env, _, _ = repo
    edits = {work / "pipeline" / "config.py": lambda text: text + "\n\n@section\nclass NewTaskConfig:\n    size: PositiveInt = 3\n",
             work / "pipeline" / "schema.py": lambda text: text + "\nPercent = Annotated[Number, Field(ge=0, le=100)]\n",
             work / "pipeline" / "sources" / "__init__.py": lambda text: text.replace(
                 '    Source("vqav2", test_source=True),\n', '    Source("vqav2", test_source=True),\n    Source("laion"),\n')}
    before = {path: path.read_text() for path in edits}
    try:
        for path, edit in edits.items():
            path.write_text(edit(before[path]))
            assert path.read_text() != before[path]
        assert stale_stages(work, env) == ALWAYS_RUN
    finally:
        for path, text in before.items():
            path.write_text(text)

    from test_extending import BLOCK, DOC
    blocks = {target: text for kind, target, text in BLOCK.findall(DOC.read_text()) if "methods" in target}
    registry, params = work / "pipeline" / "methods" / "__init__.py", work / "params.yaml"
    saved = {p: p.read_text() for p in (registry, params, work / "dvc.yaml")}
    new = work / "pipeline" / "methods" / "vlap_ap_only.py"
    try:
        new.write_text(blocks["pipeline/methods/vlap_ap_only.py"])
        registry.write_text("\n".join(blocks["pipeline/methods/__init__.py"].rstrip("\n") if line.startswith("NAMES =")
                                       else line for line in saved[registry].splitlines()) + "\n")
        lines = saved[params].splitlines()
        at = lines.index("methods:") + 1
        params.write_text("\n".join(lines[:at] + blocks["methods"].rstrip("\n").splitlines() + lines[at:]) + "\n")
        sh([sys.executable, "-m", "stages.graph"], work, env)
        stale = stale_stages(work, env) - ALWAYS_RUN
        assert "train@vlap_ap_only" in stale and "evaluate_caption@vlap_ap_only" in stale
        # summarize follows once the new method's metrics are written into the folders it reads
        assert {label for label in stale if not label.endswith("@vlap_ap_only")} == set()
    finally:
        new.unlink(missing_ok=True)
        for path, text in saved.items():
            path.write_text(text)


def every_output(dirs: Dirs) -> dict[str, str]:
    """sha256 of every file in every stage output under `dirs`, by path."""
    found = {}
    for node in graph.graph():
        for method in node.instances():
            for out in node.spec.out_paths(dirs, method):
                for f in [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file()):
                    found[f.relative_to(dirs.root).as_posix()] = sha256_bytes(f.read_bytes())
    return found


def test_prefect_flow_runs_every_stage_on_other_data_as_dvc_does(repo, tmp_path):
    """The flow on another data folder (so dvc.lock vouches for nothing there) runs every stage itself
    and writes the same outputs, byte for byte, as `dvc repro` did: the whole graph reproduces."""
    work, env, _, _ = repo
    flow_data = tmp_path / "flow-data"  # outside the repo: nothing of it is committed by later tests
    run = subprocess.run([sys.executable, "-m", "vlap.flow", "--data", str(flow_data)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "ERROR" not in log and "up to date in dvc.lock" not in log
    labels = {n.spec.label(m) for n in graph.graph() for m in n.instances()}
    assert log.count("Finished in state Completed") >= len(labels)
    # Two independent runs of the whole graph: every output the same, byte for byte
    flow_outputs, dvc_outputs = every_output(Dirs.under(flow_data)), every_output(Dirs.under(work / "data"))
    assert flow_outputs.keys() == dvc_outputs.keys()
    assert [f for f in flow_outputs if flow_outputs[f] != dvc_outputs[f]] == []
    assert any(f.startswith("models/vlap/") for f in flow_outputs) and "metrics/summary.md" in flow_outputs


def test_webdataset_shards_through_dvc_repro_to_the_features(tmp_path, smollm2):
    work, env, out, n_images = make_repo(tmp_path, smollm2.tokenizer, "webdataset", "extract")
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"sources", "prepare", "extract"}, out[-2000:]
    report = json.loads((work / "data" / "prepared" / "report.json").read_text())
    assert sum(report["splits"][s]["images"] for s in ("train", "val", "test")) == n_images
    manifest = read_manifest(work / "data" / "prepared", "train")
    assert manifest.image_root == "params:prepare.folder"
    assert {r.image_path.split("/")[0] for r in manifest.images} == {"00000.tar", "00001.tar", "00002.tar"}
    assert not list((tmp_path / "shards").glob("*.jpg"))  # read from inside the tars
    index = json.loads((work / "data" / "features" / "index.json").read_text())
    # the stages run are up to date; everything downstream of extract is not run yet, so stale
    assert index and stale_stages(work, env) & {"sources", "prepare", "extract"} == ALWAYS_RUN


def test_prefect_flow_after_dvc_repro_reuses_every_output(repo):
    """On the repo's own data and params, the flow runs nothing dvc.lock calls up to date and prints no ERROR
    line (telemetry is off). (Prefect's own cache, for a flow run again, is tests/test_flow.py's.)"""
    work, env, _, _ = repo
    labels = {n.spec.label(m) for n in graph.graph() for m in n.instances()}
    before = (work / "dvc.lock").read_text()
    first = subprocess.run([sys.executable, "-m", "vlap.flow"], cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-3000:]
    assert {label for label in labels if f"{label}: up to date in dvc.lock, not run" in log} == labels - ALWAYS_RUN
    assert "ERROR" not in log
    assert (work / "dvc.lock").read_text() == before
    assert stale_stages(work, env) == ALWAYS_RUN


def outs_hashes(work: Path) -> dict[str, list]:
    """Every output's hash in dvc.lock, by stage."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    return {stage: sorted((o["path"], o.get("md5")) for o in entry.get("outs", [])) for stage, entry in lock.items()}


# A change to the assignment scorer's fit makes the three retrievals and the summary stale, nothing else.
FIT_CHANGE_STALE = {f"evaluate_retrieval@{m}" for m in METHODS} | {"summarize"}
VLAP_RUN, FLOW = [sys.executable, "-m", "vlap", "run"], [sys.executable, "-m", "vlap.flow"]


def change_the_fit(work: Path) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["retrieval"]["fit_images"] = 5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def back_to_committed(work: Path, env: dict) -> None:
    sh(["git", "checkout", "--", "."], work, env)
    sh([sys.executable, "-m", "dvc", "checkout", "-f"], work, env)


def runs_since(journal: RunJournal, start: int) -> Counter:
    """How many times each stage ran since the journal's `start`-th line (the always-run sources left out)."""
    return Counter(e["stage"] for e in journal.entries()[start:] if e["stage"] not in ALWAYS_RUN)


def test_runs_started_together_run_each_stage_once_and_write_what_one_run_writes(repo):
    """`vlap run` twice, and the flow with `vlap run`, each pair started at the same moment on the repo's
    data after a change that makes four stages stale: both of a pair finish, the later says which run it
    waits for, each stale stage ran once (counted from the stages' own run journal, with the pid that ran
    it): what a pair writes is what one run alone writes. Only the stale stages' outputs change, and the
    two pairs end with every output and dvc.lock the same, byte for byte."""
    work, env, _, _ = repo
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "before the runs at once", "--allow-empty"], work, env)
    before, before_outputs = outs_hashes(work), every_output(Dirs.under(work / "data"))
    journal = RunJournal(work / "data" / LOCK_DIR / RUN_JOURNAL)
    alone = alone_lock = None
    try:
        for pair in ([VLAP_RUN, VLAP_RUN], [FLOW, VLAP_RUN]):
            back_to_committed(work, env)
            change_the_fit(work)
            start = len(journal.entries())
            runs = [subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for cmd in pair]
            logs = [run.communicate(timeout=900)[0] for run in runs]
            assert [run.returncode for run in runs] == [0, 0], "\n".join(log[-3000:] for log in logs)
            waited = [log for log in logs if "waiting for" in log]
            assert len(waited) == 1 and re.search(r"waiting for `(vlap run|python -m vlap\.flow)` \(pid \d+, "
                                                  r"started [\d:]+\), which is running on", waited[0]), logs
            ran = [e for e in journal.entries()[start:] if e["stage"] not in ALWAYS_RUN]
            # each stale stage ran once, by one process: what the pair wrote is what one run alone writes
            assert runs_since(journal, start) == {label: 1 for label in FIT_CHANGE_STALE}, ran
            assert len({e["pid"] == runs[0].pid for e in ran}) == 1  # whoever ran first ran all four
            outputs, lock = every_output(Dirs.under(work / "data")), outs_hashes(work)
            assert stale_stages(work, env) == ALWAYS_RUN
            if alone is None:  # the first pair: two `vlap run`s, the later one only waited
                alone, alone_lock = outputs, lock
                changed = {f for f in outputs if outputs[f] != before_outputs.get(f)}
                assert changed and all(f.startswith(("metrics/retrieval/", "plots/retrieval/", "metrics/summary",
                                                     "plots/summary")) for f in changed), changed
            else:
                assert outputs == alone and lock == alone_lock
    finally:  # back to the committed state for the tests that follow
        back_to_committed(work, env)
    assert outs_hashes(work) == before and stale_stages(work, env) == ALWAYS_RUN


def test_features_move_through_a_dvc_remote_and_a_fresh_clone_extracts_nothing(repo, tmp_path):
    """The README's remote recipe on a local-folder remote: `dvc push`, a fresh `git clone`, `dvc pull`, then
    `dvc repro` runs no stage but the always-run sources (nothing is extracted or trained again) and every
    output equals the original's. Then a machine that only evaluates pulls one feature key (the test
    split's file, named in data/features/index.json) and what the evaluation reads, and `dvc repro -s`
    runs that evaluation alone: extract never runs, and the metrics equal the original's byte for byte."""
    work, env, _, _ = repo
    remote = tmp_path / "remote"
    dvc = [sys.executable, "-m", "dvc"]
    sh(dvc + ["remote", "add", "-d", "store", str(remote)], work, env)
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "a remote for the cache", "--allow-empty"], work, env)
    sh(dvc + ["push"], work, env)
    original = every_output(Dirs.under(work / "data"))

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    sh(dvc + ["pull"], clone, env)
    out = sh(dvc + ["repro"], clone, env)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == ALWAYS_RUN, out[-3000:]
    assert every_output(Dirs.under(clone / "data")) == original
    assert not (clone / "data" / ".locks" / RUN_JOURNAL).exists() or runs_since(
        RunJournal(clone / "data" / ".locks" / RUN_JOURNAL), 0) == Counter()

    evaluator = tmp_path / "evaluator"
    sh(["git", "clone", "-q", str(work), str(evaluator)], tmp_path, env)
    index = json.loads((work / "data" / "features" / "index.json").read_text())
    needed = [f"data/features/{index['test']['file']}", "data/features/index.json", "data/prepared",
              "data/prototypes", "train@vlap"]
    sh(dvc + ["pull", *needed], evaluator, env)
    assert sorted(p.name for p in (evaluator / "data" / "features").iterdir()) == sorted(
        ["index.json", index["test"]["file"]])  # the other splits' features stayed on the remote
    out = sh(dvc + ["repro", "-s", "evaluate_caption@vlap"], evaluator, env)
    assert re.findall(r"Running stage '([^']+)'", out) == ["evaluate_caption@vlap"], out[-3000:]
    assert ((evaluator / "data" / "metrics" / "caption" / "vlap.json").read_bytes()
            == (work / "data" / "metrics" / "caption" / "vlap.json").read_bytes())


def test_ablation_queues_dvc_experiments_and_tabulates_them(repo):
    """`vlap ablate` on one factor upstream of training (the prior: prototypes are rebuilt, then VLAP's
    stages re-run): two queued experiments run by DVC's queue; `dvc exp show` lists their metrics beside
    the baseline's; the table's cells are the metrics in each experiment's commit; a re-run queues nothing."""
    work, env, _, _ = repo
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "before the ablation", "--allow-empty"], work, env)
    args = [sys.executable, "-m", "vlap.cli", "ablate", "--factor", "prototypes.prior=uniform", "--out", "ablation"]
    sh(args, work, env, timeout=900)
    result = json.loads((work / "ablation" / "ablation.json").read_text())
    rows = {r["experiment"]: r for r in result["experiments"]}
    assert set(rows) == {"abl-unchanged", "abl-prior-uniform"}
    locks = {}
    for name, row in rows.items():
        shown = yaml.safe_load(sh(["git", "show", f"{row['commit']}:params.yaml"], work, env))
        caption = json.loads(sh(["git", "show", f"{row['commit']}:data/metrics/caption/vlap.json"], work, env))
        assert row["metrics"]["caption/CIDEr"] == caption["CIDEr"]
        locks[name] = yaml.safe_load(sh(["git", "show", f"{row['commit']}:dvc.lock"], work, env))["stages"]
        assert locks[name]["prototypes"]["params"]["params.yaml"]["prototypes"]["prior"] == (
            shown["prototypes"]["prior"])
    assert rows["abl-prior-uniform"]["resolved"] == "uniform"
    assert locks["abl-prior-uniform"]["prototypes"]["params"]["params.yaml"]["prototypes"]["prior"] == "uniform"
    assert (locks["abl-prior-uniform"]["train@vlap"]["deps"] != locks["abl-unchanged"]["train@vlap"]["deps"])  # new mu
    shown = json.loads(sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], work, env))
    baseline = metric_files([{k: v for k, v in entry.items() if k != "experiments"} for entry in shown])
    in_exp = metric_files(next(rev for rev in experiments(shown) if rev.get("name") == "abl-prior-uniform"))
    key = "data/metrics/train/vlap/metrics.json"
    assert baseline[key]["train"]["loss"] != in_exp[key]["train"]["loss"]  # vlap retrained against the new prior
    assert in_exp["data/metrics/caption/vlap.json"]["applicable"] is True
    assert in_exp["data/metrics/train/limber/metrics.json"] == baseline["data/metrics/train/limber/metrics.json"]
    report = (work / "ablation" / "report.md").read_text()
    assert "| metric | unchanged | prior=uniform |" in report and "| caption/CIDEr |" in report
    assert (work / "ablation" / "caption_CIDEr.png").stat().st_size > 0
    again = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "queued abl-" not in again.stderr, again.stderr[-2000:]
    bad = subprocess.run(args[:4] + ["--factor", "methods.vlap.ap_weigth=1"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "ap_weigth" in bad.stderr, bad.stderr
