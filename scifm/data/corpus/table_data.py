"""Real tables bundled with scikit-learn and statsmodels, normalised for slicing into documents."""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import pandas as pd

from scifm.data.corpus.common import cell


@dataclass(frozen=True)
class DataTable:
    name: str  # short id used in document ids, e.g. "iris"
    title: str  # the dataset's own title
    key: str  # column of unique row labels (sample number, year, state ...)
    categorical: tuple[str, ...]
    numeric: tuple[str, ...]
    rows: list[list[int | float | str]]  # key, categorical, numeric columns; cells as displayed
    ordered: bool  # rows form a series along the key (contiguous slices, line plots)

    @property
    def columns(self) -> list[str]:
        return [self.key, *self.categorical, *self.numeric]


def normalise(
    name: str, title: str, frame: pd.DataFrame, key: str, categorical: tuple[str, ...] = (), ordered: bool = False
) -> DataTable:
    """Drops incomplete rows and rounds cells once, so every fact is computed from what is shown."""
    numeric = tuple(
        c for c in frame.columns if c != key and c not in categorical and pd.api.types.is_numeric_dtype(frame[c])
    )
    frame = frame.dropna().reset_index(drop=True)
    rows = [
        [str(r[0]), *(cell(v) for v in r[1:])] for r in frame[[key, *categorical, *numeric]].itertuples(index=False)
    ]
    if len({r[0] for r in rows}) != len(rows):
        raise ValueError(f"table {name}: key column {key!r} must label rows uniquely")
    return DataTable(name, title, key, categorical, numeric, rows, ordered)


def numbered(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Adds a 1-based row number as the key column, for tables without natural row labels."""
    return frame.reset_index(drop=True).assign(**{key: range(1, len(frame) + 1)})


@functools.cache
def sklearn_tables() -> tuple[DataTable, ...]:
    from sklearn import datasets

    def load(loader: str) -> tuple[str, pd.DataFrame, list[str] | None]:
        bunch = getattr(datasets, loader)(as_frame=True)
        lines = [s for s in bunch.DESCR.splitlines() if s.strip() and not s.startswith("..")]
        names = bunch.get("target_names")
        return lines[0].strip(), bunch.frame, None if names is None else [str(n) for n in names]

    tables = []
    for loader, name, target in (
        ("load_iris", "iris", "species"),
        ("load_wine", "wine", "cultivar"),
        ("load_breast_cancer", "breast_cancer", "diagnosis"),
    ):
        title, frame, classes = load(loader)
        frame = (
            numbered(frame, "sample").assign(**{target: [classes[t] for t in frame["target"]]}).drop(columns="target")
        )
        tables.append(normalise(name, title, frame, "sample", (target,)))
    title, frame, _ = load("load_diabetes")
    tables.append(
        normalise("diabetes", title, numbered(frame, "patient").rename(columns={"target": "progression"}), "patient")
    )
    title, frame, _ = load("load_linnerud")
    tables.append(normalise("linnerud", title, numbered(frame, "athlete"), "athlete"))
    return tuple(tables)


def statsmodels_table(module: str) -> tuple[str, pd.DataFrame]:
    mod = importlib.import_module(f"statsmodels.datasets.{module}")
    return " ".join(mod.TITLE.split()), mod.load_pandas().data


def quarter_key(frame: pd.DataFrame) -> pd.DataFrame:
    labels = [f"{int(y)}Q{int(q)}" for y, q in zip(frame["year"], frame["quarter"])]
    return frame.drop(columns=["year", "quarter"]).assign(quarter=labels)


@functools.cache
def statsmodels_tables() -> tuple[DataTable, ...]:
    def year_key(frame: pd.DataFrame, column: str) -> pd.DataFrame:
        return frame.assign(**{column: frame[column].astype(int)})

    tables = []
    title, f = statsmodels_table("longley")
    tables.append(normalise("longley", title, year_key(f, "YEAR"), "YEAR", ordered=True))
    title, f = statsmodels_table("stackloss")
    tables.append(normalise("stackloss", title, numbered(f, "run"), "run"))
    title, f = statsmodels_table("co2")
    week = pd.Series([d.strftime("%Y-%m-%d") for d in f.index], index=f.index)
    tables.append(normalise("co2", title, f.assign(week=week).reset_index(drop=True), "week", ordered=True))
    title, f = statsmodels_table("nile")
    tables.append(normalise("nile", title, year_key(f, "year"), "year", ordered=True))
    title, f = statsmodels_table("sunspots")
    tables.append(normalise("sunspots", title, year_key(f, "YEAR"), "YEAR", ordered=True))
    title, f = statsmodels_table("macrodata")
    tables.append(normalise("macrodata", title, quarter_key(f), "quarter", ordered=True))
    title, f = statsmodels_table("interest_inflation")
    tables.append(normalise("interest_inflation", title, quarter_key(f), "quarter", ordered=True))
    title, f = statsmodels_table("elnino")
    tables.append(normalise("elnino", title, year_key(f, "YEAR"), "YEAR", ordered=True))
    title, f = statsmodels_table("statecrime")
    tables.append(normalise("statecrime", title, f.rename_axis("state").reset_index(), "state"))
    title, f = statsmodels_table("china_smoking")
    tables.append(normalise("china_smoking", title, f.rename_axis("city").reset_index(), "city"))
    title, f = statsmodels_table("fertility")
    years = [str(y) for y in range(1960, 2011, 10)]
    tables.append(
        normalise(
            "fertility", title, f[["Country Name", *years]].rename(columns={"Country Name": "country"}), "country"
        )
    )
    for module, key in (
        ("engel", "household"),
        ("strikes", "strike"),
        ("spector", "student"),
        ("heart", "patient"),
        ("star98", "school"),
    ):
        title, f = statsmodels_table(module)
        tables.append(normalise(module, title, numbered(f, key), key))
    return tuple(tables)


def all_tables() -> tuple[DataTable, ...]:
    """Both families; each is loaded once per process, since the table and plot sources share them."""
    return sklearn_tables() + statsmodels_tables()
