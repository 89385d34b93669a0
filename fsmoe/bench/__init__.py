"""Speed measurements (``fsmoe bench``, registered by fsmoe.cli.bench):

    layer.py      forward+backward of one MoE layer vs the dense ceiling and peers
    train.py      tokens/s, MFU and peak memory of ``fsmoe train``'s own step, vs torchtitan's MoE
    schedule.py   the FSMoE layer grid under the five schedules (multi-process), schedule_report.py
    common.py     the timing, memory and profiler helpers they share
    gap_probe.py, launch_probe.py   host-side probes of the layer's launch overhead

Each prints a table and, with ``--json PATH``, writes what scripts/perf_page.py turns into
docs/performance.md.
"""
