"""Shared pieces of the benchmarks, one job per file: ``_timing`` (call statistics, round-robin rounds, training
steps), ``_machine`` (what the numbers come from), ``_workers`` (one process per framework, JSON results, progress)
and ``_tables`` (Markdown). This face re-exports them, so a suite imports ``from benchmarks._common import ...``.
"""

from benchmarks._machine import cpu_count as cpu_count
from benchmarks._machine import machine_description as machine_description
from benchmarks._machine import package_versions as package_versions
from benchmarks._tables import MiB as MiB
from benchmarks._tables import format_number as format_number
from benchmarks._tables import markdown_table as markdown_table
from benchmarks._timing import StepRunner as StepRunner
from benchmarks._timing import round_robin as round_robin
from benchmarks._timing import time_call as time_call
from benchmarks._workers import ROOT as ROOT
from benchmarks._workers import log as log
from benchmarks._workers import run_worker as run_worker
from benchmarks._workers import worker_main as worker_main

__all__ = [
    "MiB",
    "ROOT",
    "StepRunner",
    "cpu_count",
    "format_number",
    "log",
    "machine_description",
    "markdown_table",
    "package_versions",
    "round_robin",
    "run_worker",
    "time_call",
    "worker_main",
]
