"""``DataSpec``: every setting of the data layer, one flat dataclass.

Field names are global RecBole config keys (``properties/dataset/<name>.yaml`` documents them), so
a merged RecBole config maps onto a spec one to one. Source-specific keys carry a prefix
(``sim_`` for retail-sim, ``csv_`` for the csv source). ``None`` means "the dataset's default":
``__post_init__`` resolves those from ``DATASET_DEFAULTS`` so a resolved spec says what is used.
"""

from __future__ import annotations

import codecs
import os
import zoneinfo
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from causalrec.errors import ConfigError, UnknownNameError

SOURCES = ("retail-sim", "online-retail", "ml-100k", "csv")
# Sources whose users are generated: their per-user values identify no one and may be published
# (``compare --publish-cases``); every other source's user ids are real people's.
SIMULATED_SOURCES = frozenset({"retail-sim"})
SPLITS = ("iid", "temporal", "seasonal", "regional", "popularity", "mixed")

# Online Retail stock codes that are not products (postage, fees, adjustments, vouchers). Checked
# against every non-numeric code of the UCI file with its descriptions (datasets/online-retail.md);
# ADJUST*/TEST* occur in Online Retail II. Case-insensitive; ``*`` is a wildcard.
DEFAULT_EXCLUDE_STOCK_CODES = (
    "POST",  # POSTAGE
    "DOT",  # DOTCOM POSTAGE
    "C2",  # CARRIAGE
    "M",  # Manual
    "D",  # Discount
    "S",  # SAMPLES
    "B",  # Adjust bad debt
    "BANK CHARGES",  # Bank Charges
    "AMAZONFEE",  # AMAZON FEE
    "CRUK",  # CRUK Commission
    "PADS",  # PADS TO MATCH ALL CUSHIONS (a 0.001 GBP filler line)
    "ADJUST*",  # Adjustment by john / Adjustment (Online Retail II)
    "TEST*",  # test rows (Online Retail II)
    "GIFT_0001_*",  # Dotcomgiftshop gift vouchers
)

# Titles longer than this are cut (``max_title_chars``). Real titles are far shorter (Online Retail: <= 35
# characters, MovieLens: < 100, marketplace listings cap titles at about 200), so a longer text is a product
# description: 1000 characters keep every real title whole and a prompt of 10 history titles a few thousand
# tokens at most.
DEFAULT_MAX_TITLE_CHARS = 1000
# Python's csv module refuses fields longer than this by default (``csv.field_size_limit()``); RecBole's
# reader (pandas' python engine) and ``read_titles`` use the csv module, so no title may exceed it.
CSV_FIELD_LIMIT = 131_072

# Fields added after prepared datasets were already keyed by ``key_fields``: at their default they stay out
# of the key, so adding them did not orphan existing prepared data (their default reproduces the old files).
KEY_OMITTED_AT_DEFAULT: dict[str, Any] = {
    "max_title_chars": DEFAULT_MAX_TITLE_CHARS,
    "csv_encoding": "utf-8",
    "csv_timezone": None,
    "csv_exclude_items": (),
    "sim_season_exclusive": False,
    "sim_promotion": 0.0,
    "history_environments": False,
    "sim_promotion_months": (1, 2, 3, 4, 5, 6, 7, 8),
}

MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")

# Per-dataset defaults for the fields whose default is None (mirrored in properties/dataset/*.yaml;
# a test keeps the two equal).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "retail-sim": {
        "split": "seasonal",
        "train_months": (1, 2, 3, 4, 5, 6, 7, 8),
        "valid_months": (9,),
        "test_months": (10, 11, 12),
    },
    "online-retail": {
        "split": "seasonal",
        "train_months": (1, 2, 3, 4, 5, 6, 7, 8),
        "valid_months": (9,),
        "test_months": (10, 11, 12),
    },
    # MovieLens-100k spans Sep 1997 - Apr 1998: train on autumn, test on winter/spring.
    "ml-100k": {"split": "temporal", "train_months": (9, 10, 11), "valid_months": (12,), "test_months": (1, 2, 3, 4)},
    "csv": {
        "split": "temporal",
        "train_months": (1, 2, 3, 4, 5, 6, 7, 8),
        "valid_months": (9,),
        "test_months": (10, 11, 12),
    },
}

