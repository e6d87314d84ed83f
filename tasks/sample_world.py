"""The structured sample world: a generative model of what makes real land cover hard to tell apart.

Classes share their materials' spectra and differ by how the materials are laid out in space: cropland
is parcels with straight boundaries and row stripes, grassland the same herbaceous states in smooth
patches, forest clumpy or compartmented canopy, built-up street grids with bright points, water smooth
bodies, wetland and shrubland fine mixtures. Each date adds phenology, illumination, haze and sensor
noise; clouds and their shadows are drawn as for the painted world. Two label products come out of the
same landscape: a coarse, noisy Dynamic-World-like map (pretraining labels) and CORINE level-3 names per
BigEarthNet-format patch (evaluation labels). docs/sample_world.md writes the model down.

Every function is pure: a function of (rng, shapes, params) that reads and writes no file and keeps no
state; ``tasks/sample_data.py`` writes what they return.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BANDS",
    "CLASSES",
    "DYNAMIC_WORLD_NODATA",
    "MATERIALS",
    "Atmosphere",
    "Clouds",
    "LandCoverClass",
    "Landscape",
    "WorldParams",
    "apply_clouds",
    "block_mode",
    "corine_labels",
    "draw_atmosphere",
    "draw_clouds",
    "draw_landscape",
    "dynamic_world_labels",
    "material_cover",
    "render_backscatter",
    "render_reflectance",
    "smooth_field",
]

BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


@dataclass(frozen=True)
class LandCoverClass:
    """One land-cover class of the world, named in each nomenclature that labels it."""

    key: str
    """Short id used in code and docs."""
    corine: str
    """CORINE level-3 name as BigEarthNet writes it (evaluation labels)."""
    worldcover: int
    """ESA WorldCover code (the WorldCover-format map)."""
    dynamic_world: int
    """Dynamic World label 0..8 (pretraining labels) before label noise."""
    weight: float
    """Share of the landscape's regions drawn as this class."""


CLASSES: tuple[LandCoverClass, ...] = (
    LandCoverClass("arable", "Non-irrigated arable land", 40, 4, 0.22),
    LandCoverClass("pasture", "Pastures", 30, 2, 0.16),
    LandCoverClass("broadleaf", "Broad-leaved forest", 10, 1, 0.11),
    LandCoverClass("conifer", "Coniferous forest", 10, 1, 0.12),
    LandCoverClass("mixed_forest", "Mixed forest", 10, 1, 0.11),
    LandCoverClass("shrub", "Transitional woodland/shrub", 20, 5, 0.09),
    LandCoverClass("urban_continuous", "Continuous urban fabric", 50, 6, 0.03),
    LandCoverClass("urban_discontinuous", "Discontinuous urban fabric", 50, 6, 0.05),
    LandCoverClass("industrial", "Industrial or commercial units", 50, 6, 0.03),
    LandCoverClass("water", "Water bodies", 80, 0, 0.05),
    LandCoverClass("marsh", "Inland marshes", 90, 3, 0.03),
)
"""The world's classes; ``Landscape.classes`` holds indices into this tuple."""
_CLASS = {c.key: i for i, c in enumerate(CLASSES)}

MATERIALS: tuple[str, ...] = ("leaf", "dry", "soil", "canopy", "roof", "asphalt", "water")
"""Surface materials every pixel is a mixture of (abundances sum to 1)."""
LEAF, DRY, SOIL, CANOPY, ROOF, ASPHALT, WATER = range(len(MATERIALS))
FIXED = (CANOPY, ROOF, ASPHALT, WATER)
"""Materials that do not change over the dates; the rest of a pixel is herbaceous (leaf, dry, soil)."""

