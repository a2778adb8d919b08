"""MovieLens-100K: the interactions table and FeatureSpec of the real-data demo.

Reads either of two layouts of the same data:

* GroupLens's own directory (`u.data`, `u.user`, `u.item`, optionally
  `u.genre`), which is what https://grouplens.org/datasets/movielens/100k/
  ships (`|`-separated, Latin-1);
* the copy inside the PyPI wheel `recbole==1.2.1`
  (`recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}`, tab-separated
  with `name:type` headers). It is found with `importlib.util.find_spec`, never
  imported: importing recbole pulls in torch. Install it with
  `pip install --no-deps recbole==1.2.1`.

Both give one row per rating, with the member's and the movie's features
joined in:

| column | meaning |
| --- | --- |
| `user_id` | member id (the entity) |
| `item_id` | movie id (request feature, hashed; also the tie-break of equal times) |
| `timestamp` | seconds since the epoch |
| `rating` | 1..5; the label is rating >= 4 |
| `age_bucket`, `gender`, `occupation`, `zip_prefix` | meta features |
| `genres` | `|`-joined genre names (multi-hot) |
| `release_year` | float; empty for item 267, whose title and year are unknown |

Example:

    rows, spec = movielens.load()                 # the embedded recbole copy
    rows, spec = movielens.load("data/ml-100k")   # a GroupLens download
    histories, _, _ = tf_limaml.tasks.build_tasks(spec, rows)
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from tf_limaml.features import FeatureSpec

logger = logging.getLogger(__name__)

RECBOLE_SUBDIR = os.path.join("dataset_example", "ml-100k")
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
GROUPLENS_FILES = ("u.data", "u.user", "u.item")

# u.genre's order: the 19 flag columns of u.item follow it.
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
GENDERS = ("F", "M")
# The age groups of MovieLens-1M, so both datasets read alike.
AGE_BUCKETS = (
    (18, "under_18"),
    (25, "18-24"),
    (35, "25-34"),
    (45, "35-44"),
    (50, "45-49"),
    (56, "50-55"),
    (math.inf, "56+"),
)
ZIP_PREFIXES = tuple(str(d) for d in range(10))

COLUMNS = (
    "user_id",
    "item_id",
    "timestamp",
    "rating",
    "age_bucket",
    "gender",
    "occupation",
    "zip_prefix",
    "genres",
    "release_year",
)
# The label: a rating of 4 or 5 is a positive.
POSITIVE_RATING = 4
# Most genres one ML-100K movie has.
MAX_GENRES = 6
DEFAULT_ITEM_BUCKETS = 10_000
# The request feature that names the movie (the report buckets by it).
ITEM_FEATURE = "item_id"
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)")
_UNKNOWN_TITLES = frozenset({"unknown", "unkonwn"})  # sic: the recbole copy's spelling


class MovieLensError(ValueError):
    """The data directory is not a MovieLens-100K layout, or a file is malformed."""


@dataclasses.dataclass(frozen=True)
class User:
    age_bucket: str
    gender: str
    occupation: str
    zip_prefix: str


@dataclasses.dataclass(frozen=True)
class Item:
    genres: tuple[str, ...]
    release_year: float | None


def age_bucket(age: int) -> str:
    """The MovieLens-1M age group of an age in years, e.g. 30 -> "25-34"."""
    for upper, name in AGE_BUCKETS:
        if age < upper:
            return name
    raise AssertionError("unreachable: the last bucket is open-ended")


def zip_prefix(zip_code: str) -> str:
    """First character of a zip code ("85711" -> "8").

    Non-US codes (Canadian ones start with a letter) keep their letter, which
    the feature's vocabulary sends to the out-of-vocabulary bucket.
    """
    zip_code = zip_code.strip()
    return zip_code[:1].upper() if zip_code else ""


def release_year(year_field: str, title: str = "", date: str = "") -> float | None:
    """The release year from a year field, a date (01-Jan-1995) or the title.

    Returns None when none of them holds a year: item 267 (title and year
    "unknown" in GroupLens, "unkonwn" in the recbole copy).
    """
    year_field = year_field.strip()
    if re.fullmatch(r"\d{4}", year_field):
        return float(year_field)
    match = re.search(r"(\d{4})$", date.strip())
    if match:
        return float(match.group(1))
    # Item 1412 of the recbole copy has "V" as its year and "(1995)" in the title.
    match = _YEAR_IN_TITLE.search(title)
    return float(match.group(1)) if match else None


def find_recbole_dir() -> str:
    """The ml-100k directory inside the installed recbole wheel, found without importing it.

    Raises:
        FileNotFoundError: recbole is not installed, or lacks the files.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded MovieLens-100K copy needs the recbole wheel: run "
            "`pip install --no-deps recbole==1.2.1`, or pass a GroupLens ml-100k "
            "directory (u.data, u.user, u.item)."
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, RECBOLE_SUBDIR)
        if all(os.path.exists(os.path.join(path, f)) for f in RECBOLE_FILES):
            return path
    raise FileNotFoundError(
        f"recbole is installed at {list(spec.submodule_search_locations)} but has no "
        f"{RECBOLE_SUBDIR}/{{{','.join(RECBOLE_FILES)}}}; reinstall recbole==1.2.1 "
        "with --no-deps."
    )


