"""Land-cover class schemes: which product codes a stage keeps, and their class names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClassScheme:
    """A list of classes, each a product code with a name."""

    name: str
    """Scheme id (``worldcover``, ``dynamic-world``, ``corine-bigearthnet19``)."""
    codes: tuple[int, ...]
    """Product codes of the classes, in class order."""
    class_names: tuple[str, ...]
    """Class names, aligned with ``codes``."""
    nodata: int | None = 0
    """Product code meaning no data (not a class)."""
    source_names: dict[str, str] = field(default_factory=dict)
    """Optional mapping of a source nomenclature's names to ``class_names`` (CORINE 43 -> BigEarthNet 19)."""

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.class_names):
            raise ValueError(f"scheme {self.name}: {len(self.codes)} codes but {len(self.class_names)} names")

    def name_of(self, code: int) -> str:
        """Class name of a product code; raises ``KeyError`` for a code outside the scheme."""
        return dict(zip(self.codes, self.class_names, strict=True))[code]


WORLDCOVER = ClassScheme(
    "worldcover",
    (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100),
    ("Tree cover", "Shrubland", "Grassland", "Cropland", "Built-up", "Bare / sparse vegetation",
     "Snow and ice", "Permanent water bodies", "Herbaceous wetland", "Mangroves", "Moss and lichen"),
)  # fmt: skip
"""ESA WorldCover 10 m v100/v200 (2020, 2021); 0 is nodata."""

DYNAMIC_WORLD = ClassScheme(
    "dynamic-world",
    (0, 1, 2, 3, 4, 5, 6, 7, 8),
    ("water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built", "bare", "snow_and_ice"),
    nodata=None,
)
"""Google Dynamic World ``label`` band (code 0 is water, so it has no nodata code; mask separately)."""

_BEN19_FROM_CORINE: dict[str, str] = {
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
"""BigEarthNet 19-class nomenclature (Sumbul et al., 2021) from CORINE 43-class names; the other CORINE
classes (roads, ports, airports, mines, dumps, construction, green urban, sport, bare rock, burnt areas,
intertidal flats) have no 19-class counterpart and are dropped."""

_BEN19_NAMES = tuple(dict.fromkeys(_BEN19_FROM_CORINE.values()))
CORINE_BIGEARTHNET19 = ClassScheme(
    "corine-bigearthnet19", tuple(range(1, 20)), _BEN19_NAMES, source_names=_BEN19_FROM_CORINE
)

SCHEMES: dict[str, ClassScheme] = {s.name: s for s in (WORLDCOVER, DYNAMIC_WORLD, CORINE_BIGEARTHNET19)}


def get_scheme(name: str) -> ClassScheme:
    """A scheme by name; raises ``ValueError`` naming the known ones (``io-lulc`` and YAML files: later)."""
    if name not in SCHEMES:
        raise ValueError(f"unknown class scheme {name!r}; known: {sorted(SCHEMES)}")
    return SCHEMES[name]
