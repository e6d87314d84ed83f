"""Land-cover class schemes: how a product's codes (or class names) become the classes targets use.

A scheme maps **product codes** (what the raster or the vector attribute holds) to **class codes**, the
uint8 values written into the cube's ``landcover`` array and listed in its ``class_codes`` attribute.
Class codes are 1..255; 0 is nodata by the cube contract (``tasks/patches.py`` never counts it as a class).

Every product code falls in exactly one of four groups, and each is counted, never silently dropped:

- a class (``source_codes``) -> its class code;
- nodata (``nodata_codes``: WorldCover 0, IO LULC 0, CORINE 48/128/255...) -> 0, counted as nodata;
- excluded (``excluded_codes``: codes the scheme knows but keeps no class for, e.g. CORINE "Road and rail
  networks" in BigEarthNet-19, IO "Clouds") -> 0, counted per code in the report;
- unknown (anything else) -> 0, counted per code in the report and logged as a warning (or an error with
  ``LabelsConfig.unknown_codes = "error"``).

Built-in schemes: ``worldcover`` (11 classes, codes kept), ``dynamic-world`` (9 classes, label 0..8 -> 1..9 so
that water is not mistaken for nodata), ``io-lulc`` (Impact Observatory annual LULC v02, 8 classes, codes kept),
``corine-bigearthnet19`` (CORINE Land Cover level-3, 43 classes as in BigEarthNet -> the 19-class
nomenclature of Sumbul et al. 2021, codes 1..19). A YAML file gives a custom scheme (see ``load_scheme_yaml``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


def normalize_name(name: str) -> str:
    """Lowercase letters and digits only, so ``"Peat bogs"``, ``"Peatbogs"`` and ``"peat_bogs"`` match."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


@dataclass(frozen=True)
class MappedCodes:
    """A product array mapped through a scheme."""

    land_cover: np.ndarray
    """uint8 class codes, 0 = nodata."""
    nodata_pixels: int
    excluded: dict[int, int]
    """Excluded product code -> pixels."""
    unknown: dict[int, int]
    """Product code outside the scheme -> pixels."""


