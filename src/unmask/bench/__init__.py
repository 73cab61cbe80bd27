"""`unmask bench`: speed and quality of the reference sampler, the engine's policies and the AR twin,
with ratios and targets. See harness.py for what is measured and configs.py for what is run."""
from .configs import CONCURRENCY, CONFIGS, FULL, QUICK, TARGETS, Workload, workload
from .harness import SCHEMA, run_bench
from .report import format_table, write_json, write_plot

__all__ = ["CONCURRENCY", "CONFIGS", "FULL", "QUICK", "SCHEMA", "TARGETS", "Workload", "format_table", "run_bench",
           "workload", "write_json", "write_plot"]
