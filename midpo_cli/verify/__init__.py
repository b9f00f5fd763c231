"""`midpo verify`: each prior, in MI-DPO form, against its variant's original loss (checks.py) on probe batches (batches.py)."""
