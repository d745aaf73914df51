"""`scifm plan`: per-GPU memory and step time of every valid layout of a run config, ranked.

config.py      PlanConfig: the hardware assumptions (plan.* keys) and the planner's options
shapes.py      the model's parameter shapes (built on the meta device) and activation widths
layouts.py     every layout of the world size, checked by the training code's own validators
memory_model.py  bytes a rank holds: parameters, gradients, optimizer state, activations, buffers
time_model.py  a step's time: compute at the stated MFU, TP, EP, PP bubble and DP communication
encoder_load.py  the modality encoders' work, sampled from the run's own data
routing_load.py  how unevenly a run routed (its metrics.jsonl), as the busiest ep rank's share
report.py      the ranked table, the explanation of the top choice, and the JSON form
planner.py     composes the run config and puts the above together

Models the native engine only (parallel.engine=native); nothing below scifm/cli.py imports it.
"""
