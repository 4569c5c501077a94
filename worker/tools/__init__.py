"""Tools around a running system: replay (test streams in), readback (forecasts out,
set beside what followed), the demo, and the benchmark."""

# The benchmark's parts (``attnlstm bench --runs``): the drains (the worker, the raw
# loops, the per-entry ways), the latency runs, and what each model costs. Here, not in
# the benchmark's module, so that the command line's parser need not import torch.
RUNS = ("drains", "latency", "models")