# Surface reflectance x10000 per material, bands in BANDS order (library-like shapes: green vegetation has the red
# edge and NIR plateau, tree canopy is darker than grass in NIR and SWIR, straw and soil rise into the SWIR, roofs
# are bright and flat, asphalt dark and flat, clear water dark beyond red).
SPECTRA = np.array(
    [
        (300, 350, 650, 350, 1000, 2700, 3300, 3600, 3700, 1100, 1900, 900),  # leaf: grass, crops, reeds
        (600, 750, 1050, 1250, 1550, 1950, 2150, 2350, 2450, 800, 3300, 2300),  # dry: straw, stubble, litter
        (900, 1100, 1400, 1700, 1900, 2100, 2200, 2300, 2400, 800, 3000, 2500),  # soil: bare tilled soil
        (220, 270, 520, 270, 800, 2300, 2900, 3200, 3300, 1000, 1500, 700),  # canopy: tree crowns
        (1300, 1400, 1500, 1650, 1750, 1850, 1900, 1950, 2000, 700, 2300, 2100),  # roof: tiles, concrete, metal
        (700, 750, 800, 850, 880, 900, 920, 950, 970, 350, 1100, 1000),  # asphalt: roads, car parks
        (450, 500, 600, 400, 300, 200, 180, 150, 140, 60, 80, 50),  # water: clear inland water
    ],
    dtype=np.float32,
)  # (material, band)
HAZE_SPECTRUM = np.array((600, 500, 350, 220, 170, 140, 120, 100, 95, 40, 25, 15), dtype=np.float32)
"""Path radiance of a hazy day, x10000: Rayleigh/aerosol scattering falls steeply with wavelength."""
CLOUD_SPECTRUM = (7000, 7200, 7000, 7100, 7000, 6900, 6800, 6800, 6700, 2500, 4000, 2800)

# C-band (VV, VH) backscatter in dB per material: volume scattering of crowns, rough fields, dark calm water.
BACKSCATTER_DB = np.array(
    [(-11.0, -18.0), (-12.0, -19.5), (-13.0, -21.0), (-7.5, -13.5), (-6.0, -13.0), (-16.0, -25.0), (-20.0, -27.0)],
    dtype=np.float32,
)  # (material, polarisation)

LUSH, SPARSE, CUT = range(3)
"""Herbaceous states, shared by cropland and grassland: a wheat field and a lush meadow look alike at 10 m, so
do a maize field at emergence and an overgrazed pasture (soil through sparse green), and a harvested field and
a mown meadow (straw). The wet meadow between a marsh's pools takes the same states."""
HERB_STATE_WEIGHTS = (0.4, 0.3, 0.3)
"""Shares of LUSH, SPARSE and CUT, the same for cropland parcels and grassland patches."""

DYNAMIC_WORLD_NODATA = 255
"""Nodata of the Dynamic-World-like raster (its labels 0..8 use 0 for water)."""
_DW_WATER, _DW_TREES, _DW_GRASS, _DW_FLOODED, _DW_CROPS, _DW_SHRUB, _DW_BUILT, _DW_BARE = range(8)
# Dynamic World labels land cover per pixel, not land use: a pixel dominated by one material takes its class.
_DW_OF_MATERIAL = {CANOPY: _DW_TREES, WATER: _DW_WATER, ROOF: _DW_BUILT, ASPHALT: _DW_BUILT, SOIL: _DW_BARE}
# Classes a Dynamic World classifier confuses with each label (whole regions and single pixels).
_DW_CONFUSED = {
    _DW_WATER: (_DW_FLOODED,), _DW_TREES: (_DW_SHRUB,), _DW_GRASS: (_DW_CROPS, _DW_SHRUB),
    _DW_FLOODED: (_DW_GRASS, _DW_WATER), _DW_CROPS: (_DW_GRASS, _DW_BARE), _DW_SHRUB: (_DW_TREES, _DW_GRASS),
    _DW_BUILT: (_DW_BARE, _DW_GRASS), _DW_BARE: (_DW_CROPS,),
}  # fmt: skip


@dataclass(frozen=True)
class WorldParams:
    """The numbers of the structured world (docs/sample_world.md says what each stands for)."""

    region_px: float = 110.0
    """Mean side of a land-cover region in 10 m pixels (a 120 px patch holds 1-4 regions)."""
    warp: float = 0.3
    """Amplitude of the smooth warp of region boundaries, as a fraction of ``region_px``."""
    row_amplitude: float = 0.35
    """Green-fraction modulation of crop rows and tramlines (and of the grassland's isotropic grain)."""
    gain_range: tuple[float, float] = (0.85, 1.15)
    """Per-scene illumination gain (sun elevation, BRDF, slope of the day's atmosphere correction)."""
    haze_range: tuple[float, float] = (0.0, 1.0)
    """Per-scene haze amount, in units of ``HAZE_SPECTRUM``."""
    noise_dn: float = 15.0
    """Additive sensor noise, reflectance x10000."""
    noise_relative: float = 0.01
    """Multiplicative (shot-like) sensor noise."""
    label_min_fraction: float = 0.05
    """A CORINE class is a patch label when it covers at least this fraction of the patch."""
    dw_factor: int = 3
    """Dynamic-World-like map pixel, in 10 m pixels (3: 30 m)."""
    dw_region_swap: float = 0.15
    """Probability that a whole region gets a confused Dynamic World class."""
    dw_pixel_flip: float = 0.05
    """Probability that a coarse Dynamic World pixel gets a confused class."""
    dw_material_rule: float = 0.7
    """Probability that a pixel dominated by one material is labelled by that material (land cover, not use)."""
    eval_blocks: int = 48
    """Evaluation blocks; each is an independent landscape cut into ``eval_block_patches``² patches."""
    eval_block_patches: int = 4
    """Patches per side of an evaluation block."""