def detect_layout(path: str) -> str:
    """ "grouplens" or "recbole" for a directory, by the files it holds.

    Raises:
        MovieLensError: Neither set of files is there.
    """
    if all(os.path.exists(os.path.join(path, f)) for f in GROUPLENS_FILES):
        return "grouplens"
    if all(os.path.exists(os.path.join(path, f)) for f in RECBOLE_FILES):
        return "recbole"
    raise MovieLensError(
        f"{path} is not a MovieLens-100K directory: expected GroupLens's "
        f"{', '.join(GROUPLENS_FILES)} or recbole's {', '.join(RECBOLE_FILES)}. "
        "Download ml-100k.zip from grouplens.org and unzip it, or omit the path to "
        "use the embedded copy."
    )


# ------------------------------------------------------------ file readers
def _read_lines(path: str, encoding: str) -> list[str]:
    with open(path, encoding=encoding, errors="replace", newline="") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def _fields(line: str, separator: str, count: int, path: str, number: int) -> list[str]:
    fields = line.split(separator)
    if len(fields) < count:
        raise MovieLensError(
            f"{path} line {number}: expected {count} {separator!r}-separated fields, got "
            f"{len(fields)} ({line[:80]!r}); is the file complete?"
        )
    return fields


def _user(
    path: str, number: int, age: str, gender: str, occupation: str, zip_code: str
) -> User:
    try:
        years = int(age)
    except ValueError:
        raise MovieLensError(
            f"{path} line {number}: age {age!r} is not an integer"
        ) from None
    return User(
        age_bucket(years), gender.strip(), occupation.strip(), zip_prefix(zip_code)
    )


def _recbole_header(
    path: str, lines: Sequence[str], expected: Sequence[str]
) -> dict[str, int]:
    """Column index by name of a recbole atomic file (`name:type` headers)."""
    if not lines:
        raise MovieLensError(f"{path} is empty")
    names = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    missing = [c for c in expected if c not in names]
    if missing:
        raise MovieLensError(f"{path}: header {lines[0]!r} lacks column(s) {missing}")
    return {name: names.index(name) for name in expected}


def _read_recbole(
    path: str,
) -> tuple[list[tuple[str, str, str, str]], dict[str, User], dict[str, Item]]:
    inter_path, user_path, item_path = (os.path.join(path, f) for f in RECBOLE_FILES)
    lines = _read_lines(user_path, "utf-8")
    cols = _recbole_header(
        user_path, lines, ("user_id", "age", "gender", "occupation", "zip_code")
    )
    users = {}
    for number, line in enumerate(lines[1:], start=2):
        f = _fields(line, "\t", len(cols), user_path, number)
        users[f[cols["user_id"]]] = _user(
            user_path,
            number,
            f[cols["age"]],
            f[cols["gender"]],
            f[cols["occupation"]],
            f[cols["zip_code"]],
        )
    lines = _read_lines(item_path, "utf-8")
    cols = _recbole_header(
        item_path, lines, ("item_id", "movie_title", "release_year", "class")
    )
    items = {}
    for number, line in enumerate(lines[1:], start=2):
        f = line.split("\t")
        if len(f) < 2:
            raise MovieLensError(
                f"{item_path} line {number}: too few fields ({line[:80]!r})"
            )
        f += [""] * (len(cols) - len(f))
        title = f[cols["movie_title"]]
        genres = tuple(g for g in f[cols["class"]].split() if g)
        year = (
            None
            if title.strip() in _UNKNOWN_TITLES
            else release_year(f[cols["release_year"]], title=title)
        )
        items[f[cols["item_id"]]] = Item(genres, year)
    lines = _read_lines(inter_path, "utf-8")
    cols = _recbole_header(
        inter_path, lines, ("user_id", "item_id", "rating", "timestamp")
    )
    ratings = []
    for number, line in enumerate(lines[1:], start=2):
        f = _fields(line, "\t", len(cols), inter_path, number)
        ratings.append(
            (
                f[cols["user_id"]],
                f[cols["item_id"]],
                f[cols["rating"]],
                f[cols["timestamp"]],
            )
        )
    return ratings, users, items