# The spec fields each split reads (the cache key covers only these, plus the common ones).
SPLIT_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "temporal": ("test_ratio", "valid_ratio"),
    "seasonal": ("train_months", "valid_months", "test_months"),
    "regional": ("train_regions", "valid_regions", "test_regions", "valid_user_ratio"),
    "popularity": ("tail_ratio",),
    "mixed": ("tail_ratio", "test_ratio", "valid_ratio"),
}


def default_cache_dir() -> Path:
    """``$CAUSALREC_CACHE`` or ``~/.cache/causalrec``."""
    return Path(os.environ.get("CAUSALREC_CACHE") or Path.home() / ".cache" / "causalrec").expanduser()


@dataclass
class DataSpec:
    """What data to load, how to clean it and how to split it.

    Common:
        dataset: ``retail-sim`` (simulated, the default) | ``online-retail`` | ``ml-100k`` | ``csv``;
            also the RecBole dataset name of the prepared files.
        source: input file (online-retail: UCI .csv/.csv.gz/.xlsx; csv: any table; ml-100k: a folder
            with ml-100k.inter/.item/.user, default RecBole's bundled copy). Unused by retail-sim.
        split: iid | temporal | seasonal | regional | popularity | mixed (None: dataset default).
        seed: seeds the simulator, the regional valid-user draw and the shift-evidence control. In a
            RecBole config this is the key ``data_seed`` (default 2020, ``properties/overall.yaml``), kept apart
            from RecBole's ``seed`` so that re-drawing model seeds trains on the same data; ``from_mapping``
            reads ``data_seed`` and falls back to ``seed`` when a mapping has no ``data_seed``.
        min_user_inter, min_item_inter: k-core thresholds, iterated to a fixed point.
        max_history: sequence files keep each history's last this-many items.
        history_environments: sequence files also hold each history item's own season and region
            (``season_list`` / ``region_list``, aligned with ``item_id_list``); set by ``environment_position:
            each``, which writes every history item's season before it.
        max_title_chars: item texts longer than this are cut (and counted, with a warning), so no prepared
            file holds a field Python's csv reader refuses (1 to 131072; default 1000).
        exclude_stock_codes: online-retail non-product stock codes dropped (case-insensitive, ``*`` wildcard).
        data_cache_dir: where prepared datasets live (None: $CAUSALREC_CACHE or ~/.cache/causalrec).
    Split parameters:
        train_months, valid_months, test_months: seasonal split, calendar months 1-12 (names like
            "oct" are accepted); None: the dataset default.
        train_regions, valid_regions, test_regions: regional split (None: train = the largest regions
            that hold >= 50 % of users, test = the rest, valid = ``valid_user_ratio`` of test-region users).
        valid_user_ratio: regional split without ``valid_regions``: share of test-region users that
            validate instead (drawn per region with ``seed``).
        test_ratio, valid_ratio: temporal/mixed: each user's latest share of interactions that forms
            the test period, and the share before it that forms the valid period.
        tail_ratio: popularity/mixed: the head is the most popular items making ``1 - tail_ratio`` of
            interactions; targets come from the other (tail) items.
    retail-sim (the simulator):
        sim_users, sim_items, sim_regions, sim_categories: sizes.
        sim_inter_per_user: mean purchases per user.
        sim_confounding: 0 = exposure ignores season/region/fashion (no shift); 1 = full confounding.
        sim_repeat: probability that a purchase re-buys an item the user bought before.
        sim_season_exclusive: seasonal categories are on sale only in their peak months (on the seasonal split
            the test season's Christmas and Halloween lines are never bought in training).
        sim_promotion: 0 (default) to 1: each region promotes one evergreen category from January to August,
            more strongly in later regions, and none afterwards (a planted spurious feature; datasets/retail-sim.md).
        sim_promotion_months: the months with promotions (default January-August, every training month of the
            seasonal split); fewer make training periods that disagree about the promoted lines.
    csv (bring your own table):
        csv_user, csv_item, csv_time: column names; csv_region: optional region/store column;
        csv_text: item-text column(s), joined with a space (None: the item id is the text);
        csv_items_path: optional item-side table joined on ``csv_item`` (may hold the text columns);
        csv_sep: field separator (None: tab for .tsv/.tab, else comma);
        csv_time_format: strftime format, or ``unix`` / ``unix_ms`` for epoch numbers
            (None: numbers are epoch seconds, strings are parsed by pandas).
        csv_encoding: text encoding of the table(s) (default utf-8; e.g. cp1252, latin-1, utf-16).
        csv_timezone: which clock months and seasons are read from. None (default): each timestamp's own
            wall-clock time (a UTC offset is dropped, not applied; epoch numbers are UTC); ``UTC``: offsets
            are applied; an IANA name (``Europe/London``): times with an offset (and epoch numbers) become
            that zone's wall-clock time. Times without an offset are read as wall-clock time in every mode.
        csv_exclude_items: item ids dropped before anything else (fnmatch patterns, case-sensitive: ``M``,
            ``GIFT_*``); empty by default (Online Retail's fee codes are ``exclude_stock_codes``).
    """

    dataset: str = "retail-sim"
    source: str | None = None
    split: str | None = None
    seed: int = 2020
    min_user_inter: int = 5
    min_item_inter: int = 5
    max_history: int = 50
    history_environments: bool = False
    max_title_chars: int = DEFAULT_MAX_TITLE_CHARS
    exclude_stock_codes: tuple[str, ...] = DEFAULT_EXCLUDE_STOCK_CODES
    data_cache_dir: str | None = None
    # split parameters
    train_months: tuple[int, ...] | None = None
    valid_months: tuple[int, ...] | None = None
    test_months: tuple[int, ...] | None = None
    train_regions: tuple[str, ...] | None = None
    valid_regions: tuple[str, ...] | None = None
    test_regions: tuple[str, ...] | None = None
    valid_user_ratio: float = 0.5
    test_ratio: float = 0.2
    valid_ratio: float = 0.1
    tail_ratio: float = 0.2
    # retail-sim
    sim_users: int = 1200
    sim_items: int = 400
    sim_regions: int = 4
    sim_categories: int = 16
    sim_inter_per_user: float = 30.0
    sim_confounding: float = 0.8
    sim_repeat: float = 0.2
    sim_season_exclusive: bool = False
    sim_promotion: float = 0.0
    sim_promotion_months: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    # csv
    csv_user: str = "user_id"
    csv_item: str = "item_id"
    csv_time: str = "timestamp"
    csv_region: str | None = None
    csv_text: tuple[str, ...] | None = None
    csv_items_path: str | None = None
    csv_sep: str | None = None
    csv_time_format: str | None = None
    csv_encoding: str = "utf-8"
    csv_timezone: str | None = None
    csv_exclude_items: tuple[str, ...] = ()

    def __post_init__(self):
        if self.dataset not in SOURCES:
            raise UnknownNameError("dataset", self.dataset, SOURCES)
        for key, value in DATASET_DEFAULTS[self.dataset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.split not in SPLITS:
            raise UnknownNameError("split", str(self.split), SPLITS)
        self.seed = _int("seed", self.seed, minimum=0)
        for key in ("min_user_inter", "min_item_inter", "max_history", "sim_users", "sim_items", "sim_regions"):
            setattr(self, key, _int(key, getattr(self, key), minimum=1))
        self.sim_categories = _int("sim_categories", self.sim_categories, minimum=2)
        for key in ("train_months", "valid_months", "test_months"):
            setattr(self, key, _months(key, getattr(self, key)))
        for key in ("train_regions", "valid_regions", "test_regions"):
            setattr(self, key, _strings(key, getattr(self, key)))
        self.exclude_stock_codes = _strings("exclude_stock_codes", self.exclude_stock_codes) or ()
        self.csv_text = _strings("csv_text", self.csv_text)
        self.csv_exclude_items = _strings("csv_exclude_items", self.csv_exclude_items) or ()
        self.max_title_chars = _int("max_title_chars", self.max_title_chars, minimum=1)
        if self.max_title_chars > CSV_FIELD_LIMIT:
            raise ConfigError(
                f"max_title_chars must be at most {CSV_FIELD_LIMIT} (longer fields break the csv "
                f"reader RecBole uses); got {self.max_title_chars}"
            )
        self.csv_encoding = _encoding("csv_encoding", self.csv_encoding)
        self.csv_timezone = _timezone("csv_timezone", self.csv_timezone)
        for key in ("test_ratio", "valid_ratio", "tail_ratio", "valid_user_ratio"):
            _ratio(key, getattr(self, key), open_low=True, open_high=True)
        for key in ("sim_confounding", "sim_repeat", "sim_promotion"):
            _ratio(key, getattr(self, key), open_low=False, open_high=key == "sim_repeat")
        self.sim_promotion = float(self.sim_promotion)
        self.sim_promotion_months = _months("sim_promotion_months", self.sim_promotion_months)
        if self.sim_promotion_months is None:
            raise ConfigError("sim_promotion_months must list at least one month (sim_promotion: 0 for none)")
        if self.test_ratio + self.valid_ratio >= 1:
            raise ConfigError(
                f"test_ratio + valid_ratio must be < 1 (a training period must remain); "
                f"got {self.test_ratio} + {self.valid_ratio}"
            )
        if (
            not isinstance(self.sim_inter_per_user, (int, float))
            or isinstance(self.sim_inter_per_user, bool)
            or not 3 <= self.sim_inter_per_user <= 1000
        ):
            raise ConfigError(f"sim_inter_per_user must be a number in [3, 1000]; got {self.sim_inter_per_user!r}")
        self.sim_inter_per_user = float(self.sim_inter_per_user)
        if not isinstance(self.history_environments, bool):
            raise ConfigError(f"history_environments must be true or false; got {self.history_environments!r}")
        if not isinstance(self.sim_season_exclusive, bool):
            raise ConfigError(f"sim_season_exclusive must be true or false; got {self.sim_season_exclusive!r}")
        _disjoint(
            "months", train_months=self.train_months, valid_months=self.valid_months, test_months=self.test_months
        )
        _disjoint(
            "regions",
            train_regions=self.train_regions,
            valid_regions=self.valid_regions,
            test_regions=self.test_regions,
        )
        for key in (
            "source",
            "data_cache_dir",
            "csv_user",
            "csv_item",
            "csv_time",
            "csv_region",
            "csv_items_path",
            "csv_sep",
            "csv_time_format",
        ):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"{key} must be a string; got {value!r}")
            if isinstance(value, os.PathLike):
                setattr(self, key, os.fspath(value))
        if self.dataset == "csv" and not self.source:
            raise ConfigError(
                "dataset 'csv' needs source: the path of your interaction table "
                "(e.g. --source purchases.csv --user customer --item sku --time date)"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], strict: bool = False) -> "DataSpec":
        """The spec from a (merged) config mapping: known keys are taken, ``None`` values mean default.

        The mapping's ``data_seed`` (a RecBole config key) becomes ``seed``; without it, ``seed`` is used.

        With ``strict``, any other key is an error naming it and the valid keys.
        """
        known = cls.field_names()
        if strict:
            for key in mapping:
                if key not in known and key != "data_seed":
                    raise UnknownNameError("data config key", key, (*known, "data_seed"))
        values = {k: v for k, v in mapping.items() if k in known and v is not None}
        if mapping.get("data_seed") is not None:  # the data's seed, independent of RecBole's model ``seed``
            values["seed"] = mapping["data_seed"]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def cache_dir(self) -> Path:
        return Path(self.data_cache_dir).expanduser() if self.data_cache_dir else default_cache_dir()

    def key_fields(self) -> dict[str, Any]:
        """The fields that determine the prepared files (the cache key): common ones, the source's own
        prefixed ones and the split's parameters."""
        own = {"retail-sim": "sim_", "csv": "csv_"}.get(self.dataset)
        out = {}
        for name, value in self.to_dict().items():
            if name == "data_cache_dir" or name in {p for ps in SPLIT_PARAMS.values() for p in ps}:
                continue
            if name.startswith(("sim_", "csv_")) and (own is None or not name.startswith(own)):
                continue
            if name == "exclude_stock_codes" and self.dataset != "online-retail":
                continue
            if name in KEY_OMITTED_AT_DEFAULT and value == _jsonable(KEY_OMITTED_AT_DEFAULT[name]):
                continue
            out[name] = value
        for name in SPLIT_PARAMS[self.split]:
            out[name] = self.to_dict()[name]
        return out


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _encoding(key: str, value: Any) -> str:
    """A text codec's canonical name (``UTF8`` -> ``utf-8``, ``latin-1`` -> ``iso8859-1``)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{key} must be the name of a text encoding such as utf-8, cp1252, latin-1 or utf-16; got {value!r}"
        )
    try:
        codecs.getincrementaldecoder(value.strip())  # raises for unknown names
        "".encode(value.strip())  # LookupError for codecs that are not text encodings (base64, zlib)
        return codecs.lookup(value.strip()).name
    except LookupError:
        raise ConfigError(
            f"{key}: {value!r} is not a text encoding Python knows; use e.g. utf-8, cp1252 "
            f"(Windows, Western Europe), latin-1 or utf-16"
        ) from None


def _timezone(key: str, value: Any) -> str | None:
    """None, ``UTC``, or an IANA zone name that the zone database knows."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be UTC or an IANA time-zone name such as Europe/London; got {value!r}")
    name = value.strip()
    if name.upper() in ("UTC", "Z"):
        return "UTC"
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        hint = (
            "" if zoneinfo.available_timezones() else " (this Python finds no time-zone database: pip install tzdata)"
        )
        raise ConfigError(
            f"{key}: unknown time zone {name!r}{hint}; use UTC or an IANA name such as "
            f"Europe/London or America/New_York, or leave {key} unset to keep each timestamp's own "
            f"wall-clock time"
        ) from None
    return name


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _ratio(key: str, value: Any, open_low: bool, open_high: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if open_low else value >= 0) and (value < 1 if open_high else value <= 1)
    if not ok:
        interval = ("(" if open_low else "[") + "0, 1" + (")" if open_high else "]")
        raise ConfigError(f"{key} must be a number in {interval}; got {value!r}")


def _months(key: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (int, str)) else value
    out = []
    for item in items:
        month = item
        if isinstance(item, str):
            name = item.strip().lower()[:3]
            month = MONTH_NAMES.index(name) + 1 if name in MONTH_NAMES else (int(name) if name.isdigit() else None)
        if isinstance(month, bool) or not isinstance(month, int) or not 1 <= month <= 12:
            raise ConfigError(f"{key} must list calendar months 1-12 (or names like 'oct'); got {item!r} in {value!r}")
        out.append(month)
    if not out:
        raise ConfigError(f"{key} must list at least one month; got {value!r}")
    return tuple(sorted(set(out)))


def _strings(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(f"{key} must be a list of non-empty strings; got {value!r}")
    return tuple(v.strip() for v in items)


def _disjoint(what: str, **parts: tuple | None) -> None:
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = set(parts[a] or ()) & set(parts[b] or ())
            if common:
                raise ConfigError(f"{a} and {b} must not share {what}; both contain {sorted(common)}")
