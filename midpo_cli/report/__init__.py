"""Results: the sweep table (a row per run), `midpo report` (seeds aggregated, plots) and the sweep callback."""