def _read_grouplens(
    path: str,
) -> tuple[list[tuple[str, str, str, str]], dict[str, User], dict[str, Item]]:
    data_path, user_path, item_path = (os.path.join(path, f) for f in GROUPLENS_FILES)
    genres = GENRES
    genre_path = os.path.join(path, "u.genre")
    if os.path.exists(genre_path):
        # u.genre is "name|index" per line; the flag columns follow the index.
        pairs = [line.split("|") for line in _read_lines(genre_path, "latin-1")]
        genres = tuple(
            name
            for name, _ in sorted(
                ((p[0], int(p[1])) for p in pairs if len(p) == 2), key=lambda p: p[1]
            )
        )
    users = {}
    for number, line in enumerate(_read_lines(user_path, "latin-1"), start=1):
        f = _fields(line, "|", 5, user_path, number)
        users[f[0]] = _user(user_path, number, f[1], f[2], f[3], f[4])
    items = {}
    for number, line in enumerate(_read_lines(item_path, "latin-1"), start=1):
        f = _fields(line, "|", 5 + len(genres), item_path, number)
        flags = f[5 : 5 + len(genres)]
        item_genres = tuple(
            g for g, flag in zip(genres, flags, strict=False) if flag.strip() == "1"
        )
        title = f[1]
        year = (
            None
            if title.strip().lower() in _UNKNOWN_TITLES
            else release_year("", title=title, date=f[2])
        )
        items[f[0]] = Item(item_genres, year)
    ratings = []
    for number, line in enumerate(_read_lines(data_path, "latin-1"), start=1):
        f = _fields(line, "\t", 4, data_path, number)
        ratings.append((f[0], f[1], f[2], f[3]))
    return ratings, users, items


