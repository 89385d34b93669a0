"""Distributed training: DP x MP dense, EDP x EP x ESP MoE, equal to one process in every layout.

One file per concern (imported directly; this package imports nothing, so ``fsmoe.train`` can use
the launch helpers without a cycle)::

    topology.py         Topology: rank -> node (real or simulated with parallel.gpus_per_node)
    layout.py           Layout: degrees and rank arithmetic (pure; the scheduler reads it too)
    groups.py           ParallelGroups (process groups of a Layout) and build_groups
    sharding.py         ParamSharding: per-parameter placement / grad reduction / norm ownership
    moe.py              ParallelMoELayer, sharded experts, build_dispatcher, moe_layer_factory
    tensor_parallel.py  Column/RowParallelLinear and parallelize(model, groups)
    grads.py            sync_grads, clip_grad_norm (group-aware), global loss helpers
    checkpoint.py       sharded tensors as global DTensors for DCP (reshard on load)
    launch.py           init_distributed, fail-fast watchdog, torchrun spawning, CLI flags
    trainer.py          ParallelTrainer (fsmoe.train.Trainer with the distributed seams filled)

The communication stages themselves live in ``fsmoe.comm`` (functional, layout, alltoall, esp,
sharded). See docs/parallelism.md.
"""
