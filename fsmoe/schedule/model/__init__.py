"""The scheduler's pure models (no ``torch.distributed``): profile fits, performance models, the
optimizer, the five policies, ``plan``, the schedule program, its simulation and reports."""