@dataclass(frozen=True)
class ClassScheme:
    """A list of target classes and the product codes (and names) that map onto them."""

    name: str
    """Scheme id (``worldcover``, ``dynamic-world``, ``io-lulc``, ``corine-bigearthnet19``, or a YAML name)."""
    class_names: tuple[str, ...]
    """Target class names, in class order (the order of the training store's ``labels`` columns)."""
    class_codes: tuple[int, ...]
    """uint8 code (1..255) of each class in the cube's ``landcover`` array, aligned with ``class_names``."""
    source_codes: Mapping[int, int]
    """Product code -> class code."""
    nodata_codes: tuple[int, ...] = (0,)
    """Product codes meaning no data; written as 0."""
    excluded_codes: Mapping[int, str] = field(default_factory=dict)
    """Product codes the scheme knows but maps to no class (code -> product class name); written as 0."""
    source_names: Mapping[str, str] = field(default_factory=dict)
    """Product class name -> target class name, for vector attributes and label files that hold names."""
    excluded_names: tuple[str, ...] = ()
    """Product class names the scheme knows but maps to no class."""

    def __post_init__(self) -> None:
        if len(self.class_codes) != len(self.class_names):
            raise ValueError(f"scheme {self.name}: {len(self.class_codes)} codes but {len(self.class_names)} names")
        if len(set(self.class_codes)) != len(self.class_codes) or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"scheme {self.name}: class codes and class names must be unique")
        bad = [c for c in self.class_codes if not 1 <= c <= 255]
        if bad:
            raise ValueError(f"scheme {self.name}: class codes {bad} are outside 1..255 (0 is nodata, uint8 array)")
        targets = set(self.source_codes.values()) - set(self.class_codes)
        if targets:
            raise ValueError(f"scheme {self.name}: source codes map to {sorted(targets)}, which are not class codes")
        clash = set(self.source_codes) & (set(self.nodata_codes) | set(self.excluded_codes))
        if clash:
            raise ValueError(f"scheme {self.name}: codes {sorted(clash)} are both a class and nodata/excluded")
        missing = set(self.source_names.values()) - set(self.class_names)
        if missing:
            raise ValueError(f"scheme {self.name}: source names map to unknown classes {sorted(missing)}")

    @property
    def codes(self) -> tuple[int, ...]:
        """Alias of ``class_codes``."""
        return self.class_codes

    def name_of(self, class_code: int) -> str:
        """Class name of a class code; raises ``KeyError`` for a code that is not a class."""
        return dict(zip(self.class_codes, self.class_names, strict=True))[class_code]

    def code_of_value(self, value: object) -> int | None:
        """Class code of one product value (an integer code, a numeric string, or a class name).

        Returns 0 for nodata and excluded values, None for a value outside the scheme.
        """
        code = _integer(value)
        if code is not None:
            if code in self.source_codes:
                return self.source_codes[code]
            return 0 if code in self.nodata_codes or code in self.excluded_codes else None
        key = normalize_name(str(value).strip())
        by_name = self._names_to_codes()
        if key in by_name:
            return by_name[key]
        return 0 if key in {normalize_name(n) for n in self.excluded_names} else None

    def _names_to_codes(self) -> dict[str, int]:
        codes = {normalize_name(n): c for n, c in zip(self.class_names, self.class_codes, strict=True)}
        name_to_code = dict(zip(self.class_names, self.class_codes, strict=True))
        codes.update({normalize_name(src): name_to_code[dst] for src, dst in self.source_names.items()})
        return codes

    def map_names(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """Target class names of a list of product class names (e.g. a BigEarthNet label file).

        Returns:
            (the target classes present, in class order; the names outside the scheme). Excluded names
            (known, no class) are in neither list.
        """
        present: set[int] = set()
        unknown: list[str] = []
        for name in names:
            code = self.code_of_value(name)
            if code is None:
                unknown.append(name)
            elif code:
                present.add(code)
        return [n for n, c in zip(self.class_names, self.class_codes, strict=True) if c in present], unknown

    def lookup_table(self, size: int) -> np.ndarray:
        """uint8 product code -> class code table over codes 0..size-1 (0 for everything not a class)."""
        table = np.zeros(size, dtype=np.uint8)
        for source, target in self.source_codes.items():
            if 0 <= source < size:
                table[source] = target
        return table

    def map_codes(self, product: np.ndarray) -> MappedCodes:
        """Map a product code array to class codes, counting nodata, excluded and unknown pixels."""
        product = np.asarray(product)
        if product.dtype.kind not in "iu":
            if not np.array_equal(product, np.round(product)):
                raise ValueError(f"land-cover codes must be integers, got {product.dtype} with fractional values")
            product = product.astype(np.int64)
        if product.dtype.kind == "u" and product.dtype.itemsize <= 2:
            # A lookup table and a bincount: one pass each, no sort (uint8 and uint16 products).
            size = 1 << (8 * product.dtype.itemsize)
            land_cover = self.lookup_table(size)[product]
            counts = np.bincount(product.ravel(), minlength=size)
            present = np.flatnonzero(counts)
            code_counts = dict(zip(present.tolist(), counts[present].tolist(), strict=True))
        else:
            values, inverse, counts = np.unique(product, return_inverse=True, return_counts=True)
            mapped = np.array([self.source_codes.get(int(v), 0) for v in values], dtype=np.uint8)
            land_cover = mapped[inverse].reshape(product.shape)
            code_counts = dict(zip(values.tolist(), counts.tolist(), strict=True))
        nodata = sum(n for c, n in code_counts.items() if c in self.nodata_codes)
        excluded = {c: n for c, n in code_counts.items() if c in self.excluded_codes}
        unknown = {
            c: n for c, n in code_counts.items()
            if c not in self.source_codes and c not in self.nodata_codes and c not in self.excluded_codes
        }  # fmt: skip
        return MappedCodes(land_cover=land_cover, nodata_pixels=nodata, excluded=excluded, unknown=unknown)

    def class_pixels(self, land_cover: np.ndarray) -> Counter[str]:
        """Pixels per class name of a class-code array (nodata 0 not counted)."""
        counts = np.bincount(np.asarray(land_cover, dtype=np.uint8).ravel(), minlength=256)
        return Counter({n: int(counts[c]) for n, c in zip(self.class_names, self.class_codes, strict=True)})

    def describe(self) -> dict[str, object]:
        """JSON-friendly summary (for the cube's attributes and MLflow)."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "class_codes": list(self.class_codes),
            "source_codes": {str(k): v for k, v in sorted(self.source_codes.items())},
            "nodata_codes": list(self.nodata_codes),
            "excluded_codes": {str(k): v for k, v in sorted(self.excluded_codes.items())},
        }


def _identity_scheme(name: str, classes: Mapping[int, str], **kwargs: object) -> ClassScheme:
    return ClassScheme(name, tuple(classes.values()), tuple(classes), {c: c for c in classes}, **kwargs)  # type: ignore[arg-type]


WORLDCOVER = _identity_scheme(
    "worldcover",
    {10: "Tree cover", 20: "Shrubland", 30: "Grassland", 40: "Cropland", 50: "Built-up",
     60: "Bare / sparse vegetation", 70: "Snow and ice", 80: "Permanent water bodies",
     90: "Herbaceous wetland", 95: "Mangroves", 100: "Moss and lichen"},
)  # fmt: skip
"""ESA WorldCover 10 m, 2020 v100 and 2021 v200 (same legend); 0 is nodata. Codes are kept as they are."""

_DYNAMIC_WORLD_NAMES = ("water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built",
                        "bare", "snow_and_ice")  # fmt: skip
DYNAMIC_WORLD = ClassScheme(
    "dynamic-world",
    _DYNAMIC_WORLD_NAMES,
    tuple(range(1, 10)),
    {code: code + 1 for code in range(9)},
    nodata_codes=(),
)
"""Google Dynamic World ``label`` band, 0 water .. 8 snow_and_ice, written as 1..9 because 0 is the cube's
nodata. The band itself has no nodata code: masked pixels come from the raster's nodata value or mask."""

IO_LULC = ClassScheme(
    "io-lulc",
    ("Water", "Trees", "Flooded vegetation", "Crops", "Built area", "Bare ground", "Snow/ice", "Rangeland"),
    (1, 2, 4, 5, 7, 8, 9, 11),
    {c: c for c in (1, 2, 4, 5, 7, 8, 9, 11)},
    nodata_codes=(0,),
    excluded_codes={10: "Clouds"},
)
"""Impact Observatory / Esri 10 m annual LULC (Planetary Computer ``io-lulc-annual-v02``); 0 is nodata and
10 "Clouds" is no land-cover observation, so it is excluded (reported, written as nodata)."""

CORINE_LEVEL3: dict[int, tuple[int, str]] = {
    111: (1, "Continuous urban fabric"), 112: (2, "Discontinuous urban fabric"),
    121: (3, "Industrial or commercial units"), 122: (4, "Road and rail networks and associated land"),
    123: (5, "Port areas"), 124: (6, "Airports"), 131: (7, "Mineral extraction sites"), 132: (8, "Dump sites"),
    133: (9, "Construction sites"), 141: (10, "Green urban areas"), 142: (11, "Sport and leisure facilities"),
    211: (12, "Non-irrigated arable land"), 212: (13, "Permanently irrigated land"), 213: (14, "Rice fields"),
    221: (15, "Vineyards"), 222: (16, "Fruit trees and berry plantations"), 223: (17, "Olive groves"),
    231: (18, "Pastures"), 241: (19, "Annual crops associated with permanent crops"),
    242: (20, "Complex cultivation patterns"),
    243: (21, "Land principally occupied by agriculture, with significant areas of natural vegetation"),
    244: (22, "Agro-forestry areas"), 311: (23, "Broad-leaved forest"), 312: (24, "Coniferous forest"),
    313: (25, "Mixed forest"), 321: (26, "Natural grassland"), 322: (27, "Moors and heathland"),
    323: (28, "Sclerophyllous vegetation"), 324: (29, "Transitional woodland/shrub"),
    331: (30, "Beaches, dunes, sands"), 332: (31, "Bare rock"), 333: (32, "Sparsely vegetated areas"),
    334: (33, "Burnt areas"), 335: (34, "Glaciers and perpetual snow"), 411: (35, "Inland marshes"),
    412: (36, "Peatbogs"), 421: (37, "Salt marshes"), 422: (38, "Salines"), 423: (39, "Intertidal flats"),
    511: (40, "Water courses"), 512: (41, "Water bodies"), 521: (42, "Coastal lagoons"), 522: (43, "Estuaries"),
    523: (44, "Sea and ocean"),
}  # fmt: skip
"""CORINE Land Cover level-3 code -> (raster grid code of the EEA GeoTIFFs, class name as BigEarthNet writes it).
BigEarthNet uses 43 of these 44 (no "Glaciers and perpetual snow")."""

CORINE_NODATA_CODES = (0, 48, 49, 50, 128, 255, 990, 995, 999)
"""CORINE no-data codes: 48 NODATA, 49/50 unclassified land/water, 128/255 raster fill; 990/995/999 in vectors."""

BEN19_FROM_CORINE: dict[str, str] = {
    "Continuous urban fabric": "Urban fabric",
    "Discontinuous urban fabric": "Urban fabric",
    "Industrial or commercial units": "Industrial or commercial units",
    "Non-irrigated arable land": "Arable land",
    "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land",
    "Vineyards": "Permanent crops",
    "Fruit trees and berry plantations": "Permanent crops",
    "Olive groves": "Permanent crops",
    "Annual crops associated with permanent crops": "Permanent crops",
    "Pastures": "Pastures",
    "Complex cultivation patterns": "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas": "Agro-forestry areas",
    "Broad-leaved forest": "Broad-leaved forest",
    "Coniferous forest": "Coniferous forest",
    "Mixed forest": "Mixed forest",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub": "Transitional woodland, shrub",
    "Beaches, dunes, sands": "Beaches, dunes, sands",
    "Inland marshes": "Inland wetlands",
    "Peatbogs": "Inland wetlands",
    "Salt marshes": "Coastal wetlands",
    "Salines": "Coastal wetlands",
    "Water courses": "Inland waters",
    "Water bodies": "Inland waters",
    "Coastal lagoons": "Marine waters",
    "Estuaries": "Marine waters",
    "Sea and ocean": "Marine waters",
}  # fmt: skip
"""BigEarthNet 19-class nomenclature (Sumbul et al., 2021, Table 1) from the CORINE 43-class names."""

_BEN19_NAMES = tuple(dict.fromkeys(BEN19_FROM_CORINE.values()))


def _corine_bigearthnet19() -> ClassScheme:
    ben_code = {name: i + 1 for i, name in enumerate(_BEN19_NAMES)}
    source_codes: dict[int, int] = {}
    excluded: dict[int, str] = {}
    for level3, (grid_code, name) in CORINE_LEVEL3.items():
        if name in BEN19_FROM_CORINE:
            # Both numberings: level-3 codes (vectors, 111..523) and EEA raster grid codes (1..44) do not overlap.
            source_codes[level3] = source_codes[grid_code] = ben_code[BEN19_FROM_CORINE[name]]
        else:
            excluded[level3] = excluded[grid_code] = name
    # The official CORINE spellings where BigEarthNet's differ.
    aliases = {"Natural grasslands": "Natural grassland", "Peat bogs": "Peatbogs", "Bare rocks": "Bare rock",
               "Transitional woodland-shrub": "Transitional woodland/shrub"}  # fmt: skip
    source_names = dict(BEN19_FROM_CORINE)
    source_names.update(
        {alias: BEN19_FROM_CORINE[name] for alias, name in aliases.items() if name in BEN19_FROM_CORINE}
    )
    excluded_names = tuple(excluded.values()) + tuple(a for a, n in aliases.items() if n not in BEN19_FROM_CORINE)
    return ClassScheme(
        "corine-bigearthnet19", _BEN19_NAMES, tuple(range(1, 20)), source_codes, nodata_codes=CORINE_NODATA_CODES,
        excluded_codes=excluded, source_names=source_names, excluded_names=excluded_names,
    )  # fmt: skip


CORINE_BIGEARTHNET19 = _corine_bigearthnet19()
"""CORINE 43 -> BigEarthNet 19. The 11 CORINE classes without a 19-class counterpart (roads, ports, airports,
mines, dumps, construction, green urban, sport, bare rock, burnt areas, intertidal flats, and glaciers) are
excluded: written as nodata and reported per code."""

SCHEMES: dict[str, ClassScheme] = {s.name: s for s in (WORLDCOVER, DYNAMIC_WORLD, IO_LULC, CORINE_BIGEARTHNET19)}

COLLECTION_SCHEMES: dict[str, str] = {"esa-worldcover": "worldcover", "io-lulc-annual-v02": "io-lulc",
                                      "io-lulc-9-class": "io-lulc", "io-lulc": "io-lulc"}  # fmt: skip
"""Default scheme of known STAC collections (Planetary Computer ids)."""


class _YamlClass(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    code: int | None = Field(default=None, ge=1, le=255, description="Class code in the cube; default position+1.")
    source_codes: list[int] = Field(default_factory=list)
    source_names: list[str] = Field(default_factory=list)


class _YamlScheme(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    classes: list[_YamlClass] = Field(min_length=1)
    nodata: list[int] = Field(default=[0])
    exclude: dict[int, str] | list[int] = Field(default_factory=dict)


YAML_EXAMPLE = """\
name: forest-water          # scheme id, recorded in the cube
nodata: [0]                 # product codes meaning no data
exclude: {70: Snow and ice} # product codes known but kept out of every class (reported)
classes:                    # target classes in order; class code = position + 1 unless `code:` is given
  - name: Forest
    source_codes: [10, 95]
    source_names: [Tree cover, Mangroves]   # optional, for vector attributes holding names
  - name: Water
    source_codes: [80]
"""


def load_scheme_yaml(path: str | Path) -> ClassScheme:
    """A custom scheme from a YAML mapping of product codes to target classes.

    Format (``YAML_EXAMPLE``)::

        name: forest-water
        nodata: [0]
        exclude: {70: Snow and ice}
        classes:
          - {name: Forest, source_codes: [10, 95], source_names: [Tree cover, Mangroves]}
          - {name: Water, source_codes: [80]}

    Raises:
        ValueError: a missing file, bad YAML, a product code in two classes, or codes outside 1..255.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"class scheme file {path} does not exist; give a built-in scheme {sorted(SCHEMES)} or a YAML file"
        )
    try:
        spec = _YamlScheme.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as error:
        raise ValueError(
            f"class scheme file {path} is not a valid scheme ({error}); expected:\n{YAML_EXAMPLE}"
        ) from error
    source_codes: dict[int, int] = {}
    source_names: dict[str, str] = {}
    class_codes: list[int] = []
    for position, cls in enumerate(spec.classes):
        code = cls.code if cls.code is not None else position + 1
        class_codes.append(code)
        for source in cls.source_codes:
            if source in source_codes:
                raise ValueError(f"class scheme file {path}: product code {source} is in two classes")
            source_codes[source] = code
        source_names.update({name: cls.name for name in cls.source_names})
    exclude = spec.exclude if isinstance(spec.exclude, dict) else {code: str(code) for code in spec.exclude}
    return ClassScheme(
        spec.name, tuple(c.name for c in spec.classes), tuple(class_codes), source_codes,
        nodata_codes=tuple(spec.nodata), excluded_codes=exclude, source_names=source_names,
    )  # fmt: skip


FIELD_SCHEME = "field"
"""The scheme name that takes a vector source's class attribute's own values as the classes."""


def scheme_from_values(
    name: str, values: Iterable[object], names: Mapping[object, object] | None = None
) -> ClassScheme:
    """One class per distinct value of a vector attribute, so a user's polygons work without a YAML scheme.

    Integer values 1..255 keep their value as the class code; other values (names, other numbers) get codes
    1..N in sorted order. Class names come from ``names`` (value -> name, e.g. another attribute) or the value.

    Raises:
        ValueError: no value at all, or more than 255 distinct values (the cube's ``landcover`` is uint8).
    """
    distinct = sorted({v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))}, key=str)
    if not distinct:
        raise ValueError(f"scheme {name}: the class attribute holds no value")
    if len(distinct) > 255:
        raise ValueError(f"scheme {name}: {len(distinct)} distinct class values; a scheme holds at most 255")
    as_int = {value: _integer(value) for value in distinct}
    integer_codes = {value: code for value, code in as_int.items() if code is not None and 1 <= code <= 255}
    code_of = integer_codes if len(integer_codes) == len(distinct) else {v: i + 1 for i, v in enumerate(distinct)}
    ordered = sorted(distinct, key=code_of.__getitem__)
    class_names: list[str] = []
    seen = Counter[str]()
    for value in ordered:
        as_text = str(as_int[value]) if as_int[value] is not None else str(value)
        label = str((names or {}).get(value, as_text)).strip() or as_text
        seen[label] += 1
        class_names.append(label if seen[label] == 1 else f"{label} ({value})")
    source_codes = {code: code_of[value] for value, code in as_int.items() if code is not None}
    source_names = {str(value): class_names[i] for i, value in enumerate(ordered) if as_int[value] is None}
    return ClassScheme(
        name, tuple(class_names), tuple(code_of[value] for value in ordered), source_codes,
        nodata_codes=(), source_names=source_names,
    )  # fmt: skip


def _integer(value: object) -> int | None:
    """The value as an integer code when it is one (an int, an integral float, a string of digits)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def scheme_skeleton(unknown: Mapping[str, int], name: str = "my-scheme") -> str:
    """A YAML scheme for codes a scheme did not know, one class per code with its pixel count, to be named."""
    lines = [f"name: {name}", "nodata: [0]", "classes:"]
    for code, pixels in sorted(unknown.items(), key=lambda kv: -kv[1]):
        entry = f"source_codes: [{code}]" if _integer(code) is not None else f'source_names: ["{code}"]'
        lines += [f"  - name: class {code}    # {pixels} pixels", f"    {entry}"]
    return "\n".join(lines) + "\n"


def get_scheme(name: str | None, *, collection: str | None = None) -> ClassScheme:
    """A built-in scheme by name, a YAML scheme by path, or (name None) the default for a collection.

    Raises:
        ValueError: an unknown name (listing the known ones) or a bad YAML file.
    """
    if name is None:
        name = COLLECTION_SCHEMES.get(collection or "", "worldcover")
    if name in SCHEMES:
        return SCHEMES[name]
    if name.lower().endswith((".yaml", ".yml")):
        return load_scheme_yaml(name)
    raise ValueError(f"unknown class scheme {name!r}; known: {sorted(SCHEMES)}, or a path to a .yaml mapping")
