"""`saap-edge bench`: memory, parameters and tokens/s of the dense and compressed models in each
runtime (Table III of the paper). The rows and their derived ratios and targets: rows.py; each
row is measured in a child process (worker.py); what each row reads: probe.py, weights.py.
"""

from saap_edge.bench.rows import (  # noqa: F401
    BenchModel,
    DENSE,
    RowFailed,
    add_derived,
    artifact_for,
    bench_row,
    default_models,
    file_weights,
    measure,
    plan_bench,
    row_memory,
    run_bench,
    targets,
)
