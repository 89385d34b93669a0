"""The scheduler's runtime: thread and stream engines, the pipelined executor, gradient sync,
the profiler, and what ``fsmoe train`` installs."""
