"""Readers: MSMT17 (both releases' list files) and a user's own data (folder or CSV), on fixture
trees named exactly as the releases and the documented conventions name them; their errors;
the registry, the command lines' choices and the evaluation plan that take them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edaan_fast.data import DATASETS, DatasetError, build_dataset
from edaan_fast.engine import run_config
from edaan_fast.engine.run_config import RunConfigError, source_dataset
from edaan_fast.evaluate import main as evaluate_main
from edaan_fast.evaluation.targets import DATASETS as EVAL_DATASETS
from edaan_fast.evaluation.targets import TargetOptions, plan_target
from edaan_fast.metrics.features import EvaluationError
from tests.conftest import requires_ops
from tests.test_data_readers import make_market, write_image
from tests.test_evaluate_cli import ckpt, exported, synthetic_cache  # noqa: F401 (fixtures)
from tests.test_trainer import MICRO_MODEL

# (relative path, pid) per list file, as MSMT17 names them: <pid>/<pid>_<index>_<cam>_<time>_..
MSMT_LISTS = {
    "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                       ("0000/0000_001_05_0303morning_0022_1.jpg", 0),
                       ("0002/0002_000_15_0303noon_1021_0.jpg", 2)],
    "list_val.txt": [("0001/0001_000_03_0303afternoon_0501_0.jpg", 1)],
    "list_query.txt": [("0000/0000_000_01_0303morning_0036_0.jpg", 0),
                       ("0007/0007_004_12_0113afternoon_0125_0.jpg", 7)],
    "list_gallery.txt": [("0000/0000_003_02_0303morning_0112_1.jpg", 0),
                         ("0007/0007_000_11_0113noon_0918_0.jpg", 7),
                         ("0009/0009_001_07_0113noon_0201_0.jpg", 9)],
}
MSMT_DIRS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}


def make_msmt17(root: Path, version: str = "V1", lists=MSMT_LISTS) -> Path:
    base = root / f"MSMT17_{version}"
    train_dir, test_dir = MSMT_DIRS[version]
    for k, (name, entries) in enumerate(lists.items()):
        folder = base / (train_dir if name in ("list_train.txt", "list_val.txt") else test_dir)
        for j, (rel, _) in enumerate(entries):
            write_image(folder / rel, seed=10 * k + j)
        base.mkdir(parents=True, exist_ok=True)
        (base / name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))
    return base


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17_labels_of_both_releases(tmp_path, version):
    base = make_msmt17(tmp_path, version)
    ds = build_dataset("msmt17", tmp_path)
    assert ds.root == base.resolve() and ds.info == {"version": version, "with_val": False}
    # cameras: the third field of the name, 1-based in the release
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 4), (1, 14)]  # 2 -> 1
    assert [(r.pid, r.camid) for r in ds.query] == [(0, 0), (7, 11)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 1), (7, 10), (9, 6)]
    image_dir = base / MSMT_DIRS[version][0]
    assert ds.train[2].path == str(image_dir / "0002/0002_000_15_0303noon_1021_0.jpg")
    assert all(Path(r.path).is_file() for r in ds.train + ds.query + ds.gallery)


def test_msmt17_with_val_and_root_forms(tmp_path):
    base = make_msmt17(tmp_path / "msmt17")
    ds = build_dataset("msmt17", tmp_path, with_val=True)  # <root>/msmt17/MSMT17_V1
    assert sorted((r.pid, r.camid) for r in ds.train) == [(0, 0), (0, 4), (1, 2), (2, 14)]
    assert ds.info["with_val"] is True
    assert build_dataset("msmt17", base).root == base.resolve()  # the release folder itself
    make_msmt17(tmp_path / "msmt17", "V2")
    assert build_dataset("msmt17", tmp_path).info["version"] == "V1"  # V1 first, as torchreid
    assert build_dataset("msmt17", tmp_path, version="V2").info["version"] == "V2"
    with pytest.raises(ValueError, match="version must be one of"):
        build_dataset("msmt17", tmp_path, version="v3")


def test_msmt17_errors_name_the_file_and_the_layout(tmp_path):
    with pytest.raises(DatasetError, match="no MSMT17_V1 or MSMT17_V2 release") as info:
        build_dataset("msmt17", tmp_path)
    assert "list_query.txt" in str(info.value) and "mask_train_v2" in str(info.value)
    base = make_msmt17(tmp_path)
    (base / "list_val.txt").unlink()
    with pytest.raises(DatasetError, match=f"{base} lacks list_val.txt"):
        build_dataset("msmt17", tmp_path)
    make_msmt17(tmp_path)
    (base / "list_query.txt").write_text("0000/0000_000_01_0303morning_0036_0.jpg 0\nbad line\n")
    with pytest.raises(DatasetError, match=r"list_query.txt line 2: expected '<image path> <pid>'"):
        build_dataset("msmt17", tmp_path)
    (base / "list_query.txt").write_text("0000/person_0001.jpg 0\n")
    with pytest.raises(DatasetError, match="line 1: cannot take a pid >= 0 and a camera >= 1"):
        build_dataset("msmt17", tmp_path)
    make_msmt17(tmp_path)
    (base / "test" / "0007" / "0007_000_11_0113noon_0918_0.jpg").unlink()
    with pytest.raises(DatasetError, match="of the 3 images .*list_gallery.txt lists, 1 do not "
                                           "exist, e.g. .*0007_000_11_0113noon_0918_0.jpg"):
        build_dataset("msmt17", tmp_path)


# ----------------------------------------------------------------------------- own data

OWN_FILES = {
    "train": ["0001_0_000123.jpg", "0001_2_000200.jpg", "0042_1_x.png", "-1_0_junk.jpg"],
    "query": ["0101_1_000007.jpg", "0102_0.jpg"],
    "gallery": ["0101_0_000042.jpg", "0102_3_a_b.c.jpg", "0000_2_other.jpg"],
}


def make_own(root: Path) -> Path:
    return make_market(root, OWN_FILES)  # split folder -> file names, one image each


def test_own_folder_labels(tmp_path):
    make_own(tmp_path)
    (tmp_path / "gallery" / "notes.txt").write_text("not an image")  # skipped
    ds = build_dataset("custom", tmp_path)
    assert ds.name == "custom" and ds.root == tmp_path.resolve()
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 2), (1, 1)]  # junk dropped
    assert [(r.pid, r.camid) for r in ds.query] == [(101, 1), (102, 0)]  # camid as written
    assert sorted((r.pid, r.camid) for r in ds.gallery) == [(0, 2), (101, 0), (102, 3)]
    (tmp_path / "train").rename(tmp_path / "unused")  # evaluation needs query/gallery only
    assert build_dataset("custom", tmp_path).train == []


def test_own_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as info:
        build_dataset("custom", tmp_path / "nowhere")
    assert "<pid>_<camid>" in str(info.value)
    write_image(tmp_path / "images" / "0001_0_000123.jpg")
    with pytest.raises(DatasetError, match=r"holds none of train/, query/, gallery/; found "
                                           r"entries \['images'\]") as info:
        build_dataset("custom", tmp_path)
    assert "or <root> = a .csv file" in str(info.value)
    (tmp_path / "query").mkdir()
    with pytest.raises(DatasetError, match=f"no images .* in {tmp_path / 'query'}"):
        build_dataset("custom", tmp_path)
    make_own(tmp_path)
    write_image(tmp_path / "query" / "0001_c1s1_000451_03.jpg")  # Market's names: not ours
    with pytest.raises(DatasetError, match="cannot parse identity and camera from file name "
                                           ".*0001_c1s1_000451_03.jpg"):
        build_dataset("custom", tmp_path)


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_own_csv_with_split_column_and_header_in_any_order(tmp_path):
    make_own(tmp_path / "imgs")
    csv = write_csv(tmp_path / "lists" / "set.csv", (
        "split,path,camid,pid\n"
        "train,../imgs/train/0001_0_000123.jpg,0,5\n"
        "train,../imgs/train/0042_1_x.png,3,9\n"
        "\n"
        f"query,{tmp_path / 'imgs/query/0102_0.jpg'},1,102\n"  # absolute path
        "gallery,../imgs/gallery/0101_0_000042.jpg,0,102\n"
        "gallery,../imgs/gallery/0000_2_other.jpg,2,-1\n"))  # junk row dropped
    ds = build_dataset("custom", csv)
    assert ds.root == csv.absolute()
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (1, 3)]  # pids 5, 9 relabelled
    assert [(r.pid, r.camid) for r in ds.query] == [(102, 1)]  # the CSV's labels, not the name's
    assert [(r.pid, r.camid) for r in ds.gallery] == [(102, 0)]
    assert Path(ds.train[1].path).resolve() == (tmp_path / "imgs/train/0042_1_x.png").resolve()


def test_own_csv_without_split_column_takes_the_first_folder(tmp_path):
    make_own(tmp_path)
    csv = write_csv(tmp_path / "set.csv", "train/0001_0_000123.jpg,1,0\nquery/0102_0.jpg,2,1\n"
                                          "gallery/0101_0_000042.jpg,2,0\n")
    ds = build_dataset("custom", csv)
    assert [(len(ds.train), len(ds.query), len(ds.gallery))] == [(1, 1, 1)]
    write_csv(csv, "train/0001_0_000123.jpg,1,0\nelsewhere/0102_0.jpg,2,1\n")
    with pytest.raises(DatasetError, match="line 2: the first folder of the path .* must be one "
                                           "of train, query, gallery, got 'elsewhere'"):
        build_dataset("custom", csv)


@pytest.mark.parametrize("text, message", [
    ("", "is empty; expected rows path,pid,camid"),
    ("a.jpg,1\n", "line 1: expected 3 or 4 comma-separated fields"),
    ("path,pid,camera\n", r"header \['path', 'pid', 'camera'\] must name path, pid, camid"),
    ("query/0102_0.jpg,2,1,query\nquery/0102_0.jpg,2,1\n", r"line 2: expected 4 fields"),
    ("query/0102_0.jpg,two,1,query\n", "line 1: pid and camid must be integers, got 'two'"),
    ("query/0102_0.jpg,2,-1,query\n", "line 1: pid must be >= -1 .* got pid=2, camid=-1"),
    ("query/0102_0.jpg,2,1,test\n", "line 1: split must be one of train, query, gallery, got "
                                    "'test'"),
    ("query/0102_0.jpg,2,1,query\nquery/missing.jpg,2,1,gallery\n",
     "of the images .* lists, 1 do not exist, e.g. .*missing.jpg"),
    ("query/0102_0.jpg,-1,1,query\n", "lists no images but junk"),
])
def test_own_csv_errors(tmp_path, text, message):
    make_own(tmp_path)
    with pytest.raises(DatasetError, match=message):
        build_dataset("custom", write_csv(tmp_path / "set.csv", text))


def test_own_csv_path_errors(tmp_path):
    with pytest.raises(DatasetError, match="CSV file not found"):
        build_dataset("custom", tmp_path / "set.csv")
    (tmp_path / "set.txt").write_text("x")
    with pytest.raises(DatasetError, match="is a file but not a .csv"):
        build_dataset("custom", tmp_path / "set.txt")


# ------------------------------------------------------------- registry, runs, evaluation

def test_every_command_line_offers_every_registered_data_set():
    assert set(run_config.DATASET_CHOICES) == set(DATASETS) == set(EVAL_DATASETS)
    assert {"msmt17", "custom"} <= set(DATASETS)


def test_runs_and_evaluation_read_the_new_sets(tmp_path):
    make_msmt17(tmp_path / "msmt")
    make_own(tmp_path / "own")
    run = {"source": "msmt17", "source_root": str(tmp_path / "msmt"), "target": "custom",
           "target_root": str(tmp_path / "own"), "seed": 0}
    assert source_dataset(run).num_train_pids == 2
    plan = plan_target(TargetOptions(), run)
    assert (plan.dataset, plan.protocol) == ("custom", "market")
    assert [len(plan.tasks[0].query), len(plan.tasks[0].gallery)] == [2, 3]
    plan = plan_target(TargetOptions(dataset="msmt17", data_root=str(tmp_path / "msmt")), run)
    assert [len(plan.tasks[0].query), len(plan.tasks[0].gallery)] == [2, 3]
    (tmp_path / "own" / "train").rename(tmp_path / "own" / "kept")
    with pytest.raises(RunConfigError, match="the source data set 'custom' under .* has no "
                                             "training images"):
        source_dataset({**run, "source": "custom", "source_root": str(tmp_path / "own")})
    (tmp_path / "own" / "kept").rename(tmp_path / "own" / "train")
    (tmp_path / "own" / "gallery").rename(tmp_path / "own" / "kept")
    assert source_dataset({**run, "source": "custom", "source_root": str(tmp_path / "own")})
    with pytest.raises(EvaluationError, match="data set custom has no gallery split"):
        plan_target(TargetOptions(), run)


def _synthetic_csv(path: Path, domain: str, splits) -> Path:
    """A CSV of the embedded set's images of ``splits``, with their labels."""
    ds = build_dataset("synthetic", root=None, domain=domain, preset="tiny", seed=0)
    rows = [f"{r.path},{r.pid},{r.camid},{split}" for split in splits
            for r in getattr(ds, split)]
    return write_csv(path, "path,pid,camid,split\n" + "\n".join(rows) + "\n")


