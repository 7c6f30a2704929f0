"""Cohorts (labels + bag files), in-RAM bag stores, patient-level splits and the DataModule."""
