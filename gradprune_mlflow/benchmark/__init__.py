"""The defense benchmark: every defense behind one interface, run on the same backdoored models and clean budgets.

`registry` holds the interface and the names; `gradprune` and `baselines/` register the defenses; `runner` runs a
preset and `tables` turns the rows into CSV, markdown and a plot. `benchmarks/compare.py` is the command.
"""
