"""First-party backends, installed as ``anyad.backends.*`` and found through entry points."""
