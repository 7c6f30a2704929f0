"""The embedded demo: a synthetic H&E-like cohort with planted immune regions."""