# ---------------------------------------------------------------- public API
def load_interactions(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The ratings joined with member and movie features, one dict per rating.

    Args:
        path: A GroupLens `ml-100k` directory or a recbole-layout directory;
            None reads the copy in the installed recbole wheel.

    Returns:
        Rows with the keys in `COLUMNS`, in file order. `rating` and
        `timestamp` are numbers, ids are strings, `genres` is `|`-joined and
        `release_year` is None where the movie has none (item 267).

    Raises:
        FileNotFoundError: No path and no recbole wheel.
        MovieLensError: The directory or a file is not MovieLens-100K.
    """
    path = find_recbole_dir() if path is None else os.fspath(path)
    layout = detect_layout(path)
    reader = _read_grouplens if layout == "grouplens" else _read_recbole
    ratings, users, items = reader(path)
    rows = []
    unknown_users, unknown_items = set(), set()
    for user_id, item_id, rating, timestamp in ratings:
        user, item = users.get(user_id), items.get(item_id)
        if user is None:
            unknown_users.add(user_id)
        if item is None:
            unknown_items.add(item_id)
        rows.append(
            {
                "user_id": user_id,
                "item_id": item_id,
                "timestamp": int(float(timestamp)),
                "rating": float(rating),
                "age_bucket": user.age_bucket if user else "",
                "gender": user.gender if user else "",
                "occupation": user.occupation if user else "",
                "zip_prefix": user.zip_prefix if user else "",
                "genres": "|".join(item.genres) if item else "",
                "release_year": item.release_year if item else None,
            }
        )
    if unknown_users or unknown_items:
        # The task builder rejects these rows (missing vocabulary values) with a reason.
        logger.warning(
            "Ratings name %d users and %d items absent from the user/item "
            "files of %s",
            len(unknown_users),
            len(unknown_items),
            path,
        )
    logger.info(
        "Read %d MovieLens ratings (%s layout) from %s", len(rows), layout, path
    )
    return rows


def feature_spec(
    item_hash_buckets: int = DEFAULT_ITEM_BUCKETS,
    item_dim: int = 16,
    meta_dim: int = 8,
    genre_dim: int = 8,
    release_year_stats: tuple[float, float] = (1988.0, 14.0),
) -> FeatureSpec:
    """The FeatureSpec of `load_interactions`' table.

    Args:
        item_hash_buckets: Hash buckets of the item id.
        item_dim: Item embedding size.
        meta_dim: Embedding size of each meta feature.
        genre_dim: Genre embedding size.
        release_year_stats: (mean, std) that standardize the release year; the
            mean is also the value of a missing year (item 267).

    Returns:
        The spec: entity `user_id`, time `timestamp`, label rating >= 4,
        tie-break `item_id`; meta features age bucket, gender, occupation, zip
        prefix; request features item id, genres, release year.
    """
    mean, std = release_year_stats
    return FeatureSpec.from_dict(
        {
            "entity": "user_id",
            "time": "timestamp",
            "label": {"column": "rating", "threshold": POSITIVE_RATING},
            "tie_break": "item_id",
            "meta_features": [
                {
                    "name": "age_bucket",
                    "type": "categorical",
                    "vocabulary": [name for _, name in AGE_BUCKETS],
                    "dim": meta_dim,
                },
                {
                    "name": "gender",
                    "type": "categorical",
                    "vocabulary": list(GENDERS),
                    "dim": meta_dim,
                },
                {
                    "name": "occupation",
                    "type": "categorical",
                    "vocabulary": list(OCCUPATIONS),
                    "dim": meta_dim,
                    "allow_oov": True,
                },
                {
                    "name": "zip_prefix",
                    "type": "categorical",
                    "vocabulary": list(ZIP_PREFIXES),
                    "dim": meta_dim,
                    "allow_oov": True,
                },
            ],
            "request_features": [
                {
                    "name": "item_id",
                    "type": "categorical",
                    "hash_buckets": item_hash_buckets,
                    "dim": item_dim,
                },
                {
                    "name": "genres",
                    "type": "multi_hot",
                    "vocabulary": list(GENRES),
                    "dim": genre_dim,
                    "max_values": MAX_GENRES,
                },
                {
                    "name": "release_year",
                    "type": "numeric",
                    "mean": mean,
                    "std": std,
                    "default": mean,
                },
            ],
        }
    )


def release_year_stats(rows: Iterable[dict[str, Any]]) -> tuple[float, float]:
    """(mean, std) of the release year over movies (each counted once), rounded."""
    years = {}
    for row in rows:
        if row["release_year"] is not None:
            years[row["item_id"]] = row["release_year"]
    if not years:
        return 0.0, 1.0
    values = list(years.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) or 1.0
    return round(mean, 1), round(std, 1)


def load(
    path: str | os.PathLike | None = None, as_frame: bool = False, **spec_kwargs
) -> tuple[Any, FeatureSpec]:
    """Interactions and their FeatureSpec.

    Args:
        path: See `load_interactions`.
        as_frame: Return a pandas DataFrame instead of a list of dicts.
        **spec_kwargs: Passed to `feature_spec`. The release-year statistics
            default to those of the data.

    Returns:
        (interactions, spec).
    """
    rows = load_interactions(path)
    spec_kwargs.setdefault("release_year_stats", release_year_stats(rows))
    spec = feature_spec(**spec_kwargs)
    if as_frame:
        import pandas as pd  # noqa: PLC0415 - pandas is an optional extra

        return pd.DataFrame(rows, columns=list(COLUMNS)), spec
    return rows, spec


def write_csv(
    rows: Iterable[dict[str, Any]],
    path: str | os.PathLike,
    columns: Sequence[str] = COLUMNS,
) -> int:
    """Writes interactions as a CSV with a header (the `limaml make-tasks` input).

    A missing release year is an empty cell, which the spec's default fills.

    Args:
        rows: Interactions (`load`'s rows, or rows derived from them).
        path: The CSV to write.
        columns: The columns written, in order (others are left out).

    Returns:
        Rows written.
    """
    count = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = dict(row)
            if out.get("release_year") is None:
                out["release_year"] = ""
            writer.writerow(out)
            count += 1
    return count
