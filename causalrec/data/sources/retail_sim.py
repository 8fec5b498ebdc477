"""``retail-sim``: a seeded simulator of a shop whose customers' taste is invariant while season,
region and fashion confound what they are exposed to and buy.

Generative story (one calendar year, ``SIM_YEAR``):

* user ``u`` lives in a region and has a fixed taste ``theta_u ~ Dirichlet(0.5)`` over categories;
* item ``i`` belongs to one category, has a base popularity ``pop_i ~ N(0, 1)``, is stocked in some
  regions (regional categories sell mostly in their home region; a quarter of the other items are
  stocked in only half the regions), and a third of the items follow a fashion that peaks in one month;
* a purchase by ``u`` in month ``m`` picks item ``i`` with probability proportional to
  ``theta_u[cat_i] * exp(pop_i + c * (2 season(cat_i, m) + 2 stock(i, r_u) + fashion(i, m)))``
  where ``season`` is +1 in the category's peak months and -1 otherwise (0 for evergreen categories),
  ``stock`` is +1 where stocked/home and -1 elsewhere, ``fashion = cos(2 pi (m - peak_i) / 12)`` and
  ``c = sim_confounding``. With ``c = 0`` exposure is uniform and there is no shift at all;
* with probability ``sim_repeat`` a purchase instead re-buys one of the user's earlier items (one on sale);
* with ``sim_season_exclusive``, seasonal categories are on sale only in their peak months (weight 0 outside
  them, whatever ``c``): on the seasonal split the test season's Christmas and Halloween lines are never bought
  in training, exposure no training row shows (as a shop's new seasonal lines);
* with ``sim_promotion = s > 0`` (a planted spurious feature, issue 22 point 5d), region ``r`` of ``R`` promotes one
  evergreen category from January to August (the seasonal split's training months; ``sim_promotion_months``) with strength
  ``PROMOTION_STRENGTH * s * (r + 1) / R`` added to its items' log exposure there: each region's customers fill
  their histories with its promoted line, at a strength that differs by region, and every promotion has ended by
  the validation and test months. A history's promoted items predict the next purchase in training through
  exposure, not taste (the customers' taste is the same in every region), and stop predicting it afterwards.

Sampling is exact and vectorised: the category first (``theta_u[c] * W_c(r, m)``), then the item within
the category. ``simulate`` returns the frame and the ground truth for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import pandas as pd

from causalrec.data.spec import DataSpec
from causalrec.errors import ConfigError

SIM_YEAR = 2023
SEASON_STRENGTH, STOCK_STRENGTH, FASHION_STRENGTH = 2.0, 2.0, 1.0
PROMOTION_STRENGTH = 3.0
# Shopping volume by month: the pre-Christmas peak of a gift shop (Online Retail shows the same shape).
MONTH_VOLUME = np.array([0.8, 0.7, 0.8, 0.8, 0.85, 0.85, 0.9, 0.85, 1.1, 1.3, 1.6, 1.2])
REGION_NAMES = ("north", "south", "east", "west", "central", "coast", "highlands", "islands")


@dataclass(frozen=True)
class Category:
    name: str
    nouns: tuple[str, ...]
    months: tuple[int, ...] = ()  # peak months; empty = evergreen
    regional: bool = False  # sells mostly in one home region


# Interleaved so that the first k categories mix seasonal, regional and evergreen ones.
CATEGORIES = (
    Category(
        "christmas decorations",
        ("BAUBLE", "WREATH", "STAR GARLAND", "ADVENT CALENDAR", "TREE TOPPER", "STOCKING", "CANDLE RING"),
        (11, 12),
    ),
    Category("kitchen", ("TEA TOWEL", "CAKE TIN", "MIXING BOWL", "APRON", "JAM JAR SET", "BREAD BIN")),
    Category(
        "garden", ("PLANT POT", "WATERING CAN", "BIRD FEEDER", "SEED TRAY", "GARDEN KNEELER", "TRELLIS"), (4, 5, 6)
    ),
    Category(
        "tea and coffee", ("TEAPOT", "CAFETIERE", "TEA CADDY", "MUG", "COFFEE GRINDER", "MILK JUG"), regional=True
    ),
    Category(
        "swimwear and beach", ("SWIMSUIT", "BEACH TOWEL", "SUN HAT", "FLIP FLOPS", "BEACH BAG", "PARASOL"), (6, 7, 8)
    ),
    Category("home decor", ("CUSHION", "PHOTO FRAME", "WALL CLOCK", "VASE", "THROW", "MIRROR")),
    Category(
        "winter accessories",
        ("SCARF", "GLOVES", "BEANIE HAT", "HOT WATER BOTTLE", "EAR MUFFS", "THERMAL SOCKS"),
        (12, 1, 2),
    ),
    Category(
        "local crafts", ("WOVEN BASKET", "POTTERY DISH", "CARVED SPOON", "KNITTED COASTER", "LACE DOILY"), regional=True
    ),
    Category(
        "halloween", ("PUMPKIN LANTERN", "WITCH HAT", "SKULL GARLAND", "BAT DECORATION", "TRICK OR TREAT BAG"), (10,)
    ),
    Category("stationery", ("NOTEBOOK", "PENCIL CASE", "GREETING CARD", "WRAPPING PAPER", "PEN SET")),
    Category("easter", ("EASTER EGG", "BUNNY FIGURE", "CHICK GARLAND", "EGG CUP", "EASTER BASKET"), (3, 4)),
    Category("sports fan gear", ("TEAM SCARF", "FAN FLAG", "SUPPORTER MUG", "JERSEY", "FOAM HAND"), regional=True),
    Category("back to school", ("LUNCH BOX", "SCHOOL BAG", "WATER BOTTLE", "RULER SET", "SHOE BAG"), (8, 9)),
    Category("toys", ("SPINNING TOP", "JIGSAW PUZZLE", "SKITTLES", "TEDDY BEAR", "DOLLS HOUSE")),
    Category(
        "regional delicacies", ("FUDGE TIN", "SHORTBREAD BOX", "CHUTNEY JAR", "HONEY POT", "TOFFEE BAG"), regional=True
    ),
    Category("lighting", ("T-LIGHT HOLDER", "LANTERN", "STRING LIGHTS", "TABLE LAMP", "NIGHT LIGHT")),
    Category("party supplies", ("PAPER PLATES", "BUNTING", "PARTY CUPS", "BALLOON SET", "NAPKINS")),
    Category("picnic", ("PICNIC BLANKET", "PICNIC HAMPER", "COOL BAG", "FLASK", "TUMBLER"), (6, 7)),
    Category("bathroom", ("SOAP DISH", "TOOTHBRUSH HOLDER", "BATH MAT", "TOWEL", "WASH BAG")),
    Category("storage", ("STORAGE TIN", "TRINKET BOX", "SHOE BOX", "LAUNDRY BAG", "STORAGE JAR")),
)
ADJECTIVES = (
    "RED",
    "BLUE",
    "GREEN",
    "PINK",
    "WHITE",
    "BLACK",
    "IVORY",
    "SILVER",
    "GOLD",
    "PASTEL",
    "VINTAGE",
    "RETRO",
    "SPOTTY",
    "STRIPED",
    "FLORAL",
    "HEART",
    "STAR",
    "BIRD",
    "PAISLEY",
    "SCANDI",
)
MATERIALS = (
    "WOOL",
    "CERAMIC",
    "ENAMEL",
    "GLASS",
    "WOODEN",
    "METAL",
    "COTTON",
    "PAPER",
    "FELT",
    "ZINC",
    "BAMBOO",
    "WICKER",
)
SIZES = ("", "MINI ", "SMALL ", "LARGE ", "JUMBO ")


@dataclass
class SimResult:
    """The simulated frame and the truth behind it.

    Attributes:
        frame: canonical frame (before k-core) with extra column ``category``, in time order per user.
        user_taste: users x categories, each row the user's invariant taste (sums to 1).
        user_region: region of each user.
        item_category, item_title, item_popularity: per item (index ``item_id``).
        item_home_region: regional-category items' home region ('' for the others).
        item_stock: items x regions, True where the item is stocked (sold without penalty).
        item_fashion_peak: month a fashion item peaks (0 for items without fashion).
        category_months: peak months of each seasonal category (empty for evergreen ones).
        item_on_sale: items x months 1-12, False where ``sim_season_exclusive`` takes the item off sale.
        region_promotion: per region, the promoted category and its log-exposure boost in ``sim_promotion_months``
            (boost 0 everywhere without ``sim_promotion``).
        regions, categories: names.
    """

    frame: pd.DataFrame
    user_taste: pd.DataFrame
    user_region: pd.Series
    item_category: pd.Series
    item_title: pd.Series
    item_popularity: pd.Series
    item_home_region: pd.Series
    item_stock: pd.DataFrame
    item_fashion_peak: pd.Series
    category_months: dict[str, tuple[int, ...]]
    item_on_sale: pd.DataFrame
    region_promotion: pd.DataFrame
    regions: tuple[str, ...]
    categories: tuple[str, ...]


def _titles(rng: np.random.Generator, category: Category, n: int) -> list[str]:
    combos = len(SIZES) * len(ADJECTIVES) * len(MATERIALS) * len(category.nouns)
    if n > combos:
        raise ConfigError(
            f"retail-sim can title at most {combos} items per category; {n} were asked for "
            f"{category.name!r}: raise sim_categories or lower sim_items"
        )
    # the first len(ADJ)*len(MAT)*len(nouns) combinations carry no size word; prefer those
    plain = len(ADJECTIVES) * len(MATERIALS) * len(category.nouns)
    pick = rng.choice(plain, size=n, replace=False) if n <= plain else rng.choice(combos, size=n, replace=False)
    table = list(product(SIZES, ADJECTIVES, MATERIALS, category.nouns))
    return [f"{s}{a} {m} {noun}" for s, a, m, noun in (table[k] for k in pick)]


def _promotions(cats: tuple[Category, ...], n_regions: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Each region's promoted category (the evergreen ones in turn; no random draw, so the rest of the simulation
    is the same with or without promotions) and its log-exposure boost, rising with the region's index."""
    evergreen = [k for k, cat in enumerate(cats) if not cat.months and not cat.regional]
    if strength > 0 and not evergreen:
        raise ConfigError("sim_promotion needs an evergreen category to promote: raise sim_categories")
    promoted = np.array([evergreen[r % len(evergreen)] if evergreen else 0 for r in range(n_regions)])
    boost = PROMOTION_STRENGTH * strength * (np.arange(n_regions) + 1) / n_regions
    return promoted, boost