@dataclass(frozen=True)
class Landscape:
    """Land cover and the date-independent layout of materials over a (y, x) grid of 10 m pixels."""

    classes: np.ndarray
    """(y, x) uint8 index into ``CLASSES``."""
    regions: np.ndarray
    """(y, x) int32 region id (a region holds one class)."""
    fixed: np.ndarray
    """(4, y, x) float32 abundances of canopy, roof, asphalt, water (``FIXED``)."""
    herb_state: np.ndarray
    """(y, x) uint8 herbaceous state (LUSH, SPARSE, CUT) of the rest of the pixel."""
    herb_stage: np.ndarray
    """(y, x) float32 in [0, 1]: how far along its phenology the herbaceous state is."""
    texture: np.ndarray
    """(y, x) float32 signed relative modulation of the green fraction (rows, swaths, grain)."""
    brightness: np.ndarray
    """(y, x) float32 multiplicative brightness: crown shading, roof albedo, bright points, turbidity."""
    backscatter_offset: np.ndarray
    """(y, x) float32 dB added to S1: double bounce of buildings and flooded vegetation, row direction."""


# --- random fields and block operations ---------------------------------------------------------------------


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (Gaussian-filtered white noise, via FFT)."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * scale_px) ** 2 * (fx**2 + fy**2))
    field = np.real(np.fft.ifft2(np.fft.fft2(noise) * kernel))
    return (field - field.mean()) / (field.std() + 1e-12)