@requires_ops
def test_evaluate_cli_scores_an_own_csv_as_the_set_it_lists(exported, ckpt, tmp_path):
    report, _ = exported  # the embedded target's scores
    csv = _synthetic_csv(tmp_path / "own.csv", "target", ("query", "gallery"))
    out = tmp_path / "own.json"
    assert evaluate_main(["--checkpoint", str(ckpt), "--dataset", "custom", "--data-root",
                          str(csv), "--output", str(out), "--num-workers", "0", "-q"]) == 0
    own = json.loads(out.read_text())
    assert (own["dataset"], own["protocol"]) == ("custom", "market")
    assert (own["num_query"], own["num_gallery"]) == (100, 110)
    for key, value in report["metrics"].items():
        assert own["metrics"][key] == pytest.approx(value, abs=1e-7), key


def _own_folder(root: Path, domain: str) -> Path:
    """The embedded set's images linked into the folder convention, pid_camid_index.jpg."""
    ds = build_dataset("synthetic", root=None, domain=domain, preset="tiny", seed=0)
    for split in ("train", "query", "gallery"):
        (root / split).mkdir(parents=True)
        for i, r in enumerate(getattr(ds, split)):
            (root / split / f"{r.pid}_{r.camid}_{i:05d}{Path(r.path).suffix}").symlink_to(r.path)
    return root


def test_train_cli_on_own_data(tmp_path, synthetic_cache):
    csv = _synthetic_csv(tmp_path / "source.csv", "source", ("train",))
    own = _own_folder(tmp_path / "target", "target")
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump({"model": MICRO_MODEL, "batch_size": 8, "epochs": 1,
                                      "iters_per_epoch": 1, "eval_every": 0,
                                      "progress": False}))
    proc = subprocess.run(
        [sys.executable, "-m", "edaan_fast.train", "--config", str(config), "--source",
         "custom", "--source-root", str(csv), "--target", "custom", "--target-root", str(own),
         "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    source, target = (build_dataset("synthetic", root=None, domain=d, preset="tiny", seed=0)
                      for d in ("source", "target"))
    assert (f"{len(source.train)} source images of {source.num_train_pids} identities, "
            f"{len(target.train)} target images") in proc.stderr
    assert (report["source"], report["target"]) == ("custom", "custom")
    assert set(report["metrics"]) >= {"rank1", "mAP"}  # evaluated on the folder's query/gallery
