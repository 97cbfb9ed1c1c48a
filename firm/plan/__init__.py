"""`firm plan`: the per-GPU memory of an RL experiment before anyone pays for GPUs (docs/running.md, "Memory plan").

:func:`~firm.plan.plan.plan_experiment` builds the experiment's policy from its checkpoint's shipped ``config.json``
files on the meta device, measures the activations of its forwards with fake tensors, and gives the per-GPU bytes of
every way to run it (DDP or FSDP2, activation checkpointing on or off, the text encoder kept, sharded or freed).
"""
