"""The FSMoE scheduler (docs/scheduler.md), in three parts that depend one way:

    types.py   the contracts: LayerSpec, Layout (from fsmoe.parallel.layout), GarPlan, LayerSchedule,
               Schedule, Lanes, Op
    model/     pure (no torch.distributed): Profile fits, performance models, the optimizer,
               the five policies, ``plan``, the schedule program and its simulation
    run/       the runtime: thread/stream engines, the pipelined executor, gradient sync,
               the profiler, and what ``fsmoe train`` installs

    profile = Profile.load("runs/profiles/x.json")              # fsmoe profile
    schedule = plan(LayerSpec(...), Layout(...), profile)        # pure: -> Schedule
    executor = PipelinedExecutor(dispatcher, engine, schedule.layer_schedule())
    layer = MoELayer(cfg, d_model, dispatcher=dispatcher, executor=executor)

The package imports nothing eagerly: import from the module that defines a name.
"""
