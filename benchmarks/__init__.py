"""Side-by-side benchmarks: every prefsift stage against the baseline a user would otherwise write."""
