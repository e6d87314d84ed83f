"""SoftCon's input contract: SSL4EO-S12's per-band statistics and its "mean ± 2 std to [0, 1]" rule.

SoftCon's released encoders were pretrained on SSL4EO-S12 with inputs normalised the SSL4EO-S12 way: each band is
mapped from [mean - 2 std, mean + 2 std] to [0, 1] and clipped (``normalize`` in SSL4EO-S12's
``ssl4eo_dataset.py``). Evaluating them under the project's own z-scores feeds them inputs they never saw.

Statistics: SSL4EO-S12 v1.0, "calculated from 50k data", from zhu-xlab/SSL4EO-S12,
``src/benchmark/pretrain_ssl/datasets/SSL4EO/ssl4eo_dataset.py`` at commit 1dc0c8310ca8c2bf4c6f8d67f168eab568a10a9d
(Apache-2.0): ``S2C_*`` for the 13 L1C bands, ``S2A_*`` for the 12 L2A bands, ``S1_*`` for VV, VH in dB.

The rule is applied as z-scores with the std scaled by 4 plus 0.5, clipped to [0, 1]: (x - (m - 2s)) / 4s =
(x - m) / 4s + 0.5, so the datasets' own z-score code does the per-band work and ``ContractInputs`` adds the offset,
the clip and, for BigEarthNet, the resize to 256 and centre crop to 224 of the SSL4EO-S12 evaluation scripts.
Choices without a source: L1C statistics for an encoder whose bands include B10, L2A statistics otherwise; a
pixel without data, 0 after the z-score, becomes 0.5 (the band's mean), as the project treats nodata elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

S2C = dict(zip(
    ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"),
    zip(
        (1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545, 1549.44374991, 2091.74883118, 2371.7172463,
         2299.90463006, 2560.29504086, 830.06605044, 22.10351321, 2177.07172323, 1524.06546312),
        (786.78685367, 850.34818441, 875.06484736, 1138.84957046, 1122.17775652, 1161.59187054, 1274.39184232,
         1248.42891965, 1345.52684884, 577.31607053, 51.15431158, 1336.09932639, 1136.53823676),
        strict=True,
    ),
    strict=True,
))  # fmt: skip
"""SSL4EO-S12 L1C (``s2c``): band -> (mean, std) of the digital numbers."""
S2A = dict(zip(
    ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"),
    zip(
        (752.40087073, 884.29673756, 1144.16202635, 1297.47289228, 1624.90992062, 2194.6423161, 2422.21248945,
         2517.76053101, 2581.64687018, 2645.51888987, 2368.51236873, 1805.06846033),
        (1108.02887453, 1155.15170768, 1183.6292542, 1368.11351514, 1370.265037, 1355.55390699, 1416.51487101,
         1474.78900051, 1439.3086061, 1582.28010962, 1455.52084939, 1343.48379601),
        strict=True,
    ),
    strict=True,
))  # fmt: skip
"""SSL4EO-S12 L2A (``s2a``): band -> (mean, std)."""
S1 = {"VV": (-12.54847273, 5.25697717), "VH": (-20.19237134, 5.91150917)}
"""SSL4EO-S12 S1 GRD (``s1``), dB: polarisation -> (mean, std)."""


def ssl4eo_norm_stats(bands: Sequence[str]) -> dict[str, list[float]]:
    """Per-band ``{"mean", "std"}`` that make a z-score equal SSL4EO-S12's rule minus 0.5 (std scaled by 4).

    Raises:
        ValueError: a band SSL4EO-S12 has no statistics for (named).
    """
    table = S1 if set(bands) <= set(S1) else S2C if "B10" in bands else S2A
    missing = [band for band in bands if band not in table]
    if missing:
        raise ValueError(f"SSL4EO-S12 has no statistics for bands {missing}; known: {sorted({*S2C, *S1})}")
    return {"mean": [table[band][0] for band in bands], "std": [4 * table[band][1] for band in bands]}


class ContractInputs(Dataset):
    """A dataset normalised with ``ssl4eo_norm_stats`` turned into SoftCon's inputs: +0.5, clipped to [0, 1], and
    optionally resized (bilinear) then centre-cropped, as SSL4EO-S12's BigEarthNet evaluation does (256, 224)."""

    def __init__(self, dataset: Dataset, *, resize: int | None = None, crop: int | None = None) -> None:
        self.dataset = dataset
        self.resize = resize
        self.crop = crop

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[i])
        image = (item["image"] + 0.5).clamp(0.0, 1.0)  # (C, H, W)
        if self.resize is not None:
            image = F.interpolate(image[None], size=(self.resize, self.resize), mode="bilinear", align_corners=False)[0]
        if self.crop is not None:
            top, left = (image.shape[-2] - self.crop) // 2, (image.shape[-1] - self.crop) // 2
            image = image[:, top : top + self.crop, left : left + self.crop]
        item["image"] = image
        return item
