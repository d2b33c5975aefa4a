"""Lina's popularity-driven expert placement for MoE inference (USENIX ATC 2023).

At inference the router's choices are skewed, so the ranks hosting the hot experts are stragglers.
Every rank here holds every expert, and each MoE layer places its experts per batch:

- `profile.py`: offline path profiles (next-layer top-1 distribution given the previous top-1 experts)
  and the popularity estimate they give for the tokens of a batch;
- `placement.py`: the placement planner (replicate hot experts, pack cold ones first-fit-decreasing)
  and the even split of an expert's rows over its replicas;
- `dispatch.py`: the dispatcher that sends each expert's rows to its replicas;
- `scheduler.py`: the two phases (estimate before the layer, check against the real gate after it);
- `engine.py`: the inference engine (checkpoint -> model with all experts local -> scored batches);
- `metrics.py`: per-batch metrics and their percentiles.
"""