def _blur(array: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur via FFT (periodic edges: what wraps around is random texture or lies in a margin)."""
    fy = np.fft.fftfreq(array.shape[0])[:, None]
    fx = np.fft.rfftfreq(array.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(array) * kernel, s=array.shape)


def block_mode(codes: np.ndarray, factor: int, n_codes: int) -> np.ndarray:
    """Majority code of each ``factor`` x ``factor`` block (edges padded by replication; ties to the lower code)."""
    h, w = codes.shape
    padded = np.pad(codes, ((0, -h % factor), (0, -w % factor)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    counts = np.stack([(blocks == code).sum(axis=(1, 3)) for code in range(n_codes)])  # (code, y', x')
    return counts.argmax(axis=0).astype(np.uint8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


# --- landscape ----------------------------------------------------------------------------------------------


def _regions(rng: np.random.Generator, shape: tuple[int, int], params: WorldParams) -> np.ndarray:
    """Warped Voronoi regions seeded on a jittered grid: compact regions of similar size with wavy boundaries."""
    h, w = shape
    step = params.region_px
    gy, gx = np.meshgrid(np.arange(-0.5, h / step + 0.5), np.arange(-0.5, w / step + 0.5), indexing="ij")
    seeds_y = (gy.ravel() + rng.uniform(0.1, 0.9, gy.size)) * step
    seeds_x = (gx.ravel() + rng.uniform(0.1, 0.9, gx.size)) * step
    amplitude = params.warp * step
    yy = np.arange(h, dtype=np.float32)[:, None] + amplitude * smooth_field(rng, shape, step / 3)
    xx = np.arange(w, dtype=np.float32)[None, :] + amplitude * smooth_field(rng, shape, step / 3)
    best = np.zeros(shape, dtype=np.int32)
    best_d = np.full(shape, np.inf, dtype=np.float32)
    for i, (sy, sx) in enumerate(zip(seeds_y, seeds_x, strict=True)):
        d = (yy - sy) ** 2 + (xx - sx) ** 2
        closer = d < best_d
        best[closer], best_d[closer] = i, d[closer]
    return best


@dataclass(frozen=True)
class _Frame:
    """One region's bounding box: its slices, mask and pixel coordinates."""

    slices: tuple[slice, slice]
    mask: np.ndarray
    yy: np.ndarray
    xx: np.ndarray

    def rotated(self, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (along, across) in a frame rotated by ``angle`` radians."""
        c, s = np.cos(angle), np.sin(angle)
        return self.xx * c + self.yy * s, -self.xx * s + self.yy * c


def _herb_states(rng: np.random.Generator, n: int | tuple[int, ...]) -> np.ndarray:
    return rng.choice(np.array([LUSH, SPARSE, CUT], dtype=np.uint8), size=n, p=HERB_STATE_WEIGHTS)


def _grid_cells(along: np.ndarray, across: np.ndarray, length: float, width: float) -> tuple[np.ndarray, ...]:
    """Cell indices (i, j) of a grid of ``length`` x ``width`` cells and each pixel's distance to the cell edge."""
    j = np.floor(across / width)
    offset = (j % 7) * 0.37 * length  # neighbouring strips end at different places, as field ends do
    i = np.floor((along + offset) / length)
    edge = np.minimum.reduce([(along + offset) - i * length, (i + 1) * length - (along + offset),
                              across - j * width, (j + 1) * width - across])  # fmt: skip
    return (i - i.min()).astype(np.int64), (j - j.min()).astype(np.int64), edge


_PARCEL_TABLE = (64, 64)
"""Cells of the per-parcel (per-stand, per-block) draws; a region never spans more than 64 cells a side."""


def _lookup(table: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return table[i % table.shape[0], j % table.shape[1]]


class _Canvas:
    """Work arrays that the class painters fill region by region (private; ``draw_landscape`` freezes them)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.fixed = np.zeros((len(FIXED), *shape), dtype=np.float32)
        self.herb_state = np.full(shape, LUSH, dtype=np.uint8)
        self.herb_stage = np.zeros(shape, dtype=np.float32)
        self.texture = np.zeros(shape, dtype=np.float32)
        self.brightness = np.ones(shape, dtype=np.float32)
        self.backscatter_offset = np.zeros(shape, dtype=np.float32)

    def put(self, frame: _Frame, **layers: np.ndarray | float) -> None:
        """Write layers (arrays over the frame, or scalars) where the frame's mask is set."""
        ys, xs = frame.slices
        for name, value in layers.items():
            if name in ("canopy", "roof", "asphalt", "water"):
                target = self.fixed[FIXED.index(MATERIALS.index(name)), ys, xs]
            else:
                target = getattr(self, name)[ys, xs]
            target[frame.mask] = np.broadcast_to(value, frame.mask.shape)[frame.mask]


def _paint_arable(rng: np.random.Generator, canvas: _Canvas, frame: _Frame, params: WorldParams) -> None:
    """Parcels: straight-edged strips, each one herbaceous state and stage, with rows along the strip."""
    angle = rng.uniform(0, np.pi)
    along, across = frame.rotated(angle)
    i, j, _ = _grid_cells(along, across, rng.uniform(18, 40), rng.uniform(7, 14))
    states = _herb_states(rng, _PARCEL_TABLE)
    stages = rng.uniform(0, 1, _PARCEL_TABLE).astype(np.float32)
    period = rng.uniform(2.2, 3.5, _PARCEL_TABLE)
    rows = params.row_amplitude * np.cos(2 * np.pi * across / _lookup(period, i, j))
    # Rows facing the radar (across its range direction, x) scatter more than rows along it: +-1 dB.
    canvas.put(frame, herb_state=_lookup(states, i, j), herb_stage=_lookup(stages, i, j), texture=rows,
               backscatter_offset=2.0 * (abs(np.sin(angle)) - 0.5))  # fmt: skip


def _paint_pasture(rng: np.random.Generator, canvas: _Canvas, frame: _Frame, params: WorldParams) -> None:
    """Meadows: the cropland's herbaceous states in smooth patches (grazing, mowing) with an isotropic grain."""
    shape = frame.mask.shape
    patch = smooth_field(rng, shape, 5.0)
    cuts = np.quantile(patch, np.cumsum(HERB_STATE_WEIGHTS)[:-1])
    state = np.array([LUSH, SPARSE, CUT], dtype=np.uint8)[np.searchsorted(cuts, patch)]
    stage = _sigmoid(1.7 * smooth_field(rng, shape, 6.0)).astype(np.float32)  # ~uniform on [0, 1]
    grain = params.row_amplitude * np.sqrt(0.5) * smooth_field(rng, shape, 0.6)  # same variance as the rows
    canvas.put(frame, herb_state=state, herb_stage=stage, texture=grain.astype(np.float32))


def _broadleaf_crowns(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Clumpy canopy: crowns and gaps correlated over ~2 pixels (unit-variance Gaussian field)."""
    return smooth_field(rng, shape, 2.2)


def _conifer_crowns(rng: np.random.Generator, frame: _Frame) -> np.ndarray:
    """Compartments of even-aged stands (straight edges, one density each) with a fine, uncorrelated grain.

    Half the variance is between compartments and half is grain, so the field has the broad-leaved one's
    unit-variance Gaussian marginal: the two forests share every per-pixel statistic and differ in layout.
    """
    along, across = frame.rotated(rng.uniform(0, np.pi))
    i, j, _ = _grid_cells(along, across, rng.uniform(25, 45), rng.uniform(18, 30))
    stand = _lookup(rng.standard_normal(_PARCEL_TABLE), i, j)
    return np.sqrt(0.5) * stand + np.sqrt(0.5) * smooth_field(rng, frame.mask.shape, 0.5)


def _paint_forest(rng: np.random.Generator, canvas: _Canvas, frame: _Frame, kind: str) -> None:
    """Broad-leaved (clumpy), coniferous (compartments) or mixed (a mosaic of both) canopy over lush understory.

    A crown field n sets canopy cover (closed where n is high) and shading (sunlit tops, shaded edges).
    """
    shape = frame.mask.shape
    if kind == "broadleaf":
        crowns = _broadleaf_crowns(rng, shape)
    elif kind == "conifer":
        crowns = _conifer_crowns(rng, frame)
    else:
        broad = smooth_field(rng, shape, 4.0) > 0
        crowns = np.where(broad, _broadleaf_crowns(rng, shape), _conifer_crowns(rng, frame))
    cover = _sigmoid(3 * (crowns + 1.0)).astype(np.float32)
    shade = (0.78 + 0.2 * np.tanh(crowns)).astype(np.float32)
    canvas.put(frame, canopy=cover, brightness=shade, herb_state=LUSH, herb_stage=0.3, texture=0.0)


def _paint_shrub(rng: np.random.Generator, canvas: _Canvas, frame: _Frame, params: WorldParams) -> None:
    """Transitional woodland/shrub: small scattered crowns over meadow-like herbaceous cover."""
    _paint_pasture(rng, canvas, frame, params)
    shape = frame.mask.shape
    cover_target = rng.uniform(0.3, 0.55)
    crowns = smooth_field(rng, shape, 1.0)
    level = np.quantile(crowns, 1 - cover_target)
    cover = _sigmoid(4 * (crowns - level)).astype(np.float32)
    canvas.put(frame, canopy=cover, brightness=(0.8 + 0.15 * np.tanh(crowns)).astype(np.float32))


def _paint_built(rng: np.random.Generator, canvas: _Canvas, frame: _Frame, kind: str) -> None:
    """Street grids: dense blocks (continuous), houses in gardens (discontinuous) or large halls (industrial)."""
    shape = frame.mask.shape
    along, across = frame.rotated(rng.uniform(0, np.pi / 2))
    block = {"urban_continuous": (6, 9), "urban_discontinuous": (8, 12), "industrial": (14, 24)}[kind]
    i, j, edge = _grid_cells(along, across, rng.uniform(*block), rng.uniform(*block))
    street = edge < (1.0 if kind == "industrial" else 0.6)
    albedo = _lookup(rng.uniform(0.7, 1.35, _PARCEL_TABLE), i, j)  # one roof material per block / hall
    bright = np.where(rng.uniform(0, 1, shape) < 0.04, rng.uniform(1.6, 2.6, shape), 1.0)  # specular points
    canopy = np.zeros(shape, dtype=np.float32)
    if kind == "urban_continuous":
        courtyard = (edge > 2.5) & (smooth_field(rng, shape, 0.8) > 0.9)
        roof = np.where(street | courtyard, 0.0, 0.92)
    elif kind == "industrial":
        hall = edge > _lookup(rng.uniform(1.0, 2.2, _PARCEL_TABLE), i, j)  # the hall, then its yard and car park
        roof = np.where(hall, 0.95, 0.0)
        street |= ~hall & (smooth_field(rng, shape, 1.0) > -0.2)
    else:
        houses = smooth_field(rng, shape, 0.7)
        roof = np.where(~street & (houses > 0.55), 0.9, 0.0)
        canopy = np.where(~street & (roof == 0), np.clip(0.6 * smooth_field(rng, shape, 1.2) - 0.1, 0, 0.8), 0.0)
    asphalt = np.where(street, 0.9, 0.0)
    canvas.put(
        frame, roof=roof.astype(np.float32), asphalt=asphalt.astype(np.float32), canopy=canopy.astype(np.float32),
        brightness=np.where(roof > 0, albedo * bright, 1.0).astype(np.float32), herb_state=LUSH, herb_stage=0.2,
        texture=0.0, backscatter_offset=np.where((roof > 0) & (bright > 1), 8.0, 0.0).astype(np.float32),
    )  # fmt: skip


def _paint_water(rng: np.random.Generator, canvas: _Canvas, frame: _Frame) -> None:
    """Open water with smooth turbidity; its shore is smoothed in ``draw_landscape``."""
    turbidity = 1 + 0.25 * smooth_field(rng, frame.mask.shape, 12.0)
    canvas.put(frame, water=1.0, brightness=turbidity.astype(np.float32), herb_state=LUSH, herb_stage=0.3)


def _paint_marsh(rng: np.random.Generator, canvas: _Canvas, frame: _Frame, params: WorldParams) -> None:
    """Inland marsh: small pools in wet meadow (the grassland's layout); flooded vegetation double-bounces radar."""
    _paint_pasture(rng, canvas, frame, params)
    pools = smooth_field(rng, frame.mask.shape, 1.8)
    level = np.quantile(pools, 1 - rng.uniform(0.3, 0.55))
    water = _sigmoid(4 * (pools - level)).astype(np.float32)
    canvas.put(frame, water=water, backscatter_offset=3.0 * (1 - water))


def draw_landscape(rng: np.random.Generator, shape: tuple[int, int], params: WorldParams) -> Landscape:
    """A landscape of ``shape`` 10 m pixels: regions, their classes, and each class's layout of materials."""
    regions = _regions(rng, shape, params)
    n_regions = int(regions.max()) + 1
    weights = np.array([c.weight for c in CLASSES])
    region_class = rng.choice(len(CLASSES), size=n_regions, p=weights / weights.sum()).astype(np.uint8)
    classes = region_class[regions]
    canvas = _Canvas(shape)
    rows, cols = np.indices(shape)
    top, left = np.full(n_regions, shape[0]), np.full(n_regions, shape[1])
    bottom, right = np.zeros(n_regions, dtype=np.int64), np.zeros(n_regions, dtype=np.int64)
    np.minimum.at(top, regions.ravel(), rows.ravel())
    np.minimum.at(left, regions.ravel(), cols.ravel())
    np.maximum.at(bottom, regions.ravel(), rows.ravel())
    np.maximum.at(right, regions.ravel(), cols.ravel())
    for region in np.flatnonzero(bottom >= top):  # regions that hold a pixel
        slices = (slice(top[region], bottom[region] + 1), slice(left[region], right[region] + 1))
        yy, xx = np.mgrid[slices].astype(np.float32)
        frame = _Frame(slices, regions[slices] == region, yy, xx)
        key = CLASSES[region_class[region]].key
        if key == "arable":
            _paint_arable(rng, canvas, frame, params)
        elif key == "pasture":
            _paint_pasture(rng, canvas, frame, params)
        elif key in ("broadleaf", "conifer", "mixed_forest"):
            _paint_forest(rng, canvas, frame, key)
        elif key == "shrub":
            _paint_shrub(rng, canvas, frame, params)
        elif key in ("urban_continuous", "urban_discontinuous", "industrial"):
            _paint_built(rng, canvas, frame, key)
        elif key == "water":
            _paint_water(rng, canvas, frame)
        else:
            _paint_marsh(rng, canvas, frame, params)
    # Smooth shores: open water fades into the neighbouring cover over ~2 pixels, on the water's side.
    water_body = classes == _CLASS["water"]
    shore = np.clip(_blur(water_body.astype(np.float32), 1.2) * 2 - 1, 0, 1).astype(np.float32)
    index = FIXED.index(WATER)
    canvas.fixed[index] = np.where(water_body, shore, canvas.fixed[index])
    total = canvas.fixed.sum(axis=0)
    canvas.fixed /= np.maximum(total, 1.0)  # fixed materials never exceed the pixel
    return Landscape(
        classes=classes, regions=regions, fixed=canvas.fixed, herb_state=canvas.herb_state,
        herb_stage=canvas.herb_stage, texture=canvas.texture, brightness=canvas.brightness,
        backscatter_offset=canvas.backscatter_offset,
    )  # fmt: skip


# --- one date ------------------------------------------------------------------------------------------------


def _herbaceous(state: np.ndarray, stage: np.ndarray, day: int) -> tuple[np.ndarray, ...]:
    """(green, dry, soil) fractions of the herbaceous part on date ``day`` (5 days apart), by state and stage.

    LUSH ripens (green turns to straw), SPARSE emerges (green grows over soil), CUT is green until its cut
    date and straw with some soil after.
    """
    green = np.empty(state.shape, dtype=np.float32)
    dry = np.empty(state.shape, dtype=np.float32)
    lush, sparse, cut = (state == s for s in (LUSH, SPARSE, CUT))
    green[lush] = np.clip(0.92 - 0.3 * stage[lush] - 0.05 * day, 0.2, 1)
    dry[lush] = 0.97 - green[lush]
    green[sparse] = np.clip(0.1 + 0.5 * stage[sparse] + 0.06 * day, 0, 0.9)
    dry[sparse] = 0.05
    cut_day = 6 * stage[cut] - 1.5
    after = day - cut_day
    green[cut] = np.where(after > 0, np.clip(0.15 + 0.06 * after, 0, 0.5), 0.85)
    dry[cut] = np.where(after > 0, 0.6, 0.12)
    soil = np.clip(1 - green - dry, 0, 1)
    return green, dry, soil


def material_cover(landscape: Landscape, day: int) -> np.ndarray:
    """(material, y, x) float32 abundances on date index ``day`` (phenology of the herbaceous part)."""
    green, dry, soil = _herbaceous(landscape.herb_state, landscape.herb_stage, day)
    # Rows and grain move cover between green and the rest (dry, soil in their proportion); the shift is
    # symmetric in the texture, so a zero-mean texture leaves the mean spectrum unchanged.
    shifted = np.clip(green + 2 * landscape.texture * green * (1 - green), 0, 1)
    rest = np.maximum(dry + soil, 1e-6)
    dry, soil = dry * (1 - shifted) / rest, soil * (1 - shifted) / rest
    herb = 1 - landscape.fixed.sum(axis=0)
    cover = np.empty((len(MATERIALS), *landscape.classes.shape), dtype=np.float32)
    cover[LEAF], cover[DRY], cover[SOIL] = herb * shifted, herb * dry, herb * soil
    for k, material in enumerate(FIXED):
        cover[material] = landscape.fixed[k]
    return cover


@dataclass(frozen=True)
class Atmosphere:
    """One scene's illumination and haze."""

    gain: np.ndarray
    """(band,) multiplicative gain (sun elevation and atmospheric correction residuals, a slight spectral tilt)."""
    haze: float
    """Haze amount, in units of ``HAZE_SPECTRUM``."""


def draw_atmosphere(rng: np.random.Generator, params: WorldParams) -> Atmosphere:
    """A scene's illumination gain (with a spectral tilt) and haze amount."""
    tilt = rng.uniform(-0.06, 0.06) * np.linspace(-1, 1, len(BANDS))
    gain = rng.uniform(*params.gain_range) * (1 + tilt)
    return Atmosphere(gain=gain.astype(np.float32), haze=float(rng.uniform(*params.haze_range)))


def render_reflectance(
    rng: np.random.Generator, landscape: Landscape, day: int, atmosphere: Atmosphere, params: WorldParams
) -> np.ndarray:
    """(band, y, x) float32 surface reflectance x10000 of a cloud-free scene on date index ``day``.

    Materials mix linearly; brightness (shading, roof albedo, bright points, turbidity) multiplies; the
    atmosphere adds a spatially smooth haze and scales each band; the sensor adds noise.
    """
    cover = material_cover(landscape, day)
    shape = landscape.classes.shape
    surface = np.tensordot(SPECTRA.T, cover, axes=1) * landscape.brightness  # (band, y, x)
    haze = atmosphere.haze * (1 + 0.4 * smooth_field(rng, shape, 40.0)).astype(np.float32)
    scene = surface * atmosphere.gain[:, None, None] + HAZE_SPECTRUM[:, None, None] * haze
    scene *= 1 + params.noise_relative * rng.standard_normal(scene.shape, dtype=np.float32)
    scene += params.noise_dn * rng.standard_normal(scene.shape, dtype=np.float32)
    return scene


@dataclass(frozen=True)
class Clouds:
    """Clouds and their shadows over one scene."""

    cloud: np.ndarray
    """(y, x) bool, any cloud."""
    thick: np.ndarray
    """(y, x) bool, opaque cloud (SCL 9)."""
    shadow: np.ndarray
    """(y, x) bool, cloud shadow on the ground (SCL 3)."""
    opacity: np.ndarray
    """(y, x) float, cloud opacity (0.6 at the edge .. 1)."""


def draw_clouds(rng: np.random.Generator, shape: tuple[int, int], target: float) -> Clouds:
    """Clouds covering about ``target`` of the scene, and their shadows cast down-right by the sun's angle."""
    width = shape[1]
    cloud_field = smooth_field(rng, shape, max(4, width / 12))
    cloud = cloud_field > np.quantile(cloud_field, 1 - target)
    thick = cloud_field > np.quantile(cloud_field, 1 - target * 0.6)
    shift = max(2, width // 20)
    shadow = np.roll(np.roll(cloud, shift, axis=0), shift, axis=1) & ~cloud
    opacity = np.clip((cloud_field - np.quantile(cloud_field, 1 - target)) * 2 + 0.6, 0.6, 1.0)
    return Clouds(cloud=cloud, thick=thick, shadow=shadow, opacity=opacity)


def apply_clouds(reflectance: np.ndarray, clouds: Clouds) -> np.ndarray:
    """``reflectance`` (band, y, x) with shadowed ground darkened and clouds blended over it."""
    clouded = reflectance.copy()
    clouded[:, clouds.shadow] *= 0.35
    cloud_spectrum = np.array(CLOUD_SPECTRUM, dtype=np.float64)[:, None]
    opacity = clouds.opacity[clouds.cloud]
    clouded[:, clouds.cloud] = clouded[:, clouds.cloud] * (1 - opacity) + cloud_spectrum * opacity
    return clouded


def render_backscatter(rng: np.random.Generator, landscape: Landscape, day: int) -> np.ndarray:
    """(2, y, x) float32 S1 (VV, VH) backscatter in dB: material mixture in power, structure offsets, speckle."""
    cover = material_cover(landscape, day)
    power = np.tensordot(10 ** (BACKSCATTER_DB.T / 10), cover, axes=1)  # (pol, y, x) linear
    offset = landscape.backscatter_offset + 0.8 * smooth_field(rng, landscape.classes.shape, 5.0)
    power *= 10 ** (offset.astype(np.float32) / 10)
    speckle = rng.gamma(4.4, 1 / 4.4, power.shape)  # a 4.4-look product, multiplicative in power
    return (10 * np.log10(power * speckle)).astype(np.float32)


# --- label products -------------------------------------------------------------------------------------------


def dynamic_world_labels(rng: np.random.Generator, landscape: Landscape, day: int, params: WorldParams) -> np.ndarray:
    """A coarse, noisy Dynamic-World-like label map (labels 0..8) at ``params.dw_factor`` x 10 m.

    Four departures from the land use the evaluation labels describe: a pixel dominated by one material is
    labelled by that material (trees in gardens, water in marsh pools, bare soil in fields); whole regions take
    a confused class; the majority over coarse pixels moves boundaries and drops small features; and single
    coarse pixels flip to a confused class.
    """
    dw_of_class = np.array([c.dynamic_world for c in CLASSES], dtype=np.uint8)
    region_class = np.zeros(int(landscape.regions.max()) + 1, dtype=np.uint8)
    region_class[landscape.regions.ravel()] = landscape.classes.ravel()  # one class per region
    region_label = dw_of_class[region_class]
    swap = rng.uniform(0, 1, region_label.size) < params.dw_region_swap
    region_label = np.where(swap, [rng.choice(_DW_CONFUSED[int(c)]) for c in region_label], region_label)
    labels = region_label[landscape.regions].astype(np.uint8)

    cover = material_cover(landscape, day)
    dominant = cover.argmax(axis=0)
    by_material = rng.uniform(0, 1, dominant.shape) < params.dw_material_rule
    for material, label in _DW_OF_MATERIAL.items():
        labels[by_material & (dominant == material) & (cover[material] > 0.6)] = label

    coarse = block_mode(labels, params.dw_factor, 9)
    flip = rng.uniform(0, 1, coarse.shape) < params.dw_pixel_flip
    options = np.array([_DW_CONFUSED[c][0] for c in range(8)] + [8], dtype=np.uint8)
    coarse[flip] = options[coarse[flip]]
    return coarse


def corine_labels(classes: np.ndarray, params: WorldParams) -> list[str]:
    """CORINE level-3 names of the classes covering at least ``params.label_min_fraction`` of a patch."""
    fractions = np.bincount(classes.ravel(), minlength=len(CLASSES)) / classes.size
    return [c.corine for c, f in zip(CLASSES, fractions, strict=True) if f >= params.label_min_fraction]
