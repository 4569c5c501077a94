"""Tools around a running system: replay (test streams in), readback (forecasts out,
set beside what followed), the demo, and the benchmark."""