def simulate(spec: DataSpec) -> SimResult:
    """Simulate the shop described by ``spec``'s ``sim_*`` fields and ``seed`` (a ``DataSpec``)."""
    n_users, n_items, n_regions, n_cat = spec.sim_users, spec.sim_items, spec.sim_regions, spec.sim_categories
    if n_cat > len(CATEGORIES):
        raise ConfigError(f"sim_categories must be at most {len(CATEGORIES)}; got {n_cat}")
    if n_items < n_cat:
        raise ConfigError(f"sim_items ({n_items}) must be at least sim_categories ({n_cat})")
    rng = np.random.default_rng(spec.seed)
    c = float(spec.sim_confounding)
    cats = CATEGORIES[:n_cat]
    regions = tuple(REGION_NAMES[r] if r < len(REGION_NAMES) else f"region{r + 1}" for r in range(n_regions))

    # items: category, title, popularity, stock, fashion
    item_cat = rng.permutation(np.arange(n_items) % n_cat)
    titles = np.empty(n_items, dtype=object)
    for k, cat in enumerate(cats):
        members = np.flatnonzero(item_cat == k)
        titles[members] = _titles(rng, cat, len(members))
    pop = rng.normal(0.0, 1.0, n_items)
    regional_cats = [k for k, cat in enumerate(cats) if cat.regional]
    home = np.full(n_items, -1)
    for j, k in enumerate(regional_cats):
        home[item_cat == k] = j % n_regions
    stock = np.ones((n_items, n_regions), dtype=bool)
    for i in np.flatnonzero(home >= 0):
        stock[i] = np.arange(n_regions) == home[i]
    partial = (home < 0) & (rng.random(n_items) < 0.25)
    if n_regions > 1:
        for i in np.flatnonzero(partial):
            stocked = rng.choice(n_regions, size=max(1, n_regions // 2), replace=False)
            stock[i] = np.isin(np.arange(n_regions), stocked)
    fashion_peak = np.where(rng.random(n_items) < 1 / 3, rng.integers(1, 13, n_items), 0)

    months = np.arange(1, 13)
    season = np.zeros((n_cat, 12))
    for k, cat in enumerate(cats):
        if cat.months:
            season[k] = np.where(np.isin(months, cat.months), 1.0, -1.0)
    fashion = np.where(
        fashion_peak[:, None] > 0, np.cos(2 * np.pi * (months[None, :] - fashion_peak[:, None]) / 12), 0.0
    )
    on_sale = ~(spec.sim_season_exclusive & (season[item_cat] < 0))  # [items, 12]
    # log exposure weight of item i in region r, month m: [items, regions, 12]
    log_w = pop[:, None, None] + c * (
        SEASON_STRENGTH * season[item_cat][:, None, :]
        + STOCK_STRENGTH * np.where(stock, 1.0, -1.0)[:, :, None]
        + FASHION_STRENGTH * fashion[:, None, :]
    )
    promoted, boost = _promotions(cats, n_regions, float(spec.sim_promotion))
    in_promotion = np.isin(months, spec.sim_promotion_months)
    log_w += (item_cat[:, None] == promoted[None, :])[:, :, None] * boost[None, :, None] * in_promotion[None, None, :]
    w = np.exp(log_w) * on_sale[:, None, :]
    cat_w = np.stack([w[item_cat == k].sum(axis=0) for k in range(n_cat)])  # [cats, regions, 12]

    # users: region, taste, purchase count
    user_region = rng.integers(0, n_regions, n_users)
    taste = rng.dirichlet(np.full(n_cat, 0.5), size=n_users)
    base = int(min(5, spec.sim_inter_per_user))
    extra_mean = spec.sim_inter_per_user - base
    n_buy = base + (rng.poisson(rng.gamma(2.0, extra_mean / 2.0, n_users)) if extra_mean > 0 else 0)

    # purchase events: month by shop volume, time uniform within the month
    ev_user = np.repeat(np.arange(n_users), n_buy)
    ev_month = rng.choice(months, size=len(ev_user), p=MONTH_VOLUME / MONTH_VOLUME.sum())
    bounds = np.array(
        [f"{SIM_YEAR}-{m:02d}-01" for m in range(1, 13)] + [f"{SIM_YEAR + 1}-01-01"], dtype="datetime64[s]"
    ).astype(np.int64)
    ev_time = bounds[ev_month - 1] + (rng.random(len(ev_user)) * (bounds[ev_month] - bounds[ev_month - 1])).astype(
        np.int64
    )
    ev_region = user_region[ev_user]

    # stage 1: category ~ theta_u[c] * W_c(r, m)
    p_cat = taste[ev_user] * cat_w[:, ev_region, ev_month - 1].T
    p_cat /= p_cat.sum(axis=1, keepdims=True)
    ev_cat = (rng.random(len(ev_user))[:, None] > np.cumsum(p_cat, axis=1)).sum(axis=1).clip(max=n_cat - 1)
    # stage 2: item within the category ~ w_i(r, m)
    ev_item = np.empty(len(ev_user), dtype=np.int64)
    group = (ev_cat * n_regions + ev_region) * 12 + (ev_month - 1)
    order = np.argsort(group, kind="stable")
    bounds_g = np.flatnonzero(np.diff(group[order])) + 1
    for rows in np.split(order, bounds_g):
        k, r, m = ev_cat[rows[0]], ev_region[rows[0]], ev_month[rows[0]] - 1
        members = np.flatnonzero(item_cat == k)
        p = w[members, r, m]
        ev_item[rows] = rng.choice(members, size=len(rows), p=p / p.sum())

    # repeats: in each user's time order, re-buy a uniformly chosen earlier item
    order = np.lexsort((ev_time, ev_user))
    ev_user, ev_month, ev_time, ev_item = ev_user[order], ev_month[order], ev_time[order], ev_item[order]
    first = np.r_[0, np.flatnonzero(np.diff(ev_user)) + 1]
    pos = np.arange(len(ev_user)) - np.repeat(first, n_buy)
    if spec.sim_repeat > 0:
        repeat = (rng.random(len(ev_user)) < spec.sim_repeat) & (pos > 0)
        earlier = (rng.random(len(ev_user)) * pos).astype(np.int64)
        for k in range(1, int(pos.max()) + 1 if len(pos) else 0):  # position by position: chains resolve
            rows = np.flatnonzero(repeat & (pos == k))
            again = ev_item[rows - pos[rows] + earlier[rows]]
            on = on_sale[again, ev_month[rows] - 1]  # an item off sale cannot be re-bought: the fresh draw stays
            ev_item[rows[on]] = again[on]

    user_ids = np.array([f"u{u + 1:05d}" for u in range(n_users)], dtype=object)
    item_ids = np.array([f"i{i + 1:05d}" for i in range(n_items)], dtype=object)
    cat_names = tuple(cat.name for cat in cats)
    frame = pd.DataFrame(
        {
            "user_id": user_ids[ev_user],
            "item_id": item_ids[ev_item],
            "timestamp": ev_time.astype(np.int64),
            "region": np.array(regions, dtype=object)[user_region[ev_user]],
            "item_text": titles[ev_item],
            "category": np.array(cat_names, dtype=object)[item_cat[ev_item]],
        }
    )
    return SimResult(
        frame=frame,
        user_taste=pd.DataFrame(taste, index=pd.Index(user_ids, name="user_id"), columns=list(cat_names)),
        user_region=pd.Series(np.array(regions, dtype=object)[user_region], index=user_ids, name="region"),
        item_category=pd.Series(np.array(cat_names, dtype=object)[item_cat], index=item_ids, name="category"),
        item_title=pd.Series(titles, index=item_ids, name="item_text"),
        item_popularity=pd.Series(pop, index=item_ids, name="popularity"),
        item_home_region=pd.Series(
            np.where(home >= 0, np.array(regions + ("",), dtype=object)[home], ""), index=item_ids, name="home_region"
        ),
        item_stock=pd.DataFrame(stock, index=item_ids, columns=list(regions)),
        item_fashion_peak=pd.Series(fashion_peak, index=item_ids, name="fashion_peak"),
        category_months={cat.name: cat.months for cat in cats},
        item_on_sale=pd.DataFrame(on_sale, index=item_ids, columns=list(months)),
        region_promotion=pd.DataFrame(
            {"category": np.array(cat_names, dtype=object)[promoted], "boost": boost}, index=list(regions)
        ),
        regions=regions,
        categories=cat_names,
    )


def load(spec: DataSpec) -> tuple[pd.DataFrame, dict]:
    """The source interface: (frame, cleaning counts)."""
    result = simulate(spec)
    return result.frame, {"rows_simulated": len(result.frame)}
