"""Class schemes: the built-in ones, CORINE 43 -> BigEarthNet 19 on the real label files, YAML schemes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from labels_helpers import BIGEARTHNET

from softcon.tasks.schemes import (
    CORINE_BIGEARTHNET19,
    DYNAMIC_WORLD,
    IO_LULC,
    WORLDCOVER,
    get_scheme,
    load_scheme_yaml,
)

# The six real BigEarthNet v1 patches and their 19-class labels, mapped by hand from the 43-class names in
# their JSON with the nomenclature table of Sumbul et al. (2021).
BEN19_EXPECTED = {
    "S2A_MSIL2A_20170613T101031_87_48": {
        "Arable land", "Land principally occupied by agriculture, with significant areas of natural vegetation"},
    "S2A_MSIL2A_20170617T113321_36_85": {"Arable land", "Pastures"},
    "S2A_MSIL2A_20170617T113321_4_55": {"Pastures"},
    "S2A_MSIL2A_20171221T112501_56_35": {
        "Complex cultivation patterns", "Broad-leaved forest", "Transitional woodland, shrub",
        "Land principally occupied by agriculture, with significant areas of natural vegetation"},
    "S2B_MSIL2A_20170924T93020_69_24": {
        "Coniferous forest", "Mixed forest", "Transitional woodland, shrub", "Inland wetlands", "Inland waters"},
    "S2B_MSIL2A_20180204T94161_57_38": {"Arable land", "Coniferous forest", "Mixed forest"},
}  # fmt: skip


def test_builtin_schemes_have_the_published_class_counts() -> None:
    assert len(WORLDCOVER.class_names) == 11 and WORLDCOVER.name_of(80) == "Permanent water bodies"
    assert len(DYNAMIC_WORLD.class_names) == 9 and DYNAMIC_WORLD.source_codes[0] == 1  # water is not nodata
    assert len(IO_LULC.class_names) == 8 and 10 in IO_LULC.excluded_codes  # clouds
    assert len(CORINE_BIGEARTHNET19.class_names) == 19
    # BigEarthNet's 43 CORINE classes: 32 map to a 19-class label, 11 are excluded (glaciers are not in the 43).
    corine_level3 = [c for c in CORINE_BIGEARTHNET19.source_codes if c > 100]
    excluded_level3 = [c for c in CORINE_BIGEARTHNET19.excluded_codes if c > 100]
    assert len(corine_level3) == 32 and len(excluded_level3) == 12 and 335 in excluded_level3
    assert all(1 <= c <= 255 for s in (WORLDCOVER, DYNAMIC_WORLD, IO_LULC, CORINE_BIGEARTHNET19) for c in s.codes)


@pytest.mark.parametrize("patch", sorted(BEN19_EXPECTED))
def test_corine_43_to_19_on_real_bigearthnet_label_files(patch: str) -> None:
    s2_file = BIGEARTHNET / "BigEarthNet-S2-Example" / patch / f"{patch}_labels_metadata.json"
    names = json.loads(s2_file.read_text())["labels"]
    classes, unknown = CORINE_BIGEARTHNET19.map_names(names)
    assert unknown == [] and set(classes) == BEN19_EXPECTED[patch]
    assert classes == [c for c in CORINE_BIGEARTHNET19.class_names if c in classes]  # class order


def test_corine_names_and_codes_agree_and_unknowns_are_reported() -> None:
    # Official CORINE spellings, level-3 codes and EEA raster grid codes all reach the same class.
    scheme = CORINE_BIGEARTHNET19
    assert scheme.code_of_value("Peat bogs") == scheme.code_of_value("Peatbogs") == scheme.code_of_value(412)
    assert (
        scheme.code_of_value(412)
        == scheme.code_of_value(36)
        == scheme.codes[scheme.class_names.index("Inland wetlands")]
    )
    assert scheme.code_of_value("Road and rail networks and associated land") == 0  # excluded, not unknown
    assert scheme.map_names(["Pastures", "Rice paddies"]) == (["Pastures"], ["Rice paddies"])
    raster = np.array([[111, 112, 122], [523, 48, 999], [777, 211, 212]], dtype=np.uint16)
    mapped = scheme.map_codes(raster)
    urban, arable, marine = (scheme.codes[scheme.class_names.index(n)] for n in
                             ("Urban fabric", "Arable land", "Marine waters"))  # fmt: skip
    np.testing.assert_array_equal(mapped.land_cover, [[urban, urban, 0], [marine, 0, 0], [0, arable, arable]])
    assert mapped.excluded == {122: 1} and mapped.unknown == {777: 1} and mapped.nodata_pixels == 2


def test_map_codes_counts_every_pixel_once() -> None:
    product = np.random.default_rng(0).choice([0, 10, 20, 70, 13], size=(50, 40)).astype(np.uint8)
    mapped = WORLDCOVER.map_codes(product)
    known = int(np.isin(product, WORLDCOVER.codes).sum())
    assert mapped.nodata_pixels + sum(mapped.unknown.values()) + known == product.size
    assert mapped.unknown == {13: int((product == 13).sum())}
    np.testing.assert_array_equal(mapped.land_cover, np.where(product == 13, 0, product))
    # Same answer through the sort-based path (int32 products).
    assert WORLDCOVER.map_codes(product.astype(np.int32)).unknown == mapped.unknown


def test_yaml_scheme(tmp_path: Path) -> None:
    path = tmp_path / "scheme.yaml"
    path.write_text(
        "name: two\nnodata: [0, 255]\nclasses:\n  - {name: Vegetation, code: 7, source_codes: [10, 20, 30],"
        " source_names: [Forest]}\n  - {name: Water, source_codes: [80]}\n"
    )
    scheme = get_scheme(str(path))
    assert scheme.name == "two" and scheme.class_codes == (7, 2) and scheme.class_names == ("Vegetation", "Water")
    assert scheme.code_of_value("forest") == 7 and scheme.code_of_value(255) == 0 and scheme.code_of_value(40) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nclasses: []\n", "not a valid scheme"),
        ("name: x\nclasses:\n  - {name: A, source_codes: [1]}\n  - {name: B, source_codes: [1]}\n", "in two classes"),
        ("name: x\nclasses:\n  - {name: A, code: 0, source_codes: [1]}\n", "not a valid scheme"),
        ("name: x\nclasses:\n  - {name: A, source_codes: [0]}\n", "both a class and nodata"),
        ("name: x\nclasses:\n  - {name: A, sourcecodes: [3]}\n", "not a valid scheme"),
    ],
    ids=["no-classes", "code-twice", "code-zero", "nodata-class", "typo"],
)
def test_bad_yaml_schemes_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_scheme_yaml(path)


def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown class scheme 'corine'; known: \['corine-bigearthnet19'"):
        get_scheme("corine")
    with pytest.raises(ValueError, match=r"missing\.yaml does not exist"):
        get_scheme("missing.yaml")
    assert get_scheme(None, collection="io-lulc-annual-v02") is IO_LULC and get_scheme(None) is WORLDCOVER
