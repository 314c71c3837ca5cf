"""Batch jobs: a JSONL file of requests (OpenAI batch style) sent with a bounded number in
flight, resumable after a kill, with one verified output line per input line.

``submit_batch`` / ``run_job`` start or resume a job, ``batch_status`` and ``cancel_batch``
inspect and stop one; ``inference-node batch submit|status|cancel`` wraps them. Modules:
``lines`` (parsing input lines), ``state`` (the job's SQLite state), ``runner`` (one run),
``outputs`` (output and failures files), ``progress`` (the progress bar), ``jobs`` (the API).
"""

from client.batch.jobs import batch_status, cancel_batch, run_job, submit_batch
from client.batch.lines import BatchLine, InvalidLine, LineParser, parse_line
from client.batch.runner import BatchError, BatchOptions

__all__ = [
    "BatchError",
    "BatchLine",
    "BatchOptions",
    "InvalidLine",
    "LineParser",
    "batch_status",
    "cancel_batch",
    "parse_line",
    "run_job",
    "submit_batch",
]
