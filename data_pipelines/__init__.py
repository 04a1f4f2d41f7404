"""Market data in, clean canonical bars and features out (the first stage; imports no later stage).

Modules: ``sources`` (bundled sets and users' files, loaded raw), ``quality`` (every problem counted,
repair/drop/fail), ``features`` (returns, range estimators, realized variance, HAR lags, targets),
``splits`` (walk-forward with purge/embargo), ``synthetic`` (regime-switching GARCH-t with jumps),
``pipeline`` (prepare → write parquet + quality.json), ``bars`` (bar sizes and grids).
"""

from data_pipelines.features import build_features, forward_targets, realized_variance
from data_pipelines.pipeline import PreparedData, asset_label, list_datasets, prepare_dataset, write_prepared
from data_pipelines.quality import DataQualityError, QualityReport, check_and_clean, write_quality_json
from data_pipelines.sources import BUNDLED, load_raw
from data_pipelines.splits import Fold, walk_forward_splits
from data_pipelines.synthetic import SyntheticPath, simulate

__all__ = [
    "BUNDLED",
    "DataQualityError",
    "Fold",
    "PreparedData",
    "QualityReport",
    "SyntheticPath",
    "asset_label",
    "build_features",
    "check_and_clean",
    "forward_targets",
    "list_datasets",
    "load_raw",
    "prepare_dataset",
    "realized_variance",
    "simulate",
    "walk_forward_splits",
    "write_prepared",
    "write_quality_json",
]
