"""SSL4EO-S12-ML: the multi-label targets SoftCon pretrained with, per SSL4EO-S12 location and season.

Dynamic World's nine classes (water, trees, grass, flooded_vegetation, crops, shrub_and_scrub, built, bare,
snow_and_ice), as names or as Dynamic World's label values 0..8; an empty list means the season has no label.
The published file (``ssl4eo-s12-ml`` on Hugging Face, ``wangyi111/SSL4EO-S12``) is, per the ``zhu-xlab/softcon``
README, one JSON object: location -> {season folder: label values as strings}, e.g.
``{"0000002": {"20200718T102559_20200718T103605_T31TFJ": [], "20210117T104259_20210117T104300_T31TFJ": ["0",
"1", "2", "4", "5", "6", "8"]}}``. Accepted files:

- JSON, an object keyed by location (``"0000042"`` or ``"42"``), each value either an object keyed by season
  (the season folder's name, or any text holding its acquisition time ``YYYYMMDDTHHMMSS`` or date
  ``YYYYMMDD``) or a list of per-season lists in time order (the location's S2 seasons sorted by time);
- CSV with a header holding ``location``, optionally ``season``, and ``labels`` (classes separated by ``;``,
  ``|`` or spaces); a row without a season labels every season of its location.

A location or season absent from the file is unlabelled; so is an empty list.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from softcon.tasks.schemes import DYNAMIC_WORLD

_TIME = re.compile(r"(\d{8})(T\d{6})?")
_SEPARATORS = re.compile(r"[;|\s,]+")


def _class_name(value: object, where: str) -> str:
    """A Dynamic World class from a name or a label value 0..8."""
    names = DYNAMIC_WORLD.class_names
    if isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not a Dynamic World class")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if not 0 <= index < len(names):
            raise ValueError(f"{where}: label value {index} is outside Dynamic World's 0..{len(names) - 1}")
        return names[index]
    text = str(value).strip().lower().replace(" ", "_").replace("-", "_")
    if text not in names:
        raise ValueError(f"{where}: {value!r} is not a Dynamic World class; known: {', '.join(names)}")
    return text


def _classes(values: object, where: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [part for part in _SEPARATORS.split(values) if part]
    if not isinstance(values, list | tuple):
        raise ValueError(f"{where}: labels {values!r} are not a list of Dynamic World classes")
    return tuple(dict.fromkeys(_class_name(value, where) for value in values))


def _season_key(text: str) -> str:
    """What identifies a season across spellings: its acquisition time, or its date when only that is given."""
    match = _TIME.search(text)
    return (match.group(1) + (match.group(2) or "")) if match else text


@dataclass(frozen=True)
class SeasonLabels:
    """Labels by location (its number) and season; ``lookup`` answers for one S2 season folder."""

    by_season: dict[int, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    in_order: dict[int, list[tuple[str, ...]]] = field(default_factory=dict)
    whole_location: dict[int, tuple[str, ...]] = field(default_factory=dict)
    digest: str = ""

    def lookup(
        self, location: str, season: str, time: np.datetime64, seasons: Sequence[str] = ()
    ) -> tuple[str, ...] | None:
        """The classes of ``location`` at ``season`` (acquired at ``time``; ``seasons``: all its S2 seasons in
        time order, for labels given as a list); None when the file has no label for it, () for an empty one."""
        number = int(location)
        keyed = self.by_season.get(number)
        if keyed is not None:
            key = _season_key(season)
            if key in keyed:
                return keyed[key]
            day = str(time.astype("datetime64[D]")).replace("-", "")
            return keyed.get(day)
        ordered = self.in_order.get(number)
        if ordered is not None and season in seasons:
            position = list(seasons).index(season)
            return ordered[position] if position < len(ordered) else None
        return self.whole_location.get(number)


def _from_json(data: object, path: str) -> SeasonLabels:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object keyed by location, found {type(data).__name__}")
    by_season: dict[int, dict[str, tuple[str, ...]]] = {}
    in_order: dict[int, list[tuple[str, ...]]] = {}
    for location, value in data.items():
        if not str(location).isdigit():
            raise ValueError(f"{path}: key {location!r} is not a location number (e.g. 0000042)")
        where = f"{path}, location {location}"
        if isinstance(value, dict):
            by_season[int(location)] = {
                _season_key(str(season)): _classes(labels, f"{where} season {season}")
                for season, labels in value.items()
            }
        elif isinstance(value, list) and all(isinstance(item, list) for item in value):
            in_order[int(location)] = [_classes(labels, f"{where} season {i}") for i, labels in enumerate(value)]
        else:
            raise ValueError(f"{where}: expected an object keyed by season or a list of per-season lists")
    return SeasonLabels(by_season=by_season, in_order=in_order)


def _from_csv(text: str, path: str) -> SeasonLabels:
    reader = csv.DictReader(text.splitlines())
    columns = set(reader.fieldnames or ())
    if not {"location", "labels"} <= columns:
        raise ValueError(f"{path}: a CSV needs the columns location and labels (optionally season); found {columns}")
    by_season: dict[int, dict[str, tuple[str, ...]]] = {}
    whole: dict[int, tuple[str, ...]] = {}
    for line, row in enumerate(reader, start=2):
        location = (row["location"] or "").strip()
        if not location.isdigit():
            raise ValueError(f"{path}, line {line}: location {location!r} is not a location number")
        classes = _classes(row["labels"] or "", f"{path}, line {line}")
        season = (row.get("season") or "").strip()
        if season:
            by_season.setdefault(int(location), {})[_season_key(season)] = classes
        else:
            whole[int(location)] = classes
    return SeasonLabels(by_season=by_season, whole_location=whole)


def read_ssl4eo_labels(path: str) -> SeasonLabels:
    """Read an SSL4EO-S12-ML label file (see the module doc).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is neither form, or names a class Dynamic World does not have (naming where).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"SSL4EO-S12-ML label file {path} does not exist")
    raw = file.read_bytes()
    text = raw.decode("utf-8-sig")
    if file.suffix.lower() == ".csv":
        labels = _from_csv(text, path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error}); give SSL4EO-S12-ML labels as JSON or .csv") from None
        labels = _from_json(data, path)
    return SeasonLabels(labels.by_season, labels.in_order, labels.whole_location, hashlib.sha256(raw).hexdigest()[:16])
