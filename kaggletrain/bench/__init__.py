"""`kaggletrain bench`: speed and memory measurements on the user's own machine.

Suites (one module each): wkv (the WKV-7 operator), train (a training step by model size), optim (the
memory/speed switches against a plain baseline), infer (prefill and decode), context (memory and speed
against sequence length). runner.py plans, measures (memory.py, timing.py) and writes the results;
report.py and plots.py render them. Nothing is imported here: `kaggletrain --help` stays fast.
"""
