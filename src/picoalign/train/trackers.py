"""Where training metrics go: a JSONL file always, TensorBoard and MLflow when turned on.

A tracker that fails (not installed, unreachable server) warns once and is switched off: a
broken dashboard never stops a training run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from picoalign.io import append_jsonl


class Trackers:
    def __init__(self, log_dir: Path, name: str, cfg, run_params: dict) -> None:
        self.jsonl = Path(log_dir) / f"{name}.jsonl"
        self.tb = None
        self.mlflow = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(log_dir) / "tb" / name))
            except Exception as e:  # noqa: BLE001 - any tracker failure is non-fatal
                warnings.warn(f"TensorBoard is off: {e}", stacklevel=2)
        if cfg.mlflow:
            try:
                import os

                import mlflow

                uri = mlflow_uri(cfg)
                if "://" not in uri:  # a plain folder: MLflow 3 wants an explicit opt-in
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri(uri)
                mlflow.set_experiment("picoalign")
                mlflow.start_run(run_name=f"{name}-{Path(cfg.out).name}")
                mlflow.log_params(_flat(run_params))
                self.mlflow = mlflow
                print(f"{name}: MLflow run in {uri} (mlflow ui --backend-store-uri {uri})")
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"MLflow is off: {e}", stacklevel=2)

    def log(self, row: dict) -> None:
        append_jsonl(self.jsonl, row)
        step = row.get("step", 0)
        numbers = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        kind = row.get("kind", "train")
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k if "/" in k else f"{kind}/{k}", v, step)
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in numbers.items()}, step=step)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"MLflow logging failed, turning it off: {e}", stacklevel=2)
                self.mlflow = None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def mlflow_uri(cfg) -> str:
    """The MLflow store: the config's (or MLFLOW_TRACKING_URI's) value, else ./mlruns."""
    return cfg.mlflow_uri or "./mlruns"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
