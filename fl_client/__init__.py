"""The hospital-side client daemon: identity, local DP training, privacy ledger."""
