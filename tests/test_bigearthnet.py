"""BigEarthNet-format reader on the 6 real S2 and S1 example patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from real_data import REAL

from softcon.tasks.bigearthnet import (
    S1_POLS,
    S2_BANDS,
    BigEarthNetDataset,
    assign_splits,
    band_mapping,
    corine_to_bigearthnet19,
    find_patches,
    read_patch,
    subset_without_replacement,
)
from softcon.tasks.schemes import CORINE_BIGEARTHNET19

REAL = REAL / "bigearthnet"
L2A_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]

# the 19-class labels of each example patch (key: the "<row>_<col>" suffix shared by S2 and S1 names),
# worked out by hand from the CORINE names in its JSON and the BigEarthNet-19 nomenclature
EXPECTED = {
    "87_48": {"Arable land", "Land principally occupied by agriculture, with significant areas of natural vegetation"},
    "36_85": {"Arable land", "Pastures"},
    "4_55": {"Pastures"},
    "69_24": {"Coniferous forest", "Mixed forest", "Transitional woodland, shrub", "Inland wetlands",
              "Inland waters"},
    "56_35": {"Complex cultivation patterns",
              "Land principally occupied by agriculture, with significant areas of natural vegetation",
              "Broad-leaved forest", "Transitional woodland, shrub"},
    "57_38": {"Arable land", "Coniferous forest", "Mixed forest"},
}  # fmt: skip

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="real BigEarthNet samples not present")


def suffix(name: str) -> str:
    return "_".join(name.split("_")[-2:])


def names_of(labels: np.ndarray) -> set[str]:
    return {CORINE_BIGEARTHNET19.class_names[c] for c in np.flatnonzero(labels)}


@pytest.mark.parametrize("sensor", ["s2", "s1"])
def test_reads_all_six_patches_with_19_class_labels(sensor: str) -> None:
    patches = find_patches(REAL, sensor)
    assert len(patches) == 6
    assert {suffix(patch.name): names_of(patch.labels) for patch in patches} == EXPECTED
    assert all(patch.labels.shape == (19,) and patch.labels.dtype == np.uint8 for patch in patches)


def test_s2_patch_has_12_bands_on_the_10m_grid() -> None:
    patch = next(p for p in find_patches(REAL, "s2") if p.name.endswith("87_48"))
    image = read_patch(patch)
    assert image.shape == (12, 120, 120) and image.dtype == np.float32
    assert "B10" not in S2_BANDS and S2_BANDS.index("B8A") == 8
    # 10 m bands are the files' pixels unchanged; reflectance x10000 of a vegetated scene
    import rasterio

    with rasterio.open(patch.folder / f"{patch.name}_B04.tif") as band:
        np.testing.assert_array_equal(image[S2_BANDS.index("B04")], band.read(1).astype(np.float32))
    with rasterio.open(patch.folder / f"{patch.name}_B01.tif") as band:
        b01 = band.read(1).astype(np.float32)  # (20, 20) at 60 m
    upsampled = image[S2_BANDS.index("B01")]
    # bilinear upsampling stays within the source range, keeps the mean and the 60 m pattern
    assert upsampled.min() >= b01.min() and upsampled.max() <= b01.max()
    assert upsampled.mean() == pytest.approx(b01.mean(), rel=0.02)
    assert np.corrcoef(upsampled.reshape(20, 6, 20, 6).mean((1, 3)).ravel(), b01.ravel())[0, 1] > 0.9
    assert 0 < np.median(image[S2_BANDS.index("B08")]) < 10000


def test_s1_patch_is_vv_vh_in_db() -> None:
    image = read_patch(find_patches(REAL, "s1")[0])
    assert image.shape == (2, 120, 120) and S1_POLS == ("VV", "VH")
    assert -40 < float(np.median(image[1])) < float(np.median(image[0])) < 5  # VH is weaker than VV


def test_dataset_maps_bands_by_name_and_normalises() -> None:
    patches = find_patches(REAL, "s2")
    l1c = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    stats = {"mean": [1000.0] * 13, "std": [500.0] * 13}
    dataset = BigEarthNetDataset(patches, l1c, stats, image_size=64)
    assert dataset.filled == ["B10"]
    item = dataset[0]
    assert item["image"].shape == (13, 64, 64) and item["labels"].shape == (19,)
    assert torch.all(item["image"][l1c.index("B10")] == 0)
    raw = read_patch(patches[0])
    expected_mean = (raw[S2_BANDS.index("B12")].mean() - 1000) / 500
    assert float(item["image"][l1c.index("B12")].mean()) == pytest.approx(expected_mean, abs=0.02)


def test_band_mapping_refuses_an_encoder_without_shared_bands() -> None:
    assert band_mapping(S2_BANDS, ["B04", "B10"]) == [3, None]
    with pytest.raises(ValueError, match="share none"):
        band_mapping(S2_BANDS, ["VV", "VH"])


def test_unknown_corine_name_is_an_error() -> None:
    assert corine_to_bigearthnet19(["Airports"]).sum() == 0  # a CORINE class without a 19-class counterpart
    with pytest.raises(ValueError, match="not a BigEarthNet CORINE class"):
        corine_to_bigearthnet19(["Atlantis"])


def test_missing_folder_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_patches(tmp_path / "nope", "s2")
    with pytest.raises(ValueError, match="no BigEarthNet S1 patch"):
        find_patches(tmp_path, "s1")


def test_official_split_lists_win_over_the_hash(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("a\n")
    (tmp_path / "test.csv").write_text("x_s2,b\n")  # the S1 lists pair the S2 and S1 names
    splits = assign_splits(tmp_path, ["a", "b", "c"])
    assert splits[0] == "train" and splits[1] == "test" and splits[2] in ("train", "val", "test")
    # the hash split is stable and near the asked fractions
    names = [f"patch_{i}" for i in range(2000)]
    hashed = assign_splits(tmp_path / "none", names, val_fraction=0.2, test_fraction=0.1)
    assert (hashed == assign_splits(tmp_path / "none", names[::-1], val_fraction=0.2, test_fraction=0.1)[::-1]).all()
    assert abs((hashed == "val").mean() - 0.2) < 0.03 and abs((hashed == "test").mean() - 0.1) < 0.03


def test_ten_percent_subset_has_no_repeats() -> None:
    indices = np.arange(1000, 2000)
    subset = subset_without_replacement(indices, 0.1, seed=3)
    assert len(subset) == 100 and len(np.unique(subset)) == 100 and np.isin(subset, indices).all()
    assert not np.array_equal(subset, subset_without_replacement(indices, 0.1, seed=4))
    np.testing.assert_array_equal(subset, subset_without_replacement(indices, 0.1, seed=3))
    assert len(subset_without_replacement(np.arange(5), 0.1)) == 1
    with pytest.raises(ValueError, match="fraction"):
        subset_without_replacement(indices, 0.0)


def test_label_json_without_labels_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "p_1_2"
    folder.mkdir()
    (folder / "p_1_2_VV.tif").write_bytes(b"")
    (folder / "p_1_2_labels_metadata.json").write_text(json.dumps({"coordinates": {}}))
    with pytest.raises(ValueError, match="no 'labels' list"):
        find_patches(tmp_path, "s1")


# BigEarthNet's label_indices.json: the 43 CORINE names in index order and the 19-class "label_conversion"
CORINE_43 = [
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities",
    "Non-irrigated arable land", "Permanently irrigated land", "Rice fields", "Vineyards",
    "Fruit trees and berry plantations", "Olive groves", "Pastures", "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest", "Natural grassland",
    "Moors and heathland", "Sclerophyllous vegetation", "Transitional woodland/shrub", "Beaches, dunes, sands",
    "Bare rock", "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes", "Salines",
    "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons", "Estuaries", "Sea and ocean",
]  # fmt: skip
LABEL_CONVERSION = [[0, 1], [2], [11, 12, 13], [14, 15, 16, 18], [17], [19], [20], [21], [22], [23], [24], [25, 31],
                    [26, 27], [28], [29], [33, 34], [35, 36], [38, 39], [40, 41, 42]]  # fmt: skip


def test_corine_mapping_matches_bigearthnet_label_conversion() -> None:
    for index, name in enumerate(CORINE_43):
        expected = [c for c, sources in enumerate(LABEL_CONVERSION) if index in sources]
        assert np.flatnonzero(corine_to_bigearthnet19([name])).tolist() == expected, name
