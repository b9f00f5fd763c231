"""The dataset settings the row path reads, taken from the config once per file as plain Python values.

Reading a key of an OmegaConf DictConfig costs tens of microseconds (validation, interpolation, typing), and the
row path used to read about seven per row: on a large file that was a quarter of preparation time. Loading and
preparing (sources.load_rows, prepare.build_pairs) convert the config once with `DataSettings.of` and hand the
frozen result down to every row.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSettings:
    """The keys of config.DatasetConfig that checking and tokenising rows read (see there for their meaning)."""
    source: str
    path: str | None
    prompt_column: str
    chosen_column: str
    rejected_column: str
    max_length: int
    max_prompt_length: int
    truncation: str                     # keep_end | drop
    on_bad_rows: str                    # drop | error
    allow_empty_completions: bool
    max_bad_fraction: float

    @classmethod
    def of(cls, dataset) -> DataSettings:
        """The settings of a dataset config (a DictConfig or DatasetConfig), checked; a DataSettings passes through."""
        if isinstance(dataset, cls):
            return dataset
        settings = cls(source=str(dataset.source), path=None if dataset.path is None else str(dataset.path),
                       prompt_column=dataset.prompt_column, chosen_column=dataset.chosen_column,
                       rejected_column=dataset.rejected_column, max_length=dataset.max_length,
                       max_prompt_length=dataset.max_prompt_length, truncation=str(dataset.truncation),
                       on_bad_rows=str(dataset.on_bad_rows), allow_empty_completions=bool(dataset.allow_empty_completions),
                       max_bad_fraction=dataset.max_bad_fraction)
        check_settings(settings)
        return settings

    @property
    def columns(self) -> dict[str, str]:
        """Our name -> the data's column name, for prompt, chosen and rejected."""
        return {"prompt": self.prompt_column, "chosen": self.chosen_column, "rejected": self.rejected_column}


def check_settings(settings) -> None:
    """The values a type cannot check when the config is composed (on_bad_rows and truncation are enums, checked
    by OmegaConf; a fraction's range is not)."""
    frac = settings.max_bad_fraction
    if not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
        raise ValueError(f"dataset.max_bad_fraction={frac} must be between 0 and 1")
