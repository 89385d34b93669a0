"""Where each expert lives and how that changes (docs/placement.md).

    placement.py  Placement: logical expert -> physical (EP rank, slot) per copy; free spare slots
    slots.py      spare slots added to a sharded experts module (before the optimizer exists)
    replicas.py   the copies' gradients summed over the EP group; the grad norm's rows
    migrate.py    MigrationPlan and migrate: weights, gradients and optimizer state, exact
    policy.py     the cost model and the policies (FlexMoE, EPLB-style): pure functions
    traffic.py    the traffic window and the routing trace file
    rebalance.py  the training loop's rebalancer: window -> policy -> migrate, metrics
"""
