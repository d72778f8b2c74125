"""Datasets, checks, patient-level splits and augmentation."""
