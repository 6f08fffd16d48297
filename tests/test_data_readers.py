"""Readers: Market-1501, DukeMTMC-reID, CUHK03 (.mat fixture), PRID2011, errors, registry."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edaan_fast.data import DATASETS, DatasetError, build_dataset, build_loader
from tests.oracles import market_mini


def write_image(path: Path, seed: int = 0, size=(8, 4), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


MARKET_FILES = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c3s1_000551_01.jpg",
                           "0007_c2s3_070952_01.jpg", "0010_c6s4_002452_02.jpg"],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c4s6_015641_00.jpg"],
    "bounding_box_test": ["0001_c2s1_000301_01.jpg", "0003_c1s1_000601_04.jpg",
                          "0000_c5s2_011111_02.jpg", "-1_c1s1_000401_03.jpg"],
}


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``side x side`` pixels (400 megapixels by default: over twice
    Pillow's decompression-bomb limit) in about 50 kB: rows of zeros compress well."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" * (1 + (side + 7) // 8)
    stream = zlib.compressobj(9)
    data = b"".join(stream.compress(row) for _ in range(side)) + stream.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def make_market(root: Path, files=MARKET_FILES) -> Path:
    for i, (split, names) in enumerate(files.items()):
        for j, name in enumerate(names):
            write_image(root / split / name, seed=10 * i + j)
    return root


def test_market_reader_labels(tmp_path):
    base = make_market(tmp_path / "Market-1501-v15.09.15")
    (base / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")  # shipped with the release
    ds = build_dataset("market1501", tmp_path)  # the parent folder is accepted too
    assert ds.root == base.resolve()
    assert sorted(r.pid for r in ds.train) == [0, 0, 1, 2]  # 2, 7, 10 relabelled
    assert {r.camid for r in ds.train} == {0, 2, 1, 5}
    assert ds.num_train_pids == 3 and ds.num_train_cams == 4
    assert [(r.pid, r.camid) for r in ds.query] == [(1, 0), (3, 3)]
    gallery = sorted((r.pid, r.camid) for r in ds.gallery)
    assert gallery == [(0, 4), (1, 1), (3, 0)]  # junk (-1) dropped, distractor (0) kept
    assert all(Path(r.path).is_file() for r in ds.train + ds.query + ds.gallery)
    text = repr(ds)
    assert "market1501" in text and "train" in text and "|     3 |" in text


def test_duke_reader(tmp_path):
    files = {"bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg",
                                    "0004_c8_f0001234.jpg"],
             "query": ["0005_c2_f0046985.jpg"],
             "bounding_box_test": ["0005_c1_f0044158.jpg", "0000_c3_f0000001.jpg"]}
    make_market(tmp_path / "DukeMTMC-reID", files)
    ds = build_dataset("dukemtmcreid", tmp_path)
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 1), (0, 4), (1, 7)]
    assert [(r.pid, r.camid) for r in ds.query] == [(5, 1)]
    assert sorted((r.pid, r.camid) for r in ds.gallery) == [(0, 2), (5, 0)]


def test_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist") as info:
        build_dataset("market1501", missing)
    assert str(missing) in str(info.value) and "bounding_box_train" in str(info.value)


def test_wrong_layout_lists_expected_folders(tmp_path):
    (tmp_path / "bounding_box_train").mkdir()
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="query") as info:
        build_dataset("market1501", tmp_path)
    assert "expected layout" in str(info.value) and "images" in str(info.value)


def test_unparsable_file_name_is_an_error(tmp_path):
    make_market(tmp_path)
    write_image(tmp_path / "query" / "person_0001.jpg")
    with pytest.raises(DatasetError, match="person_0001.jpg") as info:
        build_dataset("market1501", tmp_path)
    assert "_c<cam>s<seq>_" in str(info.value)


def test_empty_split_is_an_error(tmp_path):
    make_market(tmp_path)
    for f in (tmp_path / "query").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="no images"):
        build_dataset("market1501", tmp_path)


def test_corrupt_image_reported_by_path(tmp_path):
    make_market(tmp_path)
    bad = tmp_path / "bounding_box_train" / "0002_c1s1_000451_03.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = build_dataset("market1501", tmp_path)
    with pytest.raises(DatasetError, match="0002_c1s1_000451_03.jpg"):
        ds.verify()
    ds.verify(splits=("query", "gallery"))  # the other splits are fine
    loader = build_loader(ds.train, train=False, batch_size=4, num_workers=0, image_size=(8, 4))
    with pytest.raises(DatasetError, match="0002_c1s1_000451_03.jpg"):
        list(loader)


def test_decompression_bomb_reported_by_path(tmp_path):
    make_market(tmp_path)
    bomb = tmp_path / "bounding_box_train" / "0007_c2s3_070952_01.jpg"
    bomb.write_bytes(bomb_png())
    ds = build_dataset("market1501", tmp_path)
    with pytest.raises(DatasetError, match="1 unreadable image") as info:
        ds.verify()
    assert f"image {bomb} is too large to decode" in str(info.value)
    loader = build_loader(ds.train, train=False, batch_size=4, num_workers=0, image_size=(8, 4))
    with pytest.raises(DatasetError, match="is too large to decode"):
        list(loader)


def test_broken_symlink_named_like_an_image_is_reported(tmp_path):
    make_market(tmp_path)
    link = tmp_path / "query" / "0005_c1s1_001051_00.jpg"
    link.symlink_to(tmp_path / "elsewhere.jpg")
    with pytest.raises(DatasetError, match="broken symbolic link") as info:
        build_dataset("market1501", tmp_path)
    assert f"{link} -> {tmp_path / 'elsewhere.jpg'}" in str(info.value)
    (tmp_path / "other.txt").symlink_to(tmp_path / "gone.txt")  # not an image: still skipped
    link.unlink()
    assert len(build_dataset("market1501", tmp_path).query) == 2


@pytest.mark.parametrize("name", ["market1501", "prid2011", "cuhk03", "synthetic"])
def test_a_file_as_data_root_is_refused(tmp_path, name):
    a_file = tmp_path / "data"
    a_file.write_text("")
    with pytest.raises(DatasetError, match=f"the data root {a_file} is a file; expected a folder"):
        build_dataset(name, a_file)
    with pytest.raises(DatasetError, match=f"is under {a_file}, a file"):
        build_dataset(name, a_file / "sub")


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="unknown data set 'viper'") as info:
        build_dataset("viper", "/tmp")
    for name in ("market1501", "dukemtmcreid", "cuhk03", "prid2011", "synthetic"):
        assert name in str(info.value) and name in DATASETS


@pytest.mark.skipif(market_mini() is None, reason="real Market-1501 subset not available")
def test_real_market1501_subset_counts():
    ds = build_dataset("market1501", market_mini())
    assert (ds.num_train_pids, len(ds.train)) == (50, 868)
    assert (len(ds.query), len(ds.gallery)) == (215, 782)
    assert ds.num_train_cams == 6
    assert sorted({r.pid for r in ds.train}) == list(range(50))
    assert {r.pid for r in ds.query} <= {r.pid for r in ds.gallery}
    with Image.open(ds.query[0].path) as img:
        assert img.size == (64, 128)


# ----------------------------------------------------------------------------- PRID2011

@pytest.fixture(scope="module")
def prid_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prid") / "prid_2011"
    for cam, n in (("cam_a", 385), ("cam_b", 749)):
        folder = root / "single_shot" / cam
        folder.mkdir(parents=True)
        for p in range(1, n + 1):
            Image.new("RGB", (2, 4), (p % 256, 0, 0)).save(folder / f"person_{p:04d}.png")
    return root.parent


@pytest.mark.parametrize("direction,probe,gallery_size", [("a2b", 0, 649), ("b2a", 1, 285)])
def test_prid2011_protocol(prid_root, direction, probe, gallery_size):
    ds = build_dataset("prid2011", prid_root, direction=direction, seed=3)
    assert (len(ds.train), ds.num_train_pids, ds.num_train_cams) == (200, 100, 2)
    q_ids = {r.pid for r in ds.query}
    assert len(ds.query) == len(q_ids) == 100 and {r.camid for r in ds.query} == {probe}
    assert len(ds.gallery) == gallery_size and {r.camid for r in ds.gallery} == {1 - probe}
    assert q_ids <= {r.pid for r in ds.gallery}
    distractors = {r.pid for r in ds.gallery} - q_ids
    assert len(distractors) == gallery_size - 100 and min(distractors) == 201
    train_paths = {Path(r.path).name for r in ds.train}
    assert not train_paths & {Path(r.path).name for r in ds.query}
    assert max(q_ids) <= 200


def test_prid2011_split_depends_on_seed_only(prid_root):
    ids = [frozenset(r.pid for r in build_dataset("prid2011", prid_root, seed=s).query)
           for s in (0, 0, 1)]
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_prid2011_missing_shared_person(tmp_path):
    for cam in ("cam_a", "cam_b"):
        (tmp_path / "single_shot" / cam).mkdir(parents=True)
        Image.new("RGB", (2, 4)).save(tmp_path / "single_shot" / cam / "person_0001.png")
    with pytest.raises(DatasetError, match="must appear in both cameras"):
        build_dataset("prid2011", tmp_path)
    with pytest.raises(ValueError, match="direction"):
        build_dataset("prid2011", tmp_path, direction="up")


# ----------------------------------------------------------------------------- CUHK03

H, W = 8, 4  # non-square, so a transposition error shows


def make_cuhk03_mat(root: Path, persons_per_pair=4, n_splits=3, n_test=4) -> dict:
    """A tiny cuhk-03.mat with the release's MATLAB v7.3 structure (object references).

    MATLAB stores arrays column-major, so HDF5 holds every array transposed: a 5x1 cell is a
    (1, 5) dataset of references, an n x 10 cell is (10, n), an H x W x 3 image is (3, W, H),
    an empty cell is a (2,) uint64 [0, 0] dataset marked MATLAB_empty.
    """
    h5py = pytest.importorskip("h5py")
    (root / "cuhk03_release").mkdir(parents=True)
    images = {}
    rng = np.random.default_rng(0)
    with h5py.File(root / "cuhk03_release" / "cuhk-03.mat", "w") as f:
        refs = f.create_group("#refs#")
        counter = [0]

        def put(arr):
            counter[0] += 1
            ds = refs.create_dataset(f"r{counter[0]}", data=arr)
            return ds.ref

        def empty():
            counter[0] += 1
            ds = refs.create_dataset(f"r{counter[0]}", data=np.zeros(2, np.uint64))
            ds.attrs["MATLAB_empty"] = np.uint8(1)
            return ds.ref

        for kind in ("labeled", "detected"):
            pair_refs = []
            for pair in range(5):
                cells = np.empty((10, persons_per_pair), dtype=h5py.ref_dtype)
                for person in range(persons_per_pair):
                    for idx in range(10):
                        if idx in (4, 9) or (idx == 3 and person % 2):  # missing images
                            cells[idx, person] = empty()
                            continue
                        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                        images[(kind, pair + 1, person + 1, idx + 1)] = img
                        cells[idx, person] = put(img.T)
                pair_refs.append(put(cells))
            f.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype))
        splits = []
        all_ids = [(p, q) for p in range(1, 6) for q in range(1, persons_per_pair + 1)]
        for s in range(n_splits):
            pick = np.random.default_rng(100 + s).choice(len(all_ids), n_test, replace=False)
            test = np.array([all_ids[i] for i in sorted(pick)], dtype=np.float64)  # [n, 2]
            splits.append(test)
        f.create_dataset("testsets", data=np.array([[put(t.T) for t in splits]],
                                                    dtype=h5py.ref_dtype))
    return {"images": images, "testsets": splits, "n": 5 * persons_per_pair}


def test_cuhk03_classic_split_and_png_export(tmp_path):
    fx = make_cuhk03_mat(tmp_path)
    ds = build_dataset("cuhk03", tmp_path, image_type="labeled", protocol="classic", split_id=1)
    test_ids = {(int(a), int(b)) for a, b in fx["testsets"][1]}
    assert ds.num_train_pids == fx["n"] - len(test_ids)
    assert ds.query == ds.gallery and {r.camid for r in ds.query} == {0, 1}
    names = {Path(r.path).name for r in ds.query}
    assert {(int(n[0]), int(n[2:5])) for n in names} == test_ids
    # 4 images per person (indices 5 and 10 empty) minus one for odd persons
    assert len(ds.train) + len(ds.query) == sum(1 for k in fx["images"] if k[0] == "labeled")
    rec = ds.train[0]
    pair, person, view, idx = (int(x) for x in Path(rec.path).stem.split("_"))
    assert rec.camid == view - 1 == (0 if idx <= 5 else 1)
    np.testing.assert_array_equal(np.asarray(Image.open(rec.path)),
                                  fx["images"][("labeled", pair, person, idx)])
    assert ds.info["split_id"] == 1


def test_cuhk03_cache_written_once_and_redone_when_incomplete(tmp_path):
    make_cuhk03_mat(tmp_path)
    build_dataset("cuhk03", tmp_path)
    png = next((tmp_path / "images_detected").glob("*.png"))
    marker = tmp_path / "images_detected" / ".complete.json"
    stamp = png.stat().st_mtime_ns
    png.write_bytes(b"overwritten")  # a cached file is not rewritten while the marker stands
    build_dataset("cuhk03", tmp_path, split_id=2)
    assert png.read_bytes() == b"overwritten"
    marker.unlink()  # an interrupted export: no marker -> export again
    build_dataset("cuhk03", tmp_path)
    assert png.read_bytes() != b"overwritten" and png.stat().st_mtime_ns >= stamp
    assert marker.is_file()


def test_cuhk03_new_protocol_derived(tmp_path, caplog):
    fx = make_cuhk03_mat(tmp_path)
    ds = build_dataset("cuhk03", tmp_path, protocol="new")
    assert ds.info["split_source"] == "derived" and "not the official split" in caplog.text
    n_test = round(fx["n"] * 700 / 1467)
    q_ids, g_ids = {r.pid for r in ds.query}, {r.pid for r in ds.gallery}
    assert len(q_ids) == n_test and q_ids == g_ids
    assert ds.num_train_pids == fx["n"] - n_test
    # one query per (identity, view)
    assert len(ds.query) == len({(r.pid, r.camid) for r in ds.query})
    assert not {r.path for r in ds.query} & {r.path for r in ds.gallery}
    again = build_dataset("cuhk03", tmp_path, protocol="new")
    assert again.query == ds.query  # deterministic


def test_cuhk03_new_protocol_from_config(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    make_cuhk03_mat(tmp_path)
    names = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "2_001_1_02.png",
             "2_001_2_07.png"]
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = n
    scipy_io.savemat(tmp_path / "cuhk03_new_protocol_config_detected.mat", {
        "filelist": filelist, "labels": np.array([[1], [1], [2], [6], [6]]),
        "train_idx": np.array([[1], [2], [3]]), "query_idx": np.array([[4]]),
        "gallery_idx": np.array([[5]])})
    ds = build_dataset("cuhk03", tmp_path, protocol="new")
    assert ds.info["split_source"] == "official"
    assert [(Path(r.path).name, r.pid, r.camid) for r in ds.train] == [
        ("1_001_1_01.png", 0, 0), ("1_001_2_06.png", 0, 1), ("1_002_1_01.png", 1, 0)]
    assert [(r.pid, r.camid) for r in ds.query] == [(6, 0)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(6, 1)]
    assert all(Path(r.path).is_file() for r in ds.train + ds.query + ds.gallery)


def test_cuhk03_errors(tmp_path):
    with pytest.raises(DatasetError, match="cuhk-03.mat"):
        build_dataset("cuhk03", tmp_path)
    make_cuhk03_mat(tmp_path)
    with pytest.raises(ValueError, match=r"split_id must be in \[0, 3\)"):
        build_dataset("cuhk03", tmp_path, split_id=3)
    with pytest.raises(ValueError, match="image_type"):
        build_dataset("cuhk03", tmp_path, image_type="both")
